"""The CPU constants of the memory planner (``planner/core.py``), measured on nothing the planner
is tested on: a toy model and the bundled CLIP tokenizer files.

    .venv/bin/python bench/planner_calibration.py      # in a fresh process, 2 runs by default

A CPU run's resident memory grows by more than its tensors: each CLIP tokenizer is a few
hundred thousand Python strings (its vocabulary and merges), and torch's first convolution,
linear layer, attention, backward pass and AdamW step set up kernels, thread pools and
caches once per process, and oneDNN compiles and keeps one kernel per distinct convolution
(shapes, stride, direction). These are measured once, in fresh processes (what a
`dreambooth-lora train` is), on a toy conv/attention model that is no fixture: the
resident-memory growth of the first use, and of 80 convolutions of new shapes (per kernel).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

CHILD = r"""
import gc, json, torch
import dreambooth_lora.trainer.loop  # everything a training run imports, before its meter starts
from dreambooth_lora.models.load import make_tokenizer
from dreambooth_lora.planner.trace import traced_peak
from dreambooth_lora.runtime.memory import resident_bytes
from torch import nn

def grown(work):
    gc.collect(); before = resident_bytes(); work(); gc.collect()
    return resident_bytes() - before

tokenizer = grown(lambda: make_tokenizer("<|endoftext|>")("a photo of a dog"))
model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
attention = nn.Linear(8, 8)

def first_step():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    q = attention(torch.randn(1, 2, 16, 8)).requires_grad_()
    loss = model(x).square().mean() + nn.functional.scaled_dot_product_attention(q, q, q).square().mean()
    loss.backward()
    torch.optim.AdamW([*model.parameters(), *attention.parameters()]).step()

first = grown(first_step)
toy_kernels = len(traced_peak(first_step).convolutions)  # the same tracer the planner uses, on real tensors

def new_kernels():  # 80 convolutions of shapes not seen before, forward only: one kernel each
    for i in range(80):
        channels, side = 8 + i % 40, 8 + i // 40
        nn.Conv2d(channels, channels + 1, 3, padding=1)(torch.randn(2, channels, side, side))

kernel = grown(new_kernels) / 80
print(json.dumps({"tokenizer": tokenizer, "kernel": kernel, "runtime": first - toy_kernels * kernel,
                  "toy_kernels": toy_kernels}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        gc.collect()
    for name in ("tokenizer", "runtime", "kernel"):
        values = [r[name] / 2**20 for r in rows]
        print(f"{name:10s} " + "  ".join(f"{v:7.3f} MiB" for v in values))
    print(f"(the toy's own first step used {rows[0]['toy_kernels']} convolution kernels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shapes world's evaluator: our miniature of the paper's DINO and CLIP-T.

One small CNN, trained on rendered scenes where the truth is known, with four outputs:
- ``look``: a unit embedding that must tell looks apart — same class and colour but another
  pattern is another look — while ignoring where the object is, how big, how turned, and what is
  behind it (trained contrastively: two renders of one look are a positive pair, every other
  look in the batch a negative). Subject fidelity, PRES and DIV are cosines of it, as the paper's
  are of DINO features;
- ``background``, ``shape`` and ``color`` classifiers: prompt fidelity is the rate at which the
  background a prompt asked for is the one the judge sees (our CLIP-T: a rate, with chance
  at 1/7, instead of an uncalibrated cosine), and the base model's quality is how often class
  and colour come out as prompted.

    python -m dreambooth_lora.shapes.judge --out shapes/base/judge.safetensors     # 8.5 min on 1 CPU thread

Generated images are softer than renders, so training blurs and adds noise at random.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..runtime.files import write_safetensors
from . import world

HEADS = {"background": list(world.BACKGROUNDS), "shape": list(world.CLASSES), "color": list(world.COLORS)}
EMBED = 64


def default_path() -> Path:
    return Path(__file__).resolve().parent / "base" / "judge.safetensors"


class JudgeNet(nn.Module):
    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for width, stride in ((32, 2), (64, 2), (128, 2), (128, 2)):
            layers += [nn.Conv2d(channels, width, 3, stride, 1), nn.GroupNorm(8, width), nn.SiLU()]
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.look = nn.Sequential(nn.Linear(channels, 128), nn.SiLU(), nn.Linear(128, EMBED))
        self.heads = nn.ModuleDict({name: nn.Linear(channels, len(labels)) for name, labels in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.trunk(pixels).mean(dim=(2, 3))
        out = {name: head(pooled) for name, head in self.heads.items()}
        out["look"] = F.normalize(self.look(pooled), dim=-1)
        return out


def to_pixels(images) -> torch.Tensor:
    """PIL images or a uint8 (N, 64, 64, 3) array → the judge's input in [-1, 1]."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(i.convert("RGB").resize((world.SIZE, world.SIZE))) for i in images])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Judge:
    """A trained JudgeNet with the questions the metrics ask of it."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Judge":
        from safetensors.torch import load_file

        path = Path(path or default_path())
        if not path.is_file():
            raise UserError(f"{path}: the shapes-world judge is missing; train it with "
                            "`python -m dreambooth_lora.shapes.judge`.")
        net = JudgeNet()
        net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return cls(net)

    @torch.no_grad()
    def run(self, images, batch: int = 256) -> dict[str, torch.Tensor]:
        pixels = to_pixels(images)
        outs = [self.net(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def looks(self, images) -> torch.Tensor:
        return self.run(images)["look"]

    def labels(self, images, head: str) -> list[str]:
        return [HEADS[head][i] for i in self.run(images)[head].argmax(-1).tolist()]


# --- training ------------------------------------------------------------------------------


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur half of the images a little and add a little noise: generated images are softer."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    return x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)


def visual_id(look: world.Look) -> int:
    """Looks that draw the same pixels are one look (a solid look's second colour is unused)."""
    return hash((look.shape, look.color, look.pattern, None if look.solid else look.color2)) & 0x7FFFFFFF


def _multi_positive(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    log_probability = logits.log_softmax(dim=-1)
    return -(log_probability.masked_fill(~positive, float("-inf")).logsumexp(dim=-1)).mean()


def train_judge(steps: int, seed: int, looks_per_batch: int = 48, pool: int = 3000, renders: int = 4) -> tuple[JudgeNet, dict]:
    rng = random.Random(f"judge:{seed}")
    torch.manual_seed(seed)
    looks = [world.mixed_look(rng, i) for i in range(pool)]
    scenes = [world.random_scene(rng, look) for look in looks for _ in range(renders)]
    started = time.perf_counter()
    images = to_pixels(world.render_many(scenes))
    label = {name: torch.tensor([labels.index(getattr(s, "background") if name == "background" else
                                              getattr(s.look, name)) for s in scenes])
             for name, labels in HEADS.items()}
    solid = torch.tensor([s.look.solid for s in scenes])
    identity = torch.tensor([visual_id(look) for look in looks])
    net = JudgeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        chosen = torch.randperm(pool, generator=generator)[:looks_per_batch]
        pair = torch.stack([torch.randperm(renders, generator=generator)[:2] for _ in chosen])
        index = torch.cat([chosen * renders + pair[:, 0], chosen * renders + pair[:, 1]])
        out = net(_augment(images[index], generator))
        # InfoNCE both ways: render A of look i must pick a render B of the same look among all
        # B's (two drawn looks can be the same look: both count as the right answer).
        a, b = out["look"][:looks_per_batch], out["look"][looks_per_batch:]
        logits = a @ b.T / 0.1
        same = identity[chosen][:, None] == identity[chosen][None, :]
        loss = (_multi_positive(logits, same) + _multi_positive(logits.T, same.T)) / 2
        for name in HEADS:
            keep = solid[index] if name == "color" else torch.ones(len(index), dtype=torch.bool)
            loss = loss + F.cross_entropy(out[name][keep], label[name][index][keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"judge {step:5d}/{steps} loss {np.mean(losses[-100:]):.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    return net.eval(), {"judge_steps": steps, "judge_seconds": round(time.perf_counter() - started, 1),
                        "judge_final_loss": round(float(np.mean(losses[-100:])), 4)}


@torch.no_grad()
def check_judge(judge: Judge, seed: int = 1234, count: int = 600) -> dict:
    """Accuracy on fresh renders (another seed than training) and how well looks separate:
    the share of renders whose nearest other render is of the same look."""
    rng = random.Random(f"judge-check:{seed}")
    looks = [world.mixed_look(rng, i) for i in range(count // 2)]
    scenes = [world.random_scene(rng, look) for look in looks for _ in range(2)]
    out = judge.run(world.render_many(scenes))
    result = {}
    for name, labels in HEADS.items():
        truth = [labels.index(s.background if name == "background" else getattr(s.look, name)) for s in scenes]
        keep = [i for i, s in enumerate(scenes) if name != "color" or s.look.solid]
        result[f"{name}_accuracy"] = round(float((out[name].argmax(-1)[keep] == torch.tensor(truth)[keep]).float().mean()), 4)
    similarity = out["look"] @ out["look"].T
    similarity.fill_diagonal_(-2)
    identity = torch.tensor([visual_id(s.look) for s in scenes])
    # the nearest other render shows the same look (its own partner, or a render of an equal look)
    result["look_retrieval"] = round(float((identity[similarity.argmax(-1)] == identity).float().mean()), 4)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_lora.shapes.judge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_path())
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net, record = train_judge(args.steps, args.seed)
    record.update(check_judge(Judge(net)))
    record["command"] = "python -m dreambooth_lora.shapes.judge " + " ".join(argv if argv is not None else sys.argv[1:])
    write_safetensors(args.out, net.state_dict(), {"shapes.judge": json.dumps(record, sort_keys=True)})
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

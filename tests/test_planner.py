"""The memory planner: `dreambooth-lora plan`, --fit-to-vram (CLI, API and the Train node), the
meta-device tracer against real allocations, and predicted against measured peak of real runs.

What is measured. A CPU run's peak is the growth of its process's resident memory from just
before it loads its model to its highest point (the kernel's own high-water mark, reset at the
start: ``runtime.memory.PeakMeter``), in a fresh `dreambooth-lora train` process, one thread,
with glibc told to give every freed block of 64 KiB or more back at once
(MALLOC_MMAP_THRESHOLD_=65536). Without that, glibc's heap keeps freed activations and the
resident memory of a CPU run climbs above what its tensors ever hold at once, by an amount that
depends on the step count and the allocation order, not on the model: sd15-full at 384 px
measured +12% over the prediction after 1 step, sd1-tiny at 512 px +69% after 8 (the same runs
with the setting: +0% and +3%). The planner predicts what the run holds, not what glibc keeps.

The prediction is made before the run from the checkpoint's shapes; nothing in it is fitted to
these runs (its three CPU constants come from a toy model: bench/planner_calibration.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dreambooth_lora.cli import main
from dreambooth_lora.errors import UserError
from dreambooth_lora.fixtures.checkpoints import fixture_path
from dreambooth_lora.planner.core import Planner, candidates
from dreambooth_lora.runtime.memory import GIB
from dreambooth_lora.trainer.job import resolve_settings
from dreambooth_lora.trainer.loop import train

from test_nodes import comfy_dirs, defaults, run  # noqa: F401  (comfy_dirs is a fixture)
from test_trainer import make_photos, tiny_job

CLI = [sys.executable, "-m", "dreambooth_lora.cli"]
ACCURACY = 0.15  # |measured / predicted - 1|: the bound
UNITS = {"MiB": 2**20, "GiB": 2**30}


def plan_json(capsys, *argv) -> tuple[int, dict]:
    code = main(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_plan_lists_candidates_fastest_first_and_picks_the_first_that_fits(capsys):
    base = str(fixture_path("sdxl-tiny"))
    code, everything = plan_json(capsys, "--base", base, "--device", "cuda", "--resolution", "256", "--vram", "64")
    assert code == 0 and everything["device"] == "cuda" and everything["compute"] == "bf16"
    rows = everything["candidates"]
    order = [(r["base_precision"], r["gradient_checkpointing"], r["offload"]) for r in rows]
    assert order == [(c.precision, c.checkpointing, c.offload) for c in candidates("cuda")]
    assert order[:4] == [("auto", False, False), ("fp8", False, False), ("auto", True, False), ("fp8", True, False)]
    assert everything["chosen"] == {"base_precision": "auto", "gradient_checkpointing": False, "offload": False}
    by = {key: r for key, r in zip(order, rows)}
    # fp8 stores the UNet's Linear/Conv weights in 1 byte instead of bf16's 2; checkpointing cuts activations
    assert by[("fp8", False, False)]["phases"]["training"]["UNet"] < 0.6 * by[("auto", False, False)]["phases"]["training"]["UNet"]
    assert by[("auto", True, False)]["phases"]["training"]["step (activations, gradients)"] < \
        0.7 * by[("auto", False, False)]["phases"]["training"]["step (activations, gradients)"]
    assert by[("fp8", False, True)]["offload_bytes_per_step"] > 0
    # a budget just under the fastest candidate's peak: the first one below it is chosen
    peaks = [r["peak_bytes"] for r in rows]
    budget = (peaks[0] - 1) / GIB
    code, tight = plan_json(capsys, "--base", base, "--device", "cuda", "--resolution", "256", "--vram", f"{budget:.6f}")
    expected = next(i for i, p in enumerate(peaks) if p <= int(budget * GIB))
    assert code == 0 and tight["chosen"] == {k: rows[expected][k] for k in ("base_precision", "gradient_checkpointing",
                                                                              "offload")}
    assert expected > 0


def test_plan_says_when_nothing_fits_and_prints_train_flags(capsys):
    base = str(fixture_path("sd1-tiny"))
    assert main(["plan", "--base", base, "--device", "cpu", "--resolution", "64", "--vram", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "fastest first" in out and "→ 1. base fp32" in out
    assert "train with: --base-precision auto --no-gradient-checkpointing --no-offload" in out
    _, one = plan_json(capsys, "--base", base, "--device", "cpu", "--resolution", "256", "--vram", "1")
    _, four = plan_json(capsys, "--base", base, "--device", "cpu", "--resolution", "256", "--vram", "1", "--batch", "4")
    step = [r["phases"]["training"]["step (activations, gradients)"] for r in (one["candidates"][0], four["candidates"][0])]
    assert 3 * step[0] < step[1] < 5 * step[0]  # --batch (argparse's prefix of --batch-size): 4 rows of each kind
    code = main(["plan", "--base", str(fixture_path("sd15-full")), "--device", "cuda", "--resolution", "512",
                 "--vram", "0.5"])
    assert code == 1 and "nothing fits 0.50 GiB" in capsys.readouterr().out


def test_fit_to_vram_chooses_before_the_run_and_records_it(tmp_path):
    job = tiny_job(tmp_path, "fit", fixture="sdxl-tiny", prior_preservation="base_model", resolution=128, steps=2)
    settings = resolve_settings(job.options)
    rows = Planner(job.base, settings, "cpu").plan(GIB).predictions
    # a budget that the fastest candidate misses and a later one meets
    budget = max(p.peak for p in rows if p.peak < rows[0].peak)
    chosen = next(p for p in rows if p.peak <= budget).candidate
    assert chosen != rows[0].candidate
    job.options = {**job.options, "fit_to_vram": budget / GIB}
    result = train(job)
    with safe_open(str(result.output), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["dreambooth_lora.base_precision"] == chosen.precision
    assert meta["ss_gradient_checkpointing"] == str(chosen.checkpointing)
    with pytest.raises(UserError, match=r"--fit-to-vram \(fit_to_vram\) 0.001: nothing fits; the smallest"):
        train(tiny_job(tmp_path, "none", prior_preservation="base_model", fit_to_vram=0.001))
    assert not (tmp_path / "none.state").exists()  # refused before anything was loaded or written


def test_train_node_fits_to_vram(comfy_dirs):  # noqa: F811
    from dreambooth_lora.nodes.data import InstanceImages, LoadBaseModel
    from dreambooth_lora.nodes.training import TrainDreamBoothLoRA

    inputs = {i.id: i for i in TrainDreamBoothLoRA.GET_SCHEMA().inputs}
    assert inputs["fit_to_vram"].default == 0.0 and "GiB" in inputs["fit_to_vram"].tooltip
    assert inputs["base_precision"].options == ["auto", "fp8", "bf16", "fp16", "fp32"] and "offload" in inputs
    assert "fit_to_vram" in TrainDreamBoothLoRA.validate_inputs(**defaults(TrainDreamBoothLoRA, fit_to_vram=-1))
    base = run(LoadBaseModel, ckpt_name="tiny.safetensors", dtype="auto", prediction_type="auto").args[0]
    photos = torch.rand(4, 72, 80, 3, generator=torch.Generator().manual_seed(0))
    dataset = run(InstanceImages, **defaults(InstanceImages, folder="", images=photos, resolution=64)).args[0]
    options = dict(lora_name="fitted", steps=2, rank=4, alpha=4, prior_preservation="base_model")
    settings = resolve_settings({**options, "resolution": 64})
    # the node's base is already loaded: its plan has no loading phase
    rows = Planner(base["path"], settings, "cpu", loads=False).plan(GIB).predictions
    budget = max(p.peak for p in rows if p.peak < rows[0].peak)
    chosen = next(p for p in rows if p.peak <= budget).candidate
    name = run(TrainDreamBoothLoRA, base=base, dataset=dataset,
               **defaults(TrainDreamBoothLoRA, **options, fit_to_vram=budget / GIB)).args[0]
    with safe_open(str(comfy_dirs / "loras" / name), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["dreambooth_lora.base_precision"] == chosen.precision != rows[0].candidate.precision or \
        meta["ss_gradient_checkpointing"] == str(chosen.checkpointing) != str(rows[0].candidate.checkpointing)


def test_traced_step_is_what_a_cpu_step_allocates(tmp_path):
    """The meta-device trace of one training step against the same step on real CPU tensors, whose
    resident-memory growth is the allocations themselves when glibc maps every block of 64 KiB
    and more on its own (MALLOC_MMAP_THRESHOLD_: freed memory goes back at once). Measured, traced
    against real: sd1-tiny 38.7 vs 36.2 MiB, with checkpointing 16.2 vs 14.4; sdxl-tiny 37.0 vs
    33.4, 7.6 vs 7.4 (tensors under 64 KiB, a few MiB here, stay in glibc's heap)."""
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for fixture in ("sd1-tiny", "sdxl-tiny"):
        for checkpointing in ("0", "1"):
            out = subprocess.run([sys.executable, str(script), fixture, "256", checkpointing], env=env, check=True,
                                 capture_output=True, text=True, timeout=600).stdout
            traced, measured = map(float, out.split()[-2:])
            assert abs(measured / traced - 1) < ACCURACY, (fixture, checkpointing, traced, measured)


STEP_SCRIPT = r'''
import gc, sys, torch
from peft import inject_adapter_in_model
from dreambooth_lora.fixtures.checkpoints import fixture_path
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.planner.core import Planner
from dreambooth_lora.planner.steps import traced_step
from dreambooth_lora.runtime.memory import PeakMeter
from dreambooth_lora.runtime.peft import UNET_TARGETS, adapter_config
from dreambooth_lora.trainer.options import TrainSettings

name, resolution, checkpointing = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
settings = TrainSettings.of({"resolution": resolution, "prior_preservation": "class_images"})
planner = Planner(str(fixture_path(name)), settings, "cpu")
traced = traced_step(planner, checkpointing).peak
unet = load_base_model(fixture_path(name)).unet.requires_grad_(False)
inject_adapter_in_model(adapter_config("lora", settings.rank, settings.alpha, 0.0, UNET_TARGETS["attention"]), unet)
if checkpointing:
    unet.enable_gradient_checkpointing()
config, side = planner.info.unet_config, resolution // 8
added = None
if config.get("addition_embed_type") == "text_time":
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    added = {"text_embeds": torch.zeros(2, pooled), "time_ids": torch.zeros(2, 6)}

def step():
    latents = torch.zeros(2, 4, side, side)
    hidden = torch.zeros(2, 77, config["cross_attention_dim"])
    prediction = unet(latents, torch.zeros(2, dtype=torch.long), hidden, added_cond_kwargs=added).sample
    (prediction.float() - torch.zeros_like(latents)).square().mean().backward()

step()  # kernels and caches set up once, outside the measured step
for p in unet.parameters():
    p.grad = None
gc.collect()
meter = PeakMeter("cpu")
step()
print(traced / 2**20, meter.peak() / 2**20)
'''


def _memory_line(output: str) -> tuple[float, float]:
    """(measured, predicted) bytes from a run's 'memory: measured X, predicted Y' line."""
    match = re.search(r"memory: measured ([\d.]+) (MiB|GiB), predicted ([\d.]+) (MiB|GiB)", output)
    assert match, output[-3000:]
    return float(match[1]) * UNITS[match[2]], float(match[3]) * UNITS[match[4]]


@pytest.mark.parametrize("fixture, resolution, steps, photos", [
    ("sd1-tiny", 64, 4, (80, 72)),
    ("sdxl-tiny", 128, 4, (80, 72)),  # two text encoders, two tokenizers
    # Full-size SD1.5 at 512 px with the frozen-model prior: the training step (two rows with
    # gradients, one without), not loading (5.97 GiB), is the predicted peak: 7.12 GiB, of which
    # 3.1 GiB activations. One step: 11 minutes on one (shared) core of the 2-core CI machine.
    ("sd15-full", 512, 1, (560, 520)),
])
def test_predicted_peak_is_within_15_percent_of_the_measured_one(tmp_path, fixture, resolution, steps, photos):
    """Measured as the module's docstring says; the run's own report line is read."""
    folder = make_photos(tmp_path / "photos", size=photos)
    command = CLI + ["train", "--base", str(fixture_path(fixture)), "--instance-dir", str(folder), "--output",
                     str(tmp_path / "out.safetensors"), "--resolution", str(resolution), "--steps", str(steps),
                     "--save-every", "0", "--prior-preservation", "base_model", "--rank", "4", "--alpha", "4"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if fixture.endswith("-tiny"):  # the CPU constants, a third of a tiny run, were measured with one thread
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    measured, predicted = _memory_line(result.stdout + result.stderr)
    assert abs(measured / predicted - 1) <= ACCURACY, (measured / 2**20, predicted / 2**20)
    assert Path(tmp_path / "out.safetensors").is_file()

"""Training: seconds per step, time to first step, per-step overhead and peak memory of our
trainer against a plain diffusers DreamBooth-LoRA loop, on the same model and settings.

    .venv/bin/python bench/train.py                                   # full-size SD1.5, 256 px, CPU
    .venv/bin/python bench/train.py --fixture sdxl-full --resolution 1024 --mixed-precision bf16
    .venv/bin/python bench/train.py --memory                          # + gradient checkpointing

The reference is the loop of diffusers' examples/dreambooth/train_dreambooth_lora.py reduced to
its core, with --with_prior_preservation: every step encodes the instance and the class image
with the VAE and both captions with the text encoder(s), concatenates them into one batch, one
UNet forward/backward, `mse(instance) + λ·mse(prior)`, one AdamW step. Ours runs twice: with
latent caching (its default) and without. Same model file, LoRA (rank, alpha, attention
targets), batch (1 instance + 1 class image), resolution, precision, seed.

Each side runs in its own process (so its peak memory is its own), loads the model from the
file, and reports:
  s/step          median over the steps after --warmup (the device is synchronised at every
                  step end, so each step's wall time is its own)
  first step      seconds from the start of loading to the end of the first step (load,
                  caching, first step)
  UNet share      the part of a step spent inside the UNet's forward and backward (timed at
                  their boundaries); 1 - share is the per-step overhead: data, text, VAE,
                  optimizer, logging, checkpoint saves
  peak memory     peak allocated VRAM on CUDA, peak RSS on the CPU

Not a test: it prints a table and ends with the ratios against the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("reference", "ours-cached", "ours-uncached")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="sd15-full", help="Random-weight fixture to train on (sd15-full, "
                        "sdxl-full, sd1-tiny, ...). Default: sd15-full.")
    parser.add_argument("--base", help="A checkpoint file instead of a fixture.")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="Steps per run, warm-up included.")
    parser.add_argument("--warmup", type=int, default=2, help="First steps not counted.")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--memory", action="store_true", help="The memory configuration: gradient checkpointing "
                        "and, on CUDA, bf16 (fp16 where bf16 is missing).")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"Which runs (default: {','.join(SIDES)}).")
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory:
        args.gradient_checkpointing = True
    return args


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory and args.device == "cuda" and args.mixed_precision == "no":
        args.mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if args.device == "cpu":
        args.mixed_precision = "no"
    return args


def make_images(folder: Path, count: int, size: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


class Timer:
    """Times the UNet's forward and backward passes at their boundaries (synchronising CUDA
    there, so the overhead is, if anything, over-counted)."""

    def __init__(self, device: str):
        self.device, self.inside = device, 0.0

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def wrap(self, function):
        def timed(*a, **k):
            self.sync()
            started = time.perf_counter()
            out = function(*a, **k)
            self.sync()
            self.inside += time.perf_counter() - started
            return out
        return timed


def worker(args: argparse.Namespace) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from dreambooth_lora.fixtures.checkpoints import fixture_path

    base_path = args.base or str(fixture_path(args.fixture))
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    photos = make_images(work / "photos", 4, args.resolution, 0)
    classes = make_images(work / "class", 4, args.resolution, 1)
    timer = Timer(args.device)
    # Count the UNet's own forward and every backward pass (only the adapter needs gradients,
    # so a backward pass is the UNet's backward).
    UNet2DConditionModel.forward = timer.wrap(UNet2DConditionModel.forward)
    torch.Tensor.backward = timer.wrap(torch.Tensor.backward)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    marks, insides = [], []

    def on_step(_row=None) -> None:
        timer.sync()
        marks.append(time.perf_counter())
        insides.append(timer.inside)

    if args.worker == "reference":
        reference_loop(args, base_path, photos, classes, on_step)
    else:
        from dreambooth_lora.trainer.job import TrainJob
        from dreambooth_lora.trainer.loop import train

        options = {"resolution": args.resolution, "steps": args.steps, "rank": args.rank, "alpha": args.rank,
                   "prior_preservation": "class_images", "save_every": 0, "learning_rate": 1e-4,
                   "max_grad_norm": 1.0, "mixed_precision": args.mixed_precision, "seed": 0,
                   "gradient_checkpointing": args.gradient_checkpointing,
                   "cache_latents": args.worker == "ours-cached", "instance_prompt": "a photo of sks dog",
                   "class_prompt": "a photo of a dog"}
        job = TrainJob(base=base_path, output=str(work / "bench.safetensors"), instance_dir=str(photos),
                       class_dir=str(classes), options=options)
        train(job, on_step=on_step)
    steps = [b - a for a, b in zip(marks, marks[1:])][args.warmup - 1:]
    unet = [b - a for a, b in zip(insides, insides[1:])][args.warmup - 1:]
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"side": args.worker, "step_s": statistics.median(steps), "steps_s": steps,
            "first_step_s": marks[0] - started, "unet_share": sum(unet) / sum(steps), "peak_bytes": peak}


def reference_loop(args, base_path: str, photos: Path, classes: Path, on_step) -> None:
    """diffusers' train_dreambooth_lora.py (SD1/SD2) and train_dreambooth_lora_sdxl.py (SDXL) with
    --with_prior_preservation, reduced to the loop."""
    import numpy as np
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image

    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.runtime.text import encode_text

    device = torch.device(args.device)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    base = load_base_model(base_path, dtype="fp32" if weight_dtype == torch.float32 else "fp16", device=args.device)
    unet, vae, encoders, tokenizers = base.unet, base.vae, base.text_encoders, base.tokenizers
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    # The SD1/SD2 script casts the VAE to the weight dtype; the SDXL one keeps it in fp32 (its fp16 overflows).
    vae.to(dtype=torch.float32 if base.family == "sdxl" else weight_dtype)
    for encoder in encoders:
        encoder.to(dtype=weight_dtype)
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()  # cast_training_params: the LoRA trains in fp32
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler("cuda") if weight_dtype == torch.float16 else None
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    scheduler = base.noise_scheduler

    def pixels(folder: Path) -> list:
        return [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)
                for p in sorted(folder.glob("*.png"))]

    instance_images, class_images = pixels(photos), pixels(classes)
    size = args.resolution
    for step in range(args.steps):
        batch = torch.stack([instance_images[step % 4], class_images[step % 4]]).to(device)
        with torch.no_grad():
            latents = vae.encode(batch.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
            hidden, pooled = encode_text(base.family, tokenizers, encoders, ["a photo of sks dog", "a photo of a dog"],
                                         device)
        latents = latents.to(weight_dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,), device=device)
        added = None
        if base.family == "sdxl":
            added = {"text_embeds": pooled, "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2,
                                                                      device=device, dtype=weight_dtype)}
        with autocast:
            prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden,
                              added_cond_kwargs=added).sample
        instance_pred, prior_pred = prediction.float().chunk(2)
        instance_target, prior_target = noise.float().chunk(2)
        loss = torch.nn.functional.mse_loss(instance_pred, instance_target) + \
            torch.nn.functional.mse_loss(prior_pred, prior_target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        on_step()


def main() -> None:
    args = parse_args()
    if args.worker:
        resolve(args)
        result = worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    resolve(args)
    sides = [s for s in args.sides.split(",") if s]
    results = {}
    for side in sides:
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", side]
        begun = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            print(f"{side}: failed (exit {run.returncode})\n{run.stderr[-3000:]}", file=sys.stderr)
            continue
        results[side] = json.loads(lines[-1][7:])
        print(f"{side}: done in {time.perf_counter() - begun:.0f} s", file=sys.stderr)

    import torch

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device} "
          f"({gpu})")
    print(f"model: {args.base or args.fixture}, {args.resolution}px, batch 1 instance + 1 class image (prior "
          f"preservation), LoRA rank {args.rank} on attention, precision {args.mixed_precision}, gradient "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}; {args.steps} steps per run, first "
          f"{args.warmup} not counted")
    memory = "peak VRAM GB" if args.device == "cuda" else "peak RSS GB"
    print(f"{'':<16} {'s/step':>9} {'vs ref':>7} {'first step s':>13} {'UNet share':>11} {memory:>13}")
    reference = results.get("reference")
    for side, r in results.items():
        ratio = f"{r['step_s'] / reference['step_s']:.3f}" if reference else "-"
        print(f"{side:<16} {r['step_s']:>9.3f} {ratio:>7} {r['first_step_s']:>13.1f} {r['unet_share']:>11.1%} "
              f"{r['peak_bytes'] / 1e9:>13.2f}")
    if reference:
        for side, r in results.items():
            if side != "reference":
                print(f"{side}: step time {r['step_s'] / reference['step_s']:.3f}x the reference's, peak memory "
                      f"{r['peak_bytes'] / reference['peak_bytes']:.3f}x, per-step overhead outside the UNet "
                      f"{1 - r['unet_share']:.1%} (reference {1 - reference['unet_share']:.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()

"""Training speed: seconds per step of our trainer against a plain diffusers LoRA loop.

    .venv/bin/python bench/train.py [--base CKPT] [--steps 8] [--resolution 256] [--rank 16]

Same model (the full-size random SD1.5 fixture by default), same LoRA (rank, alpha, attention
targets), batch 1, resolution, AdamW at 1e-4, no prior preservation. The reference is the loop
of diffusers' examples/dreambooth/train_dreambooth_lora.py reduced to its core: every step
encodes the image with the VAE and the prompt with the text encoder, adds noise, one UNet
forward/backward, one optimizer step. Ours runs twice: with latent caching (its default) and
without. The first two steps of every run are warm-up and not counted; medians are compared.
Not a test: it prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="Checkpoint (default: the full-size random SD1.5 fixture).")
    parser.add_argument("--steps", type=int, default=8, help="Steps per run (the first 2 are not counted).")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    from peft import inject_adapter_in_model

    from dreambooth_lora.fixtures.checkpoints import fixture_path
    from dreambooth_lora.models.core import load_base_model
    from dreambooth_lora.trainer import core

    base_path = args.base or str(fixture_path("sd15-full"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    photos = Path(tempfile.mkdtemp()) / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((args.resolution, args.resolution, 3)) * 255).astype(np.uint8)).save(photos / f"{i}.png")
    pristine = load_base_model(base_path, device=str(device))
    options = {"resolution": args.resolution, "steps": args.steps, "rank": args.rank, "alpha": args.rank,
               "prior_preservation": "off", "save_every": 0, "learning_rate": 1e-4, "max_grad_norm": 1.0}

    def ours(cache: bool) -> list[float]:
        out = Path(tempfile.mkdtemp()) / "bench.safetensors"
        job = core.TrainJob(base=base_path, output=str(out), instance_dir=str(photos), base_model=copy.deepcopy(pristine),
                            options={**options, "cache_latents": cache})
        log = core.train(job).log
        return [b["seconds"] - a["seconds"] for a, b in zip(log, log[1:])][1:]

    def reference() -> list[float]:
        base = copy.deepcopy(pristine)
        unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoders[0], base.tokenizers[0]
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
        inject_adapter_in_model(core.adapter_config(core.ALL_OPTIONS.values(options), core.UNET_TARGETS["attention"]), unet)
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        scheduler = base.noise_scheduler
        images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)
                  for p in sorted(photos.glob("*.png"))]
        times = []
        for step in range(args.steps):
            started = time.perf_counter()
            pixels = images[step % len(images)][None].to(device)
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                ids = tokenizer(["a photo of sks dog"], padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(device)
                hidden = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
            prediction = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return times[2:]

    runs = {"diffusers loop": reference(), "ours (cached latents)": ours(True), "ours (no cache)": ours(False)}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {device}")
    print(f"model: {base_path} ({pristine.family}), {args.resolution}px, batch 1, LoRA rank {args.rank} on attention, "
          f"{args.steps} steps per run (first 2 not counted)")
    reference_median = statistics.median(runs["diffusers loop"])
    print(f"{'':<24} {'median s/step':>14} {'speed vs diffusers':>19}")
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"{name:<24} {median:>14.3f} {reference_median / median:>18.3f}x")


if __name__ == "__main__":
    main()

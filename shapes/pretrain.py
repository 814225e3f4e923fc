"""Pretrain the built-in base model: a miniature Stable Diffusion 1.x of the shapes world.

    python -m dreambooth_lora.shapes.pretrain --out NEW.safetensors

(The shipped file was made by this recipe in two commands — the VAE, its whole-scene decoder
polish and 6000 UNet steps, then 2000 more UNet steps with offset noise; the exact commands,
times and machine are in its ``shapes.pretraining`` metadata and in bench/RESULTS.md.)

The result has the SD1.x architecture end to end — AutoencoderKL, CLIP text encoder with the
real CLIP tokenizer, UNet2DConditionModel with cross-attention — at small widths, and is
written as one single-file checkpoint in the real SD1.5 key layout, so every part of the
pack (loader, trainer, exporter, sampler, ComfyUI) treats it like any SD1.5 file.

Three phases, each seeded:
1. the VAE learns to reconstruct scenes, patterned objects included (a real VAE has seen
   everything; the UNet has not), on object-weighted 32 px crops with an edge term (stripes, rims
   and dots are what a plain MSE gives up first); its latents are rescaled inside its own weights
   so SD's scaling factor 0.18215 gives them unit spread, and its decoder is polished on whole
   64 px scenes (pretrain_vae.py);
2. the text encoder and UNet learn together on *solid* objects only, with captions whose colour
   and background parts are dropped at random (so ``a photo of a circle`` — a class prompt — is
   meaningful) and 10 % empty captions (for classifier-free guidance), Min-SNR-γ weighting and
   offset noise; an EMA of the weights is what ships;
3. the file is written (fp16, ModelSpec metadata with the command, time and machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.families import family_config
from ..models.load import load_base_model, make_tokenizer, noise_scheduler
from ..models.save import to_single_file
from ..runtime.files import write_safetensors
from ..runtime.text import encode_ids
from . import base_path, world
from .judge import to_pixels
from .pretrain_vae import fold_latent_scale, polish_decoder, reconstruction_fidelity, say, train_vae

FAMILY = "sd1"
SCALING = 0.18215  # SD1's VAE scaling factor: the loader uses the family's value
TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "projection_dim": 64, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
              "block_out_channels": [32, 32, 64], "down_block_types": ["DownEncoderBlock2D"] * 3,
              "up_block_types": ["UpDecoderBlock2D"] * 3, "norm_num_groups": 32, "sample_size": world.SIZE,
              "scaling_factor": SCALING}
# Cross-attention at 8×8 and 4×4 only: what the prompts decide (class, colour, background) is
# global, and attention over the 16×16 level would cost 2.6× the step time on a CPU.
UNET_CONFIG = {"block_out_channels": [32, 64, 128], "layers_per_block": 1, "attention_head_dim": 8,
               "cross_attention_dim": TEXT_CONFIG["hidden_size"], "sample_size": world.SIZE // 4,
               "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


def build_modules(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    spec = family_config(FAMILY)
    vae = AutoencoderKL.from_config({**spec["vae"], **VAE_CONFIG})
    unet = UNet2DConditionModel.from_config({**spec["unet"], **UNET_CONFIG})
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return vae, unet, text


def load_modules(path: Path):
    """The VAE, UNet and text encoder of a shapes checkpoint (fp32), and its pretraining record."""
    base = load_base_model(path, dtype="fp32")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        record = json.loads((handle.metadata() or {}).get("shapes.pretraining", "{}"))
    return base.vae, base.unet, base.text_encoders[0], record


# --- phase 2: text encoder + UNet ----------------------------------------------------------


def caption_variants(scene: world.Scene) -> list[str]:
    return [scene.caption(True, True), scene.caption(True, False), scene.caption(False, True),
            scene.caption(False, False), ""]


def train_diffusion(vae, unet, text, steps: int, seed: int, batch: int = 32, pool: int = 24000,
                    lr: float = 5e-4, ema_decay: float = 0.999, min_snr_gamma: float = 5.0, noise_offset: float = 0.0,
                    on_checkpoint=None, every: int = 1000) -> dict:
    rng = random.Random(f"unet:{seed}")
    scenes = [world.random_scene(rng) for _ in range(pool)]
    started = time.perf_counter()
    latents = []
    with torch.no_grad():
        for start in range(0, pool, 500):
            pixels = to_pixels(world.render_many(scenes[start:start + 500]))
            latents.append(vae.encode(pixels).latent_dist.mean * SCALING)
    latents = torch.cat(latents)
    tokenizer = make_tokenizer("<|endoftext|>")
    variants = [caption_variants(s) for s in scenes]
    # Pick weights: full caption most often; the bare class prompt and the empty one regularly.
    choice_weights = torch.tensor([0.5, 0.12, 0.12, 0.16, 0.10])
    say(f"encoded {pool} scenes in {time.perf_counter() - started:.0f} s; latent std {float(latents.std()):.3f}")
    unique = sorted({c for v in variants for c in v})
    ids_of = dict(zip(unique, tokenizer(unique, padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids))
    scheduler = noise_scheduler(FAMILY, "epsilon")
    alphas = scheduler.alphas_cumprod
    parameters = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW([{"params": list(unet.parameters()), "weight_decay": 1e-2},
                                   # no decay on the text encoder: rows of tokens never seen must keep their size
                                   {"params": list(text.parameters()), "weight_decay": 0.0}], lr=lr)
    ema = [p.detach().clone() for p in parameters]
    generator = torch.Generator().manual_seed(seed)
    unet.train(), text.train()
    losses = []
    for step in range(steps):
        warm = min(1.0, (step + 1) / 500)
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        index = torch.randint(pool, (batch,), generator=generator)
        picks = torch.multinomial(choice_weights, batch, replacement=True, generator=generator)
        ids = torch.stack([ids_of[variants[i][p]] for i, p in zip(index.tolist(), picks.tolist())])
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        if noise_offset:
            # Offset noise (Guttenberg, 2023): SD's schedule leaves the mean of a latent almost
            # untouched at t = T, so without this a sampler started from zero-mean noise cannot
            # move it, and at 16×16 the mean *is* the solid background's colour.
            noise = noise + noise_offset * torch.randn((batch, x0.shape[1], 1, 1), generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context, _ = encode_ids(FAMILY, [text], [ids])
        prediction = unet(noisy, t, encoder_hidden_states=context).sample
        # Min-SNR-γ (Hang et al., 2023): the nearly clean timesteps, easy and many, stop
        # outweighing the noisy ones where class, colour and background are decided.
        snr = a.view(-1) / (1 - a.view(-1))
        weight = snr.clamp(max=min_snr_gamma) / snr if min_snr_gamma else torch.ones_like(snr)
        loss = (F.mse_loss(prediction, noise, reduction="none").mean((1, 2, 3)) * weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in parameters], 1 - decay)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            say(f"unet {step:6d}/{steps} loss {np.mean(losses[-200:]):.4f} ({time.perf_counter() - started:.0f} s)")
        if on_checkpoint is not None and (step + 1) % every == 0 and step + 1 < steps:
            with swapped_in(parameters, ema):
                on_checkpoint(step + 1, {"unet_steps": step + 1, "unet_final_loss": float(np.mean(losses[-500:]))})
    with torch.no_grad():
        for p, e in zip(parameters, ema):
            p.copy_(e)
    unet.eval(), text.eval()
    return {"unet_steps": steps, "unet_batch": batch, "unet_lr": lr, "unet_min_snr_gamma": min_snr_gamma,
            "unet_noise_offset": noise_offset, "unet_final_loss": float(np.mean(losses[-500:])),
            "unet_seconds": round(time.perf_counter() - started, 1)}


@contextmanager
def swapped_in(parameters: list, values: list):
    """Run with ``values`` (the EMA) in the parameters, then put the trained ones back."""
    saved = [p.detach().clone() for p in parameters]
    with torch.no_grad():
        for p, v in zip(parameters, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(parameters, saved):
                p.copy_(v)


# --- phase 3: the file ---------------------------------------------------------------------


def write_checkpoint(vae, unet, text, path: Path, record: dict) -> Path:
    states = {"unet": unet.state_dict(), "vae": vae.state_dict(),
              "text_encoder": {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}}
    texts = [dict(e) for e in family_config(FAMILY)["text_encoders"]]
    for entry in texts:
        entry["config"] = {**entry["config"], **TEXT_CONFIG}
    configs = {"unet": unet.config, "vae": vae.config, "text_encoders": texts}
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in to_single_file(states, configs).items()}
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
                "modelspec.title": "shapes world SD1 miniature", "modelspec.resolution": f"{world.SIZE}x{world.SIZE}",
                "modelspec.description": "A miniature Stable Diffusion 1.x pretrained on the procedural shapes world "
                                         "(dreambooth_lora.shapes). Built by shapes/pretrain.py.",
                "shapes.pretraining": json.dumps(record, sort_keys=True)}
    return write_safetensors(path, tensors, metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_lora.shapes.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=base_path(), help="the checkpoint to write")
    parser.add_argument("--vae-steps", type=int, default=3000, help="VAE optimizer steps (batch 32 crops of 32 px)")
    parser.add_argument("--unet-steps", type=int, default=6000, help="text encoder + UNet steps (batch 32)")
    parser.add_argument("--checkpoint-every", type=int, default=1000,
                        help="also write the file (EMA weights so far) every N UNet steps, to watch progress")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="continue from this shapes checkpoint (its VAE is kept as it is; "
                                                    "the text encoder and UNet train --unet-steps more)")
    parser.add_argument("--polish-steps", type=int, default=500,
                        help="decoder-only steps on mean latents (the pixels of 8 whole scenes a step)")
    parser.add_argument("--polish-crop", type=int, default=64, choices=(32, 64),
                        help="polish on whole 64 px scenes (GroupNorm then sees the statistics it decodes with) "
                             "or 32 px crops (what the VAE phase trains on)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the text encoder + UNet")
    parser.add_argument("--min-snr-gamma", type=float, default=5.0, help="Min-SNR-γ loss weighting (0 = off)")
    parser.add_argument("--noise-offset", type=float, default=0.1,
                        help="offset noise of the UNet phase (0 = off): lets the sampler set a solid background's colour")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    vae, unet, text = build_modules(args.seed)
    earlier: dict = {}
    if args.init:
        vae, unet, text, earlier = load_modules(args.init)
    record = {"command": "python -m dreambooth_lora.shapes.pretrain " + " ".join(argv if argv is not None else sys.argv[1:]),
              "seed": args.seed, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d")}
    if args.init:
        record["continued_from"] = earlier  # the record of the run it continues (nested if that one continued)
    else:
        record.update(train_vae(vae, args.vae_steps, args.seed))
        rng = random.Random(f"scale:{args.seed}")
        probe = to_pixels(world.render_many([world.random_scene(rng) for _ in range(512)]))
        record["latent_fold"] = round(fold_latent_scale(vae, probe), 4)
    def on_checkpoint(step: int, progress: dict) -> None:
        path = write_checkpoint(vae, unet, text, args.out, {**record, **progress, "partial": True})
        say(f"wrote {path} at step {step}")
    if args.polish_steps:
        record.update(polish_decoder(vae, args.polish_steps, args.seed, crop=args.polish_crop))
    if args.unet_steps:
        record.update(train_diffusion(vae, unet, text, args.unet_steps, args.seed, lr=args.lr,
                                      min_snr_gamma=args.min_snr_gamma, noise_offset=args.noise_offset,
                                      on_checkpoint=on_checkpoint, every=args.checkpoint_every))
    record["vae_fidelity"] = reconstruction_fidelity(vae)
    say(f"VAE fidelity: {json.dumps(record['vae_fidelity'])}")
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    path = write_checkpoint(vae, unet, text, args.out, record)
    say(json.dumps(record, indent=1))
    say(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Phase 1 of pretraining the shapes base (``pretrain.py``): the autoencoder.

It learns to reconstruct 64 px scenes, patterned objects included (a real VAE has seen
everything; the UNet has not), on object-weighted 32 px crops; its latents are then rescaled
inside its own weights so SD's scaling factor gives them unit spread, and its decoder is polished
on whole scenes. ``reconstruction_fidelity`` is the measure the shapes world asks of it.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .judge import Judge, to_pixels


def say(text: str) -> None:
    print(text, flush=True)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE + ½·L1, weighted towards the object (``weight``: 1 on the background, more on the
    object: the patterns that make a subject are a small part of the picture), plus an L1 on
    horizontal and vertical differences: a plain pixel loss is content with blurred stripes."""
    error = recon - target
    pixel = error * error + 0.5 * error.abs()
    pixel = (pixel * weight).mean() / weight.mean() if weight is not None else pixel.mean()
    edges = (error[..., :, 1:] - error[..., :, :-1]).abs().mean() + (error[..., 1:, :] - error[..., :-1, :]).abs().mean()
    return pixel + edges


def _masks(scenes: list) -> torch.Tensor:
    return torch.from_numpy(world.render_masks(scenes)).unsqueeze(1)


def _window(generator: torch.Generator, size: int) -> tuple[int, int]:
    """A random ``size`` px window of a 64 px scene, on the VAE's 4 px grid, so that the window's
    latents are the scene's latents cut to it (the autoencoder is convolutional)."""
    top, left = (torch.randint(0, (world.SIZE - size) // 4 + 1, (2,), generator=generator) * 4).tolist()
    return top, left


def _cut(tensor: torch.Tensor, top: int, left: int, size: int, per: int = 1) -> torch.Tensor:
    """The window of (N, C, H, W) ``tensor``, whose elements each cover ``per`` px."""
    return tensor[..., top // per:(top + size) // per, left // per:(left + size) // per]


OBJECT_WEIGHT = 4.0  # loss weight of object pixels against background ones


def fit(name: str, parameters: list, steps: int, lr: float, loss_of_step, warmup: int = 0) -> list[float]:
    """AdamW (no weight decay) on ``loss_of_step()``: a linear warm-up, then a cosine decay to 0."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    started, losses = time.perf_counter(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / (warmup + 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = loss_of_step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            say(f"{name} {step:5d}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.perf_counter() - started:.0f} s)")
    return losses


def train_vae(vae, steps: int, seed: int, batch: int = 32, crop: int = 32, pool: int = 6000, lr: float = 2e-3) -> dict:
    """On random 32 px crops (a quarter of the pixels of a 64 px scene per sample, so four times the
    samples for the same time), scenes of ``mixed_look``: half solid, half patterned."""
    rng = random.Random(f"vae:{seed}")
    scenes = [world.random_scene(rng, world.mixed_look(rng, i)) for i in range(pool)]
    images, weights = to_pixels(world.render_many(scenes)), 1 + (OBJECT_WEIGHT - 1) * _masks(scenes)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    started = time.perf_counter()

    def loss_of_step() -> torch.Tensor:
        index = torch.randint(len(images), (batch,), generator=generator)
        top, left = _window(generator, crop)
        x, w = _cut(images[index], top, left, crop), _cut(weights[index], top, left, crop)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        return reconstruction_loss(recon, x, w) + 1e-6 * posterior.kl().mean()

    # cosine decay: sharp edges need the small steps at the end
    fit("vae", list(vae.parameters()), steps, lr, loss_of_step, warmup=100)
    vae.eval()
    return {"vae_steps": steps, "vae_batch": f"{batch} crops of {crop} px", "vae_lr": lr,
            "vae_seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def reconstruction_fidelity(vae, seed: int = 1, per_subject: int = 24) -> dict:
    """What the issue measures a VAE by: the judge's look cosine between renders and their
    reconstructions (mean over each subject's held-out photos, and over random patterned looks),
    and the reconstruction MSE in [-1, 1] units."""
    judge = Judge.load()
    rng = random.Random(f"fidelity:{seed}")
    groups = {name: subject.scenes(per_subject, 1000 + seed) for name, subject in world.SUBJECTS.items()}
    groups["random looks"] = [world.random_scene(rng, world.random_look(rng)) for _ in range(4 * per_subject)]
    out = {}
    for name, scenes in groups.items():
        renders = world.render_many(scenes)
        pixels = to_pixels(renders)
        recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
        decoded = ((recon.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        cosine = F.cosine_similarity(judge.looks(renders), judge.looks(decoded))
        out[name] = {"look_cosine": round(float(cosine.mean()), 3), "mse": round(float(F.mse_loss(recon, pixels)), 5)}
    return out


@torch.no_grad()
def fold_latent_scale(vae, images: torch.Tensor) -> float:
    """Rescale the VAE's latent space inside its weights so that latents × 0.18215 have unit
    standard deviation — the contract SD's scaling factor stands for. The encoder's mean
    channels are multiplied by k, its log-variance shifted by 2 ln k, and the decoder's first
    layer divided by k: the same autoencoder, measured in other units."""
    spread = float(torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)]).std())
    k = (1.0 / vae.config.scaling_factor) / spread
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= k
    vae.quant_conv.bias[:channels] *= k
    vae.quant_conv.bias[channels:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


def polish_decoder(vae, steps: int, seed: int, crop: int = 64, scenes_per_step: int = 8, pool: int = 3000) -> dict:
    """Train the decoder alone on the encoder's *mean* latents — what it decodes in use (the
    trainer caches means; samples are denoised latents) — without the sampling noise it was
    first trained under. The encoder is untouched, so latents (and a UNet trained on them) stay
    valid: this can run before, after or beside phase 2. Each step decodes the pixels of
    ``scenes_per_step`` whole scenes, cut into ``crop`` px windows."""
    batch = scenes_per_step * (world.SIZE // crop) ** 2
    rng = random.Random(f"polish:{seed}")
    scenes = [world.random_scene(rng, world.mixed_look(rng, i)) for i in range(pool)]
    images, weights = to_pixels(world.render_many(scenes)), 1 + (OBJECT_WEIGHT - 1) * _masks(scenes)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 250]).latent_dist.mean for i in range(0, pool, 250)])
        before = float(F.mse_loss(vae.decode(latents[:128]).sample, images[:128]))
    parameters = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    vae.train()

    def loss_of_step() -> torch.Tensor:
        index = torch.randint(pool, (batch,), generator=generator)
        top, left = _window(generator, crop)
        x, w = _cut(images[index], top, left, crop), _cut(weights[index], top, left, crop)
        z = _cut(latents[index], top, left, crop, per=4)
        return reconstruction_loss(vae.decode(z).sample, x, w)

    fit("decoder", parameters, steps, 5e-4, loss_of_step, warmup=50)
    vae.eval()
    with torch.no_grad():
        after = float(F.mse_loss(vae.decode(latents[:128]).sample, images[:128]))
    return {"polish_steps": steps, "polish_batch": f"{batch} crops of {crop} px", "decoder_mse_before": round(before, 5),
            "decoder_mse_after": round(after, 5), "polish_seconds": round(time.perf_counter() - started, 1)}

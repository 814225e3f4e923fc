"""One training step's arithmetic: caption embeddings, the joint forward pass over instance and
prior rows and its loss, and the optimizer that applies it.

Randomness of a step (noise, timesteps) is drawn on the CPU from the step's own generator, so
the numbers are the same on any device and after a resume.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..data.masks import loss_weights
from ..errors import UserError
from ..models.families import FAMILIES
from ..runtime.peft import adapters_disabled
from ..runtime.text import encode_text, sdxl_time_ids
from .loss import LossParts, dreambooth_loss, target_for


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``. On CUDA from pinned memory and asynchronously: a plain
    copy from pageable memory waits for the GPU to finish all queued work, which would stall
    the loop once per step."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class CaptionEncoder:
    """Caption embeddings for the loop. While the text side trains they are computed every
    step through the trained encoders; while it is frozen each caption is encoded once and kept
    (``base_only``: with every adapter off, the frozen model's conditioning for its prior)."""

    def __init__(self, family: str, tokenizers: list, encoders: list, trained_encoders: list, device: torch.device):
        self.family, self.tokenizers, self.encoders = family, tokenizers, encoders
        self.trained_encoders, self.device = trained_encoders, device
        self.cache: dict[tuple[str, bool], tuple] = {}

    def __call__(self, texts: list[str], text_training: bool, base_only: bool = False):
        """(hidden states, SDXL pooled embeddings or None) of ``texts``, on the device."""
        if text_training and not base_only:
            return encode_text(self.family, self.tokenizers, self.trained_encoders, texts, self.device)
        missing = sorted({t for t in texts if (t, base_only) not in self.cache})
        if missing:
            home = next(self.encoders[0].parameters()).device  # the device they are on (offloaded or not)
            with torch.no_grad(), (adapters_disabled(*self.encoders) if base_only else nullcontext()):
                hidden, pooled = encode_text(self.family, self.tokenizers, self.encoders, missing, home)
            for i, text in enumerate(missing):
                self.cache[(text, base_only)] = (hidden[i].to(self.device),
                                                 None if pooled is None else pooled[i].to(self.device))
        hidden = torch.stack([self.cache[(t, base_only)][0] for t in texts])
        pooled = None if not FAMILIES[self.family].pooled_text else torch.stack([self.cache[(t, base_only)][1] for t in texts])
        return hidden, pooled

    def refresh(self, captions: list[str]) -> None:
        """The text side has just stopped training: encode every caption again, once, in one call
        (the same call whether or not the run was resumed, so the numbers are the same)."""
        for key in [k for k in self.cache if not k[1]]:
            del self.cache[key]
        self(captions, False)


@dataclass
class JointForward:
    """One joint forward pass over instance and prior rows, and its DreamBooth loss."""
    family: str
    prediction_type: str
    unet_run: Any  # the UNet as accelerate prepared it (a DDP wrapper on several ranks)
    unet: Any  # the UNet itself (for the frozen-model prior, adapters off)
    encoders: list
    noise_scheduler: Any
    alphas_cumprod: torch.Tensor
    device: torch.device
    weight_dtype: torch.dtype

    def predict(self, unet, rows: list[dict], latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                embed: CaptionEncoder, text_active: bool) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
        """(``unet``'s prediction, the noisy latents, SDXL's added conditioning) for ``rows``."""
        weight_dtype = self.weight_dtype
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden, pooled = embed([row["caption"] for row in rows], text_active)
        added = None
        if FAMILIES[self.family].pooled_text:  # SDXL: pooled text and size conditioning
            time_ids = to_device(torch.tensor([sdxl_time_ids(r["original_size"], r["crop_top_left"], r["target_size"])
                                               for r in rows], dtype=weight_dtype), self.device)
            added = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids}
        prediction = unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype), added_cond_kwargs=added).sample
        return prediction, noisy, added

    def loss(self, rows: list[dict], settings, embed: CaptionEncoder, text_active: bool,
             generator: torch.Generator) -> LossParts:
        device, weight_dtype = self.device, self.weight_dtype
        latents = torch.stack([row["latents"] for row in rows]).to(device)
        # Drawn on the CPU from the step's own generator, then copied without waiting for the GPU.
        noise = torch.randn(latents.shape, generator=generator)
        if settings.noise_offset > 0:
            noise = noise + settings.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
        noise = to_device(noise, device)
        timesteps = to_device(torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(rows),),
                                            generator=generator), device)
        prediction, noisy, added = self.predict(self.unet_run, rows, latents, noise, timesteps, embed, text_active)
        target = target_for(self.prediction_type, latents, noise, timesteps, self.alphas_cumprod)
        n_instance = sum(not row["prior"] for row in rows)
        if settings.prior_preservation == "base_model":
            # The frozen model's own prediction for the class prompt is the prior target.
            with torch.no_grad(), adapters_disabled(self.unet, *self.encoders):
                base_hidden, base_pooled = embed([row["caption"] for row in rows[n_instance:]], False, base_only=True)
                base_added = None if added is None else {"text_embeds": base_pooled.to(weight_dtype),
                                                         "time_ids": added["time_ids"][n_instance:]}
                frozen = self.unet(noisy[n_instance:].to(weight_dtype), timesteps[n_instance:],
                                   base_hidden.to(weight_dtype), added_cond_kwargs=base_added).sample
            target = torch.cat([target[:n_instance], frozen.float()])
        weights = mask_weights(rows, n_instance, settings.mask_floor, settings.mask_prior)
        return dreambooth_loss(prediction, target, timesteps, n_instance, self.alphas_cumprod, self.prediction_type,
                               settings.prior_weight, settings.loss, settings.huber_delta, settings.min_snr_gamma,
                               weights)


def mask_weights(rows: list[dict], n_instance: int, floor: float, prior_too: bool) -> torch.Tensor | None:
    """The rows' loss weights (N, 1, h, w), or None when no row is masked: 1 − (1 − floor)·(1 − mask)
    on masked rows (exactly 1 where the mask is 1), 1 elsewhere. Prior rows are weighted only
    with ``prior_too``."""
    masks = [row.get("mask") if (i < n_instance or prior_too) else None for i, row in enumerate(rows)]
    shaped = next((m for m in masks if m is not None), None)
    if shaped is None:
        return None
    ones = torch.ones_like(shaped)
    return torch.stack([ones if m is None else loss_weights(m, floor) for m in masks])


def make_optimizer(settings, groups: list[dict], device: torch.device):
    """The optimizer over the parameter groups (UNet adapter, text-encoder adapter, new tokens)."""
    name = settings.optimizer
    if name == "adamw":
        # One fused kernel for all adapter tensors on CUDA; the CPU keeps the default (foreach) path.
        return torch.optim.AdamW(groups, weight_decay=settings.weight_decay, fused=device.type == "cuda")
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional, CUDA only
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes` (CUDA only), "
                            "or use --optimizer adamw.") from None
        if device.type != "cuda":
            raise UserError("--optimizer adamw8bit runs on CUDA GPUs only; use --optimizer adamw on this machine.")
        return bnb.optim.AdamW8bit(groups, weight_decay=settings.weight_decay)
    try:
        from prodigyopt import Prodigy  # optional
    except ImportError:
        raise UserError("--optimizer prodigy needs `pip install prodigyopt`, or use --optimizer adamw.") from None
    return Prodigy(groups, weight_decay=settings.weight_decay)

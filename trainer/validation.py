"""The validation loss: the diffusion loss on validation photos at fixed timesteps and noise.

The training loss of a DreamBooth run is noise (a few images, one random timestep per step).
This one is measured on the same examples every time — each validation photo at five
timesteps spread over the schedule, each with its own fixed noise — so its curve shows over-
and under-fitting, and ``best --by validation_loss`` can choose a checkpoint without an
evaluator model. The examples follow from the seed alone and the adapter is restored exactly
on resume, so a resumed run measures exactly the numbers the uninterrupted one did.

Photos held out (``--validation-holdout K``) are never trained on; with very few photos the
training photos themselves are used (the log says which).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from .loss import per_sample_loss, target_for
from .step import mask_weights, to_device

TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # where on the schedule each photo is measured
CHUNK = 4  # examples per forward pass: fixed, so the numbers do not depend on the batch size


def split_holdout(instances, settings, say: Callable[[str], None]):
    """(photos to train on, validation photos or None when the validation loss is off)."""
    held = settings.validation_holdout
    if not settings.validation_loss_every:
        if held:
            raise UserError(f"validation_holdout: {held} photo(s) would be held out but validation_loss_every is 0 "
                            "(off); set --validation-loss-every N, or --validation-holdout 0.")
        return instances, None
    images = instances.images
    if not held:
        say(f"validation loss: every {settings.validation_loss_every} steps on the {len(images)} training photos at "
            "fixed timesteps and noise (no photo held out; --validation-holdout K holds K out)")
        return instances, instances
    if len(images) - held < 2:
        raise UserError(f"validation_holdout: holding out {held} of {len(images)} photos leaves "
                        f"{len(images) - held} to train on; hold out at most {max(0, len(images) - 2)}, or 0 to "
                        "measure on the training photos.")
    chosen = set(random.Random(f"{settings.seed}:holdout").sample(range(len(images)), held))
    kept = [item for i, item in enumerate(images) if i not in chosen]
    out = [item for i, item in enumerate(images) if i in chosen]
    names = ", ".join(Path(item.source).name if "/" in item.source else item.source for item in out)
    say(f"validation loss: every {settings.validation_loss_every} steps on {held} held-out photo(s) ({names}); "
        f"training on the other {len(kept)}")
    return dataclasses.replace(instances, images=kept), dataclasses.replace(instances, images=out, repeats=1)


def example_seed(seed: int, index: int, position: int) -> int:
    digest = hashlib.sha256(f"{seed}:validation:{index}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ValidationLoss:
    """The fixed validation examples (latents, masks, captions, timesteps, noise), built once
    while the VAE is still at hand, and their mean loss under the current adapter."""

    def __init__(self, photos, latents, forward, settings, make_caption: Callable[[str], str]):
        self.forward, self.settings = forward, settings
        num_train = forward.noise_scheduler.config.num_train_timesteps
        self.rows, self.noise, self.timesteps = [], [], []
        wanted = [(photos, index, photos.images[index].crop_box(None), False)  # centred window, not mirrored
                  for index in range(len(photos.images))]
        for index, (sample, meta) in enumerate(latents.get_many(wanted)):  # one VAE call when not cached
            row = {**meta, "latents": sample, "caption": make_caption(meta["caption"]), "prior": False}
            for position, fraction in enumerate(TIMESTEP_FRACTIONS):
                generator = torch.Generator().manual_seed(example_seed(settings.seed, index, position))
                self.rows.append(row)
                self.noise.append(torch.randn(sample.shape, generator=generator))
                self.timesteps.append(int(fraction * (num_train - 1)))

    @torch.no_grad()
    def __call__(self, embed, text_active: bool) -> float:
        forward, s = self.forward, self.settings
        modules = [forward.unet, *forward.encoders]
        modes = [(module, module.training) for module in modules]
        for module in modules:  # adapter dropout off: the same numbers every time
            module.eval()
        try:
            total = 0.0
            for start in range(0, len(self.rows), CHUNK):
                rows = self.rows[start:start + CHUNK]
                latents = torch.stack([row["latents"] for row in rows]).to(forward.device)
                noise = to_device(torch.stack(self.noise[start:start + CHUNK]), forward.device)
                timesteps = to_device(torch.tensor(self.timesteps[start:start + CHUNK]), forward.device)
                # the unwrapped UNet: every rank measures alike, without a DDP collective
                prediction, _, _ = forward.predict(forward.unet, rows, latents, noise, timesteps, embed, text_active)
                target = target_for(forward.prediction_type, latents, noise, timesteps, forward.alphas_cumprod)
                weights = mask_weights(rows, len(rows), s.mask_floor, False)
                total += per_sample_loss(prediction, target, s.loss, s.huber_delta, weights).double().sum().item()
        finally:
            for module, was_training in modes:
                module.train(was_training)
        return total / len(self.rows)

    def due(self, done: int, save_due: bool, last: bool) -> bool:
        """Every N steps, at each periodic checkpoint (so its record has one) and at the end."""
        every = self.settings.validation_loss_every
        return done % every == 0 or save_due or last

"""What each step trains on: the instance photos and class images, their VAE latents, and the
rows of every micro-batch.

Every choice is a function of (seed, position): which image, which crop window, whether it is
mirrored. A resumed run therefore draws exactly the rows the uninterrupted run drew, with no
saved generator state.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Callable

import torch

from ..data.core import IMAGE_SUFFIXES, fit, load_files, load_folder, size_conditioning, training_pixels
from ..data.masks import latent_mask
from ..data.options import DATA_OPTIONS
from ..errors import UserError
from ..priors.core import MANIFEST, generate_priors


def step_seed(seed: int, step: int, rank: int) -> int:
    """A per-(step, rank) seed: every random draw of a step follows from it, so a resumed run
    draws exactly what the uninterrupted one drew."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def epoch_order(seed: int, kind: str, epoch: int, size: int) -> list[int]:
    order = list(range(size))
    random.Random(f"{seed}:{kind}:{epoch}").shuffle(order)
    return order


def pick(seed: int, kind: str, position: int, size: int) -> int:
    """Item at global ``position`` of an endless sequence of shuffled epochs."""
    return epoch_order(seed, kind, position // size, size)[position % size]


# --- the images ---------------------------------------------------------------------------


def load_instances(job, settings, say: Callable[[str], None]):
    """The subject's photos: the job's in-memory dataset (ComfyUI) or its folder, checked now so
    that no file can fail mid-training."""
    if job.instance_dataset is not None:
        instances = job.instance_dataset
    elif job.instance_dir:
        instances = load_folder(job.instance_dir, settings.instance_prompt, settings.identifier,
                                settings.class_word, **settings.pick(DATA_OPTIONS))
    else:
        raise UserError("no instance images: pass --instance-dir DIR with 3-20 photos of the subject.")
    for source, why in instances.skipped:
        say(f"warning: skipped {source}: {why}")
    for source, what in instances.warnings:
        say(f"warning: {source}: {what}")
    masked = sum(item.mask is not None for item in instances.images)
    if masked:
        say(f"masks: {masked} of {len(instances.images)} photos; the loss off the subject is weighted "
            f"{settings.mask_floor:g} (--mask-floor)")
    return instances


def load_class_images(job, settings, base, accelerator):
    """Class images for the class_images mode: a folder of the user's own images, or cached
    priors generated (only the missing ones) into ``class_dir`` by the main process."""
    folder = Path(job.class_dir).expanduser()
    own = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder.is_dir() else []
    data_options = {**settings.pick(DATA_OPTIONS), "repeats": 1, "flip": settings.flip, "recursive": False}
    if own:
        # a class-prior cache entry itself (the demo passes one) holds our own earlier images
        kind = "class priors made earlier" if (folder / MANIFEST).is_file() else "of your own"
        accelerator.print(f"class images: {len(own)} {kind} in {folder} (none generated now)")
        paths = own
    else:
        if accelerator.is_main_process:
            result = generate_priors(base, job.base, folder, settings.num_class_images, settings.class_prompt,
                                     resolution=settings.resolution)
            accelerator.print(f"class images: {result.reused} reused, {result.generated} generated in {result.folder}")
        accelerator.wait_for_everyone()
        result = generate_priors(base, job.base, folder, settings.num_class_images, settings.class_prompt,
                                 resolution=settings.resolution)  # all present now: only resolves paths
        paths = result.paths
    return load_files(paths, settings.class_prompt, str(folder), **data_options)


# --- latents ------------------------------------------------------------------------------


class LatentSource:
    """VAE latents of dataset images, encoded once per (image, crop window, flip) and kept
    when caching is on (always the mean of the VAE's distribution, never a sample). The images
    of one micro-batch that are not cached are encoded together, in one VAE call."""

    def __init__(self, vae, device: torch.device, cache: bool):
        self.vae, self.device, self.cache = vae, device, cache
        self.store: dict[tuple, torch.Tensor] = {}
        self.masks: dict[tuple, torch.Tensor] = {}  # latent-grid masks, (1, h, w) on the device
        self.scaling = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        first = next(self.vae.parameters())
        latents = self.vae.encode(pixels.to(first.device, first.dtype)).latent_dist.mode()
        return ((latents - self.shift) * self.scaling).float().to(self.device)

    @staticmethod
    def window(dataset, index: int, rng: random.Random | None) -> tuple[int, int, int, int]:
        """The crop box of this use of the image (random crops draw it from ``rng``)."""
        return dataset.images[index].crop_box(rng if dataset.crop == "random" else None)

    def get(self, dataset, index: int, rng: random.Random | None, flip: bool) -> tuple[torch.Tensor, dict]:
        return self.get_many([(dataset, index, self.window(dataset, index, rng), flip)])[0]

    def get_many(self, wanted: list[tuple]) -> list[tuple[torch.Tensor, dict]]:
        """[(dataset, index, crop box, flip)] → [(latents on the device, size conditioning, caption
        and the latent-grid mask or None)]."""
        found: list[list] = []
        missing: list[tuple[int, tuple, torch.Tensor, bool]] = []
        for dataset, index, box, flip in wanted:
            item = dataset.images[index]
            key = (id(dataset), index, box, flip)
            meta = {**size_conditioning(item, box), "caption": item.caption, "mask": None}
            found.append([self.store.get(key), meta])
            if found[-1][0] is None:
                pixels = torch.from_numpy(training_pixels(item, box, flip))
                missing.append((len(found) - 1, key, pixels, self.cache and dataset.crop != "random"))
        if missing:
            encoded = self.encode(torch.stack([pixels for _, _, pixels, _ in missing]))  # kept on the device
            for (position, key, _, keep), latents in zip(missing, encoded):
                found[position][0] = latents
                if keep:
                    self.store[key] = latents
        for (dataset, index, box, flip), (latents, meta) in zip(wanted, found):
            mask = dataset.images[index].mask
            if mask is not None:
                key = (id(dataset), index, box, flip)
                grid = self.masks.get(key)
                if grid is None:
                    grid = torch.from_numpy(latent_mask(mask, box, flip, tuple(latents.shape[-2:])))[None].to(self.device)
                    if dataset.crop != "random":  # random windows would grow the store without end
                        self.masks[key] = grid
                meta["mask"] = grid
        return [(latents, meta) for latents, meta in found]

    def encode_all(self, instances, classes, say: Callable[[str], None]) -> bool:
        """With caching on, encode every latent the loop can ask for now, before the first step;
        True when the VAE is no longer needed inside the loop."""
        if not self.cache:
            return False
        if instances.crop == "random":
            say("note: random crops change every step, so instance latents are encoded each step (no cache).")
            return False
        self._encode_dataset(instances)
        if classes is None:
            return True
        sizes = {item.target_size for item in instances.images}
        if classes.crop != "random" and all(item.target_size in sizes for item in classes.images) and len(sizes) == 1:
            self._encode_dataset(classes)  # bucketed class images are cut on demand instead
            return True
        return False

    def _encode_dataset(self, dataset) -> None:
        for index in range(len(dataset.images)):
            for flip in ([False, True] if dataset.flip else [False]):
                self.get(dataset, index, None, flip)


# --- rows of a micro-batch ----------------------------------------------------------------


def micro_batch_rows(instances, classes, settings, position: int, batch: int, rng: random.Random,
                     latents: LatentSource) -> list[dict]:
    """The examples of one micro-batch: ``batch`` instance rows, then ``batch`` prior rows
    (class images, or with the frozen-model prior the instance latents under the class prompt).

    With buckets, every row takes the size of the first instance image drawn, so the batch
    stacks: further instance images come from the same bucket, class images are cut to it."""
    seed, prior_mode = settings.seed, settings.prior_preservation
    wanted, priors = [], []  # (dataset, index, crop box, flip) per row, drawn in row order
    first_size = None
    for b in range(batch):
        index = pick(seed, "instance", position + b, len(instances.images))
        if first_size is not None and instances.images[index].target_size != first_size:
            same = [i for i, item in enumerate(instances.images) if item.target_size == first_size]
            index = same[rng.randrange(len(same))]
        first_size = first_size or instances.images[index].target_size
        flip = instances.flip and rng.random() < 0.5
        wanted.append((instances, index, latents.window(instances, index, rng), flip))
        priors.append(False)
    if prior_mode == "class_images":
        for b in range(batch):
            index = pick(seed, "class", position + b, len(classes.images))
            item = classes.images[index]
            if item.target_size != first_size:
                refit(item, first_size)
            flip = classes.flip and rng.random() < 0.5
            wanted.append((classes, index, latents.window(classes, index, rng), flip))
            priors.append(True)
    rows = [{"latents": row_latents, **meta, "prior": prior}
            for (row_latents, meta), prior in zip(latents.get_many(wanted), priors)]
    if prior_mode == "base_model":
        for row in rows[:batch]:
            rows.append({**row, "caption": settings.class_prompt, "prior": True})
    return rows


def refit(item, size: tuple[int, int]) -> None:
    """Fit a (square) class image to an instance bucket, always from the image as loaded."""
    source = item.__dict__.setdefault("loaded_image", item.image)
    item.image, _ = fit(source, size)
    item.target_size = size

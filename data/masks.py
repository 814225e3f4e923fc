"""Loss masks: which pixels of a photo the training loss cares about (the subject).

With 3–20 photos the model learns the background and framing along with the subject; a mask
limits the instance loss to the subject, so the identity is learned and the contexts stay
free. A mask comes from ``<name>.mask.png`` beside the photo (white = subject), from the
photo's own transparency (opaque = subject), or in ComfyUI from a MASK batch (1 = subject).

Masks are kept at the photo's size, cut and mirrored with the same window as the pixels, and
averaged down to the latent grid (each latent cell gets the fraction of its pixels that are
subject). The loss weight of a cell is ``1 − (1 − floor)·(1 − m)``: exactly 1 where the mask
is 1, so an all-white mask trains exactly like no mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError

MASK_SUFFIX = ".mask"  # photo.png → photo.mask.png (any image suffix)
# EXIF orientation → the transposition that shows the photo upright (as ImageOps.exif_transpose does)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def is_mask_file(path: Path) -> bool:
    """``photo.mask.png``: a mask, never a photo of its own."""
    return path.stem.lower().endswith(MASK_SUFFIX)


def sidecar_mask(path: Path, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        for candidate in (path.with_name(path.stem + MASK_SUFFIX + suffix),
                          path.with_name(path.stem + MASK_SUFFIX + suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def read_sidecar(mask_path: Path, photo: Path, raw_size: tuple[int, int], orientation: int,
                 upright_size: tuple[int, int]) -> Image.Image:
    """The mask file as 8-bit gray at the photo's upright size, or a ``UserError`` naming it.
    A mask drawn on the stored (not yet EXIF-rotated) photo is rotated the same way."""
    try:
        with Image.open(mask_path) as handle:
            handle.load()
            mask = ImageOps.exif_transpose(handle).convert("L")
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{mask_path}: not a readable image ({str(err).splitlines()[0][:80]}); save the mask of "
                        f"{photo.name} as a black-and-white PNG (white = subject), or delete it.") from None
    if mask.size == upright_size:
        return mask
    if orientation in _UPRIGHT and mask.size == raw_size:
        return mask.transpose(_UPRIGHT[orientation])
    raise UserError(f"{mask_path}: the mask is {mask.size[0]}×{mask.size[1]} but {photo.name} is "
                    f"{upright_size[0]}×{upright_size[1]}; save the mask at the photo's size (white = subject).")


def alpha_mask(upright: Image.Image) -> Image.Image | None:
    """The photo's transparency as a mask (opaque = subject), or None when it has none."""
    if upright.mode == "P" and "transparency" in upright.info:
        upright = upright.convert("RGBA")
    if upright.mode not in ("RGBA", "LA", "PA"):
        return None
    alpha = upright.convert("RGBA").getchannel("A")
    return alpha if alpha.getextrema()[0] < 255 else None


def mask_from_array(array, source: str, size: tuple[int, int]) -> Image.Image:
    """One mask of a ComfyUI MASK batch (H×W floats, 1 = subject) as 8-bit gray."""
    values = np.asarray(array, dtype=np.float32)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise UserError(f"masks: the mask of {source} is not an H×W mask in [0, 1] (shape {values.shape}); "
                        "connect a MASK batch with one mask per photo.")
    if (values.shape[1], values.shape[0]) != size:
        raise UserError(f"masks: the mask of {source} is {values.shape[1]}×{values.shape[0]} but the photo is "
                        f"{size[0]}×{size[1]}; make the masks from the same images (same size).")
    return Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def describe(mask: Image.Image) -> tuple[str, str | None]:
    """(a note for the dataset report, a warning or None). Empty and all-white masks are
    usable but almost certainly not what was meant."""
    values = np.asarray(mask, dtype=np.float32) / 255.0
    covered = float(values.mean())
    if values.max() == 0:
        return "mask empty", "its mask is empty (all black): only the floor weight (--mask-floor) trains on it"
    if values.min() == 1:
        return "mask all white", "its mask is all white: it trains exactly as without a mask"
    return f"mask covers {covered:.0%}", None


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale a mask to its fitted photo's size (the photo's own resampling is for pictures)."""
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def latent_mask(mask: Image.Image, box: tuple[int, int, int, int], flip: bool, latent_size: tuple[int, int]) -> np.ndarray:
    """The mask cut to ``box`` (mirrored if ``flip``), averaged over each latent cell:
    float32 (h, w) in [0, 1]; ``latent_size`` is (h, w)."""
    window = mask.crop(box)
    if flip:
        window = ImageOps.mirror(window)
    values = np.asarray(window, dtype=np.float32) / 255.0
    h, w = latent_size
    if values.shape[0] % h == 0 and values.shape[1] % w == 0:  # exact area average (the usual case)
        cells = values.reshape(h, values.shape[0] // h, w, values.shape[1] // w)
        return cells.mean(axis=(1, 3)).astype(np.float32)
    return np.asarray(window.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0


def loss_weights(latent, floor: float):
    """Per-cell loss weight of a latent-grid mask (a numpy array or a torch tensor): 1 on the
    subject, ``floor`` off it, and exactly 1 where the mask is exactly 1 (1 − m is then 0)."""
    return 1.0 - (1.0 - floor) * (1.0 - latent)

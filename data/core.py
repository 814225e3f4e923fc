"""Instance images: read, check and normalise the few photos of the subject.

Every file is opened, decoded and converted when the dataset is built, so a bad file is
found (and skipped with a warning naming it) before training starts, never in the middle.
What was done to each image is recorded in plain words for the report.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError
from . import masks as masking

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
# Beyond this an image is refused before decoding: a 30000×30000 PNG would need 2.7 GB of RAM.
MAX_PIXELS = 64 * 1024 * 1024
_ORIENTATION_NOTES = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "rotated 90° and mirrored",
                      6: "rotated 90°", 7: "rotated 270° and mirrored", 8: "rotated 270°"}


class DatasetError(UserError):
    """No usable instance image, or a folder/batch that cannot be read."""


@dataclass
class InstanceImage:
    """One usable image: RGB, scaled so that it covers its target size, plus what was done."""

    source: str  # file path, or "image 3 of 8" for an in-memory batch
    caption: str
    image: Image.Image  # RGB, at least target_size in both directions
    target_size: tuple[int, int]  # (width, height) it is cropped to for training
    original_size: tuple[int, int]  # (width, height) as stored, before rotation
    notes: list[str] = field(default_factory=list)
    mask: Image.Image | None = None  # "L" at the size of ``image`` (255 = subject), or None: every pixel counts

    def crop_box(self, rng: random.Random | None) -> tuple[int, int, int, int]:
        """The training window: centred, or random when ``rng`` is given."""
        w, h = self.image.size
        tw, th = self.target_size
        left = rng.randint(0, w - tw) if rng else (w - tw) // 2
        top = rng.randint(0, h - th) if rng else (h - th) // 2
        return left, top, left + tw, top + th


@dataclass
class InstanceDataset:
    images: list[InstanceImage]
    skipped: list[tuple[str, str]]  # (source, why)
    resolution: int
    crop: str = "center"
    flip: bool = False
    repeats: int = 1
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (source, what): usable, but probably not meant

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def example(self, index: int, rng: random.Random | None = None) -> dict:
        """Training example ``index`` (repeats included): pixels in [-1, 1] as float32 CHW, the
        caption, and SDXL's size conditioning (original size, crop top-left, target size)."""
        item = self.images[index % len(self.images)]
        box = item.crop_box(rng if self.crop == "random" else None)
        flip = self.flip and rng is not None and rng.random() < 0.5
        return {"pixels": training_pixels(item, box, flip), "caption": item.caption, **size_conditioning(item, box)}

    def report(self) -> str:
        lines = [f"{len(self.images)} image(s) usable, {len(self.skipped)} skipped; training size "
                 f"{self.resolution}, crop {self.crop}, flip {'on' if self.flip else 'off'}, repeats {self.repeats}"]
        for item in self.images:
            name = Path(item.source).name if "/" in item.source or "\\" in item.source else item.source
            done = ", ".join(item.notes) if item.notes else "used as is"
            lines.append(f"  {name}: {done} → {item.target_size[0]}×{item.target_size[1]}; caption: {item.caption!r}")
        for source, why in self.skipped:
            lines.append(f"  skipped {source}: {why}")
        return "\n".join(lines)


# --- Buckets ------------------------------------------------------------------------


def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution² pixels, sides multiples of ``step``, aspect
    ratios up to ``max_ratio``:1 either way."""
    area = resolution * resolution
    sizes = set()
    width = step
    while width <= resolution * max_ratio:
        height = max(step, int(area / width) // step * step)
        if max(width / height, height / width) <= max_ratio:
            sizes.add((width, height))
        width += step
    return sorted(sizes)


def choose_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


# --- Reading one image --------------------------------------------------------------


def _describe_start(path: Path) -> str:
    with path.open("rb") as handle:
        start = handle.read(24)
    text = start.decode("utf-8", errors="replace")
    # "\ufffd" marks bytes that are not UTF-8; Python counts it as printable
    printable = sum((c.isprintable() or c.isspace()) and c != "\ufffd" for c in text)
    return f"it starts with {text.strip()!r}" if start and printable >= len(text) * 0.9 else "unknown content"


def open_image(path: Path) -> Image.Image:
    """Decode a file fully, or raise ``DatasetError`` saying what is wrong with it."""
    if path.stat().st_size == 0:
        raise DatasetError("empty file (0 bytes)")
    try:
        with Image.open(path) as handle:
            width, height = handle.size
            if width * height > MAX_PIXELS:
                raise DatasetError(f"{width}×{height} is {width * height / 1e6:.0f} megapixels, over the "
                                   f"{MAX_PIXELS / 1e6:.0f} MP limit; downscale it first")
            handle.load()
            image = handle.copy()
            image.format = handle.format
    except DatasetError:
        raise
    except Image.DecompressionBombError as err:
        # PIL's own check fires inside open() for anything over twice its limit, before we see the size
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(found[1]) / 1e6:.0f} megapixels" if found else "too many pixels"
        raise DatasetError(f"{pixels}, over the {MAX_PIXELS / 1e6:.0f} MP limit; downscale it first") from None
    except UnidentifiedImageError:
        raise DatasetError(f"not an image ({_describe_start(path)})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"corrupt or truncated image ({str(err).splitlines()[0][:80]})") from None
    return image


def to_rgb(image: Image.Image, background: str) -> tuple[Image.Image, list[str]]:
    """Apply the EXIF rotation and convert any mode to 8-bit RGB; say what was done."""
    notes = []
    orientation = image.getexif().get(0x0112, 1)
    if orientation in _ORIENTATION_NOTES:
        image = ImageOps.exif_transpose(image)
        notes.append(_ORIENTATION_NOTES[orientation] + " (EXIF)")
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        notes.append("16-bit → 8-bit")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            canvas = Image.new("RGB", rgba.size, BACKGROUNDS[background])
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            notes.append(f"transparency composited on {background}")
            return canvas, notes
        image = rgba
    if image.mode != "RGB":
        if image.mode in ("L", "1", "I;16", "I"):
            notes.append("grayscale → RGB")
        elif image.mode == "CMYK":
            notes.append("CMYK → RGB")
        image = image.convert("RGB")
    return image, notes


def fit(image: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """Scale so the image covers ``target`` (width, height) with its aspect ratio kept."""
    w, h = image.size
    scale = max(target[0] / w, target[1] / h)
    if abs(scale - 1.0) < 1e-9:
        return image, []
    size = (max(target[0], round(w * scale)), max(target[1], round(h * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    short_before, short_after = min(w, h), min(size)
    if scale > 1:
        return resized, [f"upscaled {short_before}→{short_after} (warning: below training size)"]
    return resized, [f"downscaled {short_before}→{short_after}"]


# --- Captions -----------------------------------------------------------------------


def fill_caption(template: str, identifier: str, class_word: str) -> str:
    return template.replace("{id}", identifier).replace("{class}", class_word).strip()


def sidecar_caption(path: Path) -> str | None:
    caption_file = path.with_suffix(".txt")
    if caption_file.is_file():
        text = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        return text or None
    return None


# --- Building datasets --------------------------------------------------------------


def _targets(size: tuple[int, int], resolution: int, buckets: bool) -> tuple[int, int]:
    return choose_bucket(size, bucket_sizes(resolution)) if buckets else (resolution, resolution)


def _finish(items: list[InstanceImage], skipped: list[tuple[str, str]], where: str, options: dict) -> InstanceDataset:
    if not items:
        reasons = "; ".join(f"{Path(s).name}: {why}" for s, why in skipped[:3])
        raise DatasetError(f"{where}: no usable image" + (f" ({reasons})" if reasons else "") +
                           f"; add photos of the subject ({', '.join(IMAGE_SUFFIXES)}).")
    warnings = []
    for item in items:
        if item.mask is not None:
            note, warning = masking.describe(item.mask)
            item.notes.append(note)
            if warning:
                warnings.append((item.source, warning))
    return InstanceDataset(items, skipped, options["resolution"], options["crop"], options["flip"], options["repeats"],
                           warnings)


def load_folder(folder: str | Path, instance_prompt: str, identifier: str = "", class_word: str = "",
                **options) -> InstanceDataset:
    """Read every image in ``folder``. A file that cannot be used is skipped with its reason;
    no usable image at all is an error. Captions: ``<name>.txt`` beside the image if present,
    else ``instance_prompt``; ``{id}`` and ``{class}`` are filled in either way."""
    from .options import DATA_OPTIONS

    options = DATA_OPTIONS.values(options)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder; point --instance-dir at the folder with the subject's photos.")
    pattern = "**/*" if options["recursive"] else "*"
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not masking.is_mask_file(p))
    return _load_paths(files, instance_prompt, identifier, class_word, options, str(folder))


def load_files(paths: Sequence[str | Path], caption: str, where: str, **options) -> InstanceDataset:
    """Read the given image files (e.g. cached class images), all captioned ``caption``
    (sidecar ``.txt`` files still win); same checks and conversions as ``load_folder``."""
    from .options import DATA_OPTIONS

    return _load_paths([Path(p) for p in paths], caption, "", "", DATA_OPTIONS.values(options), where)


def _load_paths(files: Sequence[Path], instance_prompt: str, identifier: str, class_word: str, options: dict,
                where: str) -> InstanceDataset:
    items, skipped = [], []
    for path in files:
        try:
            raw = open_image(path)
        except DatasetError as err:
            skipped.append((str(path), str(err)))
            continue
        original = raw.size
        mask = _file_mask(path, raw, options["mask_source"])
        rgb, notes = to_rgb(raw, options["background"])
        target = _targets(rgb.size, options["resolution"], options["buckets"])
        fitted, fit_notes = fit(rgb, target)
        caption = fill_caption(sidecar_caption(path) or instance_prompt, identifier, class_word)
        items.append(InstanceImage(str(path), caption, fitted, target, original, notes + fit_notes,
                                   None if mask is None else masking.fit_mask(mask, fitted.size)))
    return _finish(items, skipped, where, options)


def _file_mask(path: Path, raw: Image.Image, mode: str) -> Image.Image | None:
    """A photo's loss mask at its upright size: the ``<name>.mask.png`` beside it (auto, alpha),
    else its transparency (alpha); None with masks off or nothing found."""
    if mode == "off":
        return None
    orientation = raw.getexif().get(0x0112, 1)
    upright_size = raw.size[::-1] if orientation in (5, 6, 7, 8) else raw.size
    sidecar = masking.sidecar_mask(path, IMAGE_SUFFIXES)
    if sidecar is not None:
        return masking.read_sidecar(sidecar, path, raw.size, orientation, upright_size)
    if mode == "alpha":
        return masking.alpha_mask(ImageOps.exif_transpose(raw))
    return None


def load_batch(images: np.ndarray | Iterable, captions: Sequence[str] | None, instance_prompt: str,
               identifier: str = "", class_word: str = "", masks=None, **options) -> InstanceDataset:
    """Images already in memory, as ComfyUI's IMAGE holds them: (B, H, W, C) floats in [0, 1]
    (C = 3 or 4), or a list of PIL images. ``masks``: ComfyUI's MASK, (B, H, W) or (H, W) floats,
    1 = subject, one per image (or one for all); with C = 4 and ``mask_source="alpha"`` the alpha is the mask."""
    from .options import DATA_OPTIONS

    options = DATA_OPTIONS.values(options)
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    items, skipped = [], []
    images = list(images)
    if masks is not None:
        masks = masks.detach().cpu().numpy() if hasattr(masks, "detach") else np.asarray(masks)
        masks = list(masks[None] if masks.ndim == 2 else masks)
        if len(masks) == 1 and len(images) > 1:
            masks = masks * len(images)
        if len(masks) != len(images):
            raise UserError(f"masks: {len(masks)} masks for {len(images)} images; connect one mask per image "
                            "(or a single mask for all).")
    for index, picture in enumerate(images):
        source = f"image {index + 1} of {len(images)}"
        if not isinstance(picture, Image.Image):
            array = np.asarray(picture, dtype=np.float32)
            if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or not np.isfinite(array).all():
                skipped.append((source, f"not an H×W×C image in [0, 1] (shape {array.shape})"))
                continue
            array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
            picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        if masks is not None and options["mask_source"] != "off":
            mask = masking.mask_from_array(masks[index], source, picture.size)
        else:
            mask = masking.alpha_mask(picture) if options["mask_source"] == "alpha" else None
        rgb, notes = to_rgb(picture, options["background"])
        target = _targets(rgb.size, options["resolution"], options["buckets"])
        fitted, fit_notes = fit(rgb, target)
        template = captions[index] if captions and index < len(captions) and captions[index] else instance_prompt
        items.append(InstanceImage(source, fill_caption(template, identifier, class_word), fitted, target,
                                   picture.size, notes + fit_notes,
                                   None if mask is None else masking.fit_mask(mask, fitted.size)))
    return _finish(items, skipped, "the image batch", options)


def training_pixels(item, box: tuple[int, int, int, int], flip: bool) -> np.ndarray:
    """The pixels the model trains on: ``item``'s image cut to ``box`` (mirrored if ``flip``), as
    float32 CHW in [-1, 1] (what the VAE encodes)."""
    picture = item.image.crop(box)
    if flip:
        picture = ImageOps.mirror(picture)
    return np.asarray(picture, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def size_conditioning(item, box: tuple[int, int, int, int]) -> dict:
    """SDXL's size conditioning of ``item`` cut to ``box``: original size, crop top-left, target size (h, w)."""
    return {"original_size": item.image.size[::-1], "crop_top_left": (box[1], box[0]),
            "target_size": item.target_size[::-1]}

"""Class priors: images of the bare class made by the frozen base model, cached and reused.

Prior preservation trains on these next to the subject so the model keeps what a "dog" looks
like. They are slow to make (minutes to hours), so they are cached:

    <cache root>/<entry>/manifest.json        what produced the images
                        /class_00000.png …    image i, made with seed + i

An entry is keyed by everything that shapes the images: the model's fingerprint, prompt,
negative prompt, size, sampler, steps, guidance and seed. Another model or prompt therefore
lands in another entry and is never mixed in. Asking again for more images generates only the
missing indices; each finished image is written (atomically) at once, so a cancel keeps them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError

MANIFEST = "manifest.json"
_FINGERPRINT_SAMPLES = 16
_SAMPLE_BYTES = 1 << 16


def model_fingerprint(path: str | Path) -> str:
    """A fast identity for a checkpoint (file or diffusers folder): sha256 over its size, its
    safetensors header(s) and 16 evenly spaced 64 KB samples of the data. Reading a 2–7 GB file
    whole would take longer than many prior runs; any retrain or merge changes the samples."""
    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")) \
        if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            if file.suffix == ".safetensors" and size >= 8:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                digest.update(handle.read(min(header_len, size - 8)))
            for index in range(_FINGERPRINT_SAMPLES):
                handle.seek(max(0, size * index // _FINGERPRINT_SAMPLES))
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PriorSettings:
    model_fingerprint: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    sampler: str
    steps: int
    guidance: float
    seed: int

    def entry_name(self) -> str:
        key = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        readable = "".join(c if c.isalnum() else "-" for c in self.prompt.lower())[:40].strip("-")
        return f"{readable}-{self.width}x{self.height}-{key}"


@dataclass
class PriorCache:
    folder: Path
    settings: PriorSettings

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def image_path(self, index: int) -> Path:
        return self.folder / f"class_{index:05d}.png"

    def present(self) -> list[int]:
        """Indices with a finished image on disk (a half-written file never has the final name)."""
        return sorted(int(p.stem.split("_")[1]) for p in self.folder.glob("class_*.png"))

    def read_manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise UserError(f"{self.manifest_path}: corrupt manifest; delete the folder {self.folder} to regenerate it.") from None

    def write_manifest(self, model_path: str) -> None:
        manifest = {"settings": asdict(self.settings), "model_path": model_path,
                    "images": {self.image_path(i).name: {"seed": self.settings.seed + i} for i in self.present()},
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_atomically(self.manifest_path, json.dumps(manifest, indent=1).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_cache(root: str | Path, settings: PriorSettings) -> PriorCache:
    folder = Path(root).expanduser() / settings.entry_name()
    folder.mkdir(parents=True, exist_ok=True)
    cache = PriorCache(folder, settings)
    recorded = cache.read_manifest().get("settings")
    if recorded is not None and recorded != asdict(settings):
        # the entry name is a hash of the settings, so this means someone edited the folder
        raise UserError(f"{folder}: holds class images made with other settings ({MANIFEST} differs); "
                        "delete the folder or choose another --out.")
    return cache


def make_pipeline(base, sampler: str):
    """A diffusers text-to-image pipeline over the loaded components (nothing is copied)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..sampling.core import make_scheduler

    scheduler = make_scheduler(sampler, base.noise_scheduler)
    if base.family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoders[0],
                                         text_encoder_2=base.text_encoders[1], tokenizer=base.tokenizers[0],
                                         tokenizer_2=base.tokenizers[1], unet=base.unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                       unet=base.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_once(pipe, family: str, prompt: str, negative_prompt: str, guidance: float) -> dict[str, torch.Tensor]:
    """The pipeline's prompt embeddings for one image, as keyword arguments for its __call__."""
    use_cfg = guidance > 1.0
    with torch.inference_mode():
        encoded = pipe.encode_prompt(prompt=prompt, device=pipe.unet.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=use_cfg, negative_prompt=negative_prompt or None)
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if family == "sdxl":
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return {name: tensor for name, tensor in zip(names, encoded) if tensor is not None}


@dataclass
class PriorResult:
    folder: Path
    paths: list[Path]  # the first ``num`` images, in order
    generated: int  # how many this call made
    reused: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.generated and self.seconds > 0 else 0.0


def generate_priors(base, model_path: str, out: str | Path, num: int, prompt: str, negative_prompt: str = "",
                    steps: int = 25, guidance: float = 7.5, sampler: str = "ddim", seed: int = 0,
                    batch_size: int = 4, resolution: int = 0,
                    on_progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> PriorResult:
    """Make sure ``num`` class images exist for these settings; generate only the missing ones.

    ``on_progress(done, total)`` is called after every batch; ``should_stop()`` is checked
    before every batch and at every sampler step (a cancel keeps the finished images).
    """
    from tqdm.auto import tqdm

    size = resolution or base.info.resolution
    settings = PriorSettings(model_fingerprint(model_path), prompt, negative_prompt, size, size, sampler, steps,
                             float(guidance), seed)
    cache = open_cache(out, settings)
    present = set(cache.present())
    missing = [i for i in range(num) if i not in present]
    started = time.perf_counter()
    generated = 0
    if missing:
        pipe = make_pipeline(base, sampler)
        # Every class image has the same prompt: encode it once, not once per batch.
        embeddings = encode_once(pipe, base.family, prompt, negative_prompt, guidance)
        stop_hook = None
        if should_stop is not None:
            def stop_hook(pipeline, step, timestep, callback_kwargs):
                if should_stop():
                    raise KeyboardInterrupt
                return callback_kwargs
        # PNG encoding (zlib, outside the GIL) runs on a writer thread while the next batch is
        # generated; one thread keeps the writes and manifest updates in order.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="priors-png")
        writes = []

        def save_batch(indices: list[int], images: list) -> None:
            for index, image in zip(indices, images):
                _save_png(image, cache.image_path(index), settings, seed + index)
            cache.write_manifest(model_path)

        try:
            with tqdm(total=len(missing), unit="img",
                      desc=f"class images ({len(present & set(range(num)))} cached)") as bar:
                for start in range(0, len(missing), batch_size):
                    if should_stop is not None and should_stop():
                        raise KeyboardInterrupt
                    indices = missing[start:start + batch_size]
                    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in indices]
                    batch = {k: v.repeat(len(indices), *[1] * (v.ndim - 1)) for k, v in embeddings.items()}
                    with torch.inference_mode():
                        images = pipe(**batch, num_inference_steps=steps, guidance_scale=guidance, height=size,
                                      width=size, generator=generators, callback_on_step_end=stop_hook).images
                    writes.append(writer.submit(save_batch, indices, images))
                    generated += len(indices)
                    bar.update(len(indices))
                    if on_progress is not None:
                        on_progress(num - len(missing) + generated, num)
        finally:
            writer.shutdown(wait=True)  # a cancel still keeps every image that was generated
            for write in writes:
                write.result()  # a failed write (disk full) surfaces here
    elif not cache.manifest_path.exists():
        cache.write_manifest(model_path)
    return PriorResult(cache.folder, [cache.image_path(i) for i in range(num)], generated, num - len(missing),
                       time.perf_counter() - started)


def _save_png(image, path: Path, settings: PriorSettings, seed: int) -> None:
    """Write a PNG with A1111-style ``parameters`` text (so it can be re-created), atomically."""
    negative = f"\nNegative prompt: {settings.negative_prompt}" if settings.negative_prompt else ""
    write_png(image, path, f"{settings.prompt}{negative}\nSteps: {settings.steps}, Sampler: {settings.sampler}, "
                           f"CFG scale: {settings.guidance}, Seed: {seed}, Size: {settings.width}x{settings.height}, "
                           f"Model hash: {settings.model_fingerprint}")


def write_png(image, path: Path, parameters: str) -> Path:
    """A PNG with A1111-style ``parameters`` text, written atomically."""
    from io import BytesIO

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, buffer.getvalue())
    return path


def user_class_images(folder: str | Path, resolution: int) -> list[Path]:
    """Real class photos the user supplies instead of generated ones: checked like instance images."""
    from ..data.core import load_folder

    dataset = load_folder(folder, "", resolution=max(64, resolution))
    return [Path(item.source) for item in dataset.images]

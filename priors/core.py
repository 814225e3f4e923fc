"""Class priors: images of the bare class made by the frozen base model, cached and reused.

Prior preservation trains on these next to the subject so the model keeps what a "dog" looks
like. They are slow to make (minutes to hours), so they are cached:

    <cache root>/<entry>/manifest.json        what produced the images
                        /class_00000.png …    image i, made with seed + i

An entry is keyed by everything that shapes the images: the model's fingerprint, prompt,
negative prompt, size, sampler, steps, guidance and seed. Another model or prompt therefore
lands in another entry and is never mixed in. Asking again for more images generates only the
missing indices; each finished image is written (durably) at once, so a cancel keeps them.
Every PNG carries A1111 ``parameters`` text: `dreambooth-lora sample --recreate` re-makes it bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ..data.core import load_folder
from ..errors import Cancelled, UserError
from ..runtime.files import fingerprint, write_png, write_text
from ..runtime.locks import exclusive
from ..runtime.parameters import ImageParameters, format_parameters
from ..runtime.pipeline import Conditioning, check_sampler, generate, make_pipeline, to_image
from ..runtime.text import encode_base_prompt, windows_for

MANIFEST = "manifest.json"


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

    def parameters(self, seed: int, model_name: str) -> str:
        """The A1111 text of the image made with ``seed`` (what `sample --recreate` reads)."""
        return format_parameters(ImageParameters(
            prompt=self.prompt, negative=self.negative_prompt, seed=seed, steps=self.steps, sampler=self.sampler,
            guidance=self.guidance, width=self.width, height=self.height, model_name=model_name,
            model_hash=self.model_fingerprint))


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
        write_text(self.manifest_path, json.dumps(manifest, indent=1))


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
                    resolution: int = 0, on_progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, quiet: bool = False) -> PriorResult:
    """Make sure ``num`` class images exist for these settings; generate only the missing ones.

    Each image is made exactly as `dreambooth-lora sample` makes it (same encoder, same
    generator). ``on_progress(done, total)`` is called after every image; ``should_stop()`` is
    checked at every sampler step (a cancel keeps the finished images).
    """
    size = resolution or base.info.resolution
    settings = PriorSettings(fingerprint(model_path), prompt, negative_prompt, size, size, check_sampler(sampler),
                             steps, float(guidance), seed)
    cache = open_cache(out, settings)
    started = time.perf_counter()
    missing = [i for i in range(num) if i not in set(cache.present())]
    generated = 0
    if missing:
        # One run fills an entry at a time; a second one (another process, a second ComfyUI)
        # is refused at once and told which run holds it.
        with exclusive(cache.folder, "a class-prior run", "wait for it to finish (its images are reused), or "
                       "choose another --out"):
            present = set(cache.present())  # what a run that just finished left
            missing = [i for i in range(num) if i not in present]
            generated = _fill(base, cache, missing, num, len(present & set(range(num))), model_path, on_progress,
                              should_stop, quiet)
    if not cache.manifest_path.exists():
        cache.write_manifest(model_path)
    return PriorResult(cache.folder, [cache.image_path(i) for i in range(num)], generated, num - len(missing),
                       time.perf_counter() - started)


def _fill(base, cache: PriorCache, missing: list[int], num: int, cached: int, model_path: str,
          on_progress: Callable[[int, int], None] | None, should_stop: Callable[[], bool] | None,
          quiet: bool) -> int:
    """Generate the ``missing`` images of ``cache`` (each written as soon as it is made)."""
    settings = cache.settings
    pipe = make_pipeline(base, settings.sampler)
    # Every class image has the same prompt: encode it once, not once per image.
    chunks = windows_for(base.tokenizers[0], settings.prompt, settings.negative_prompt)
    positive, pooled = encode_base_prompt(base, settings.prompt, chunks)
    negative, negative_pooled = encode_base_prompt(base, settings.negative_prompt, chunks)
    conditioning = Conditioning(positive, negative, pooled, negative_pooled)
    # PNG encoding (zlib, outside the GIL) runs on a writer thread while the next image is
    # generated; one thread keeps the writes and manifest updates in order.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="priors-png")
    writes = []

    def save(index: int, pixels) -> None:
        write_png(to_image(pixels), cache.image_path(index),
                  settings.parameters(settings.seed + index, Path(model_path).stem))
        cache.write_manifest(model_path)

    generated = 0
    try:
        with tqdm(total=len(missing), unit="img", disable=quiet, desc=f"class images ({cached} cached)") as bar:
            for index in missing:
                if should_stop is not None and should_stop():
                    raise Cancelled
                pixels = generate(pipe, conditioning, [settings.seed + index], settings.steps, settings.guidance,
                                  settings.width, settings.height, should_stop=should_stop)[0]
                writes.append(writer.submit(save, index, pixels))
                generated += 1
                bar.update(1)
                if on_progress is not None:
                    on_progress(num - len(missing) + generated, num)
    finally:
        writer.shutdown(wait=True)  # a cancel still keeps every image that was generated
        for write in writes:
            write.result()  # a failed write (disk full) surfaces here
    return generated


def user_class_images(folder: str | Path, resolution: int) -> list[Path]:
    """Real class photos the user supplies instead of generated ones: checked like instance images."""
    dataset = load_folder(folder, "", resolution=max(64, resolution))
    return [Path(item.source) for item in dataset.images]

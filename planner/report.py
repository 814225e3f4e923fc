"""What the trainer asks the planner: the settings that fit --fit-to-vram, and around every run
the predicted peak memory said at the start and the measured one at the end.

    with memory_report(job, settings, device, say):    # trainer/loop.py, around the run
        ...
    # memory: predicted peak 6.41 GiB (in loading) ... measured 6.62 GiB (+3%), peak resident-memory growth
"""

from __future__ import annotations

import gc
import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..data.core import IMAGE_SUFFIXES
from ..priors.core import PriorSettings, generate_priors
from ..runtime.files import fingerprint
from ..runtime.memory import PeakMeter, gigabytes
from .core import NAME_OF, SIZES, Planner, fit


def generates_class_images(job, settings) -> bool:
    """Whether the run will make class images (a phase of its own, with the VAE decoder): prior
    preservation on class images, no images of the user's own in --class-dir, and the cache entry
    that ``load_class_images`` fills (``generate_priors`` with its defaults) not yet complete."""
    if settings.prior_preservation != "class_images" or not job.class_dir:
        return False
    folder = Path(job.class_dir).expanduser()
    if folder.is_dir() and any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        return False
    if not Path(job.base).expanduser().exists():
        return True
    defaults = {k: p.default for k, p in inspect.signature(generate_priors).parameters.items()}
    size = settings.resolution
    entry = PriorSettings(fingerprint(job.base), settings.class_prompt, defaults["negative_prompt"], size, size,
                          defaults["sampler"], defaults["steps"], float(defaults["guidance"]), defaults["seed"])
    present = {p.stem for p in (folder / entry.entry_name()).glob("class_*.png")}
    return any(f"class_{i:05d}" not in present for i in range(settings.num_class_images))


def fit_job(job, settings, device: str):
    """``settings`` fitted to --fit-to-vram for this job (unchanged when it is 0)."""
    return fit(settings, job.base, device, loads=job.base_model is None,
               class_images=generates_class_images(job, settings))[0]


def _planner(job, settings, device: torch.device) -> tuple[Planner, int]:
    """The run's planner, and the bytes already in memory when the meter starts (a model given
    loaded, on the CPU: the growth the meter sees does not include it)."""
    loaded = job.base_model
    load_dtype = NAME_OF.get(loaded.dtype, "fp32") if loaded is not None else dict(job.load_options).get("dtype", "auto")
    planner = Planner(job.base, settings, device.type, loads=loaded is None, load_dtype=load_dtype,
                      class_images=generates_class_images(job, settings))
    present = 0
    if loaded is not None and device.type != "cuda":
        present = sum(sum(c) for c in planner.counts.values()) * SIZES[load_dtype if load_dtype != "auto" else "fp32"]
    return planner, present


@contextmanager
def memory_report(job, settings, device: torch.device, say: Callable[[str], None]) -> Iterator[None]:
    """Say the run's predicted peak before it loads anything and the measured one when it ends.
    A prediction that cannot be made (a file the planner cannot read) is said and skipped; it
    never stops a run."""
    try:
        planner, present = _planner(job, settings, device)
        prediction = planner.predict_settings()
        predicted = max(0, prediction.peak - present)
        chosen = f"; settings chosen by --fit-to-vram {settings.fit_to_vram:g}" if settings.fit_to_vram else ""
        label = prediction.candidate.label(NAME_OF[planner.compute])
        say(f"memory: predicted peak {gigabytes(predicted)} in {prediction.peak_phase} ({label}{chosen})")
        del planner
    except Exception as err:  # noqa: BLE001 - a report, not a check
        predicted = None
        say(f"memory: no prediction ({type(err).__name__}: {err})")
    gc.collect()  # the planner's meta models go before the meter starts
    meter = PeakMeter(device)
    yield
    measured = meter.peak()
    versus = f", predicted {gigabytes(predicted)} ({measured / predicted - 1:+.0%})" if predicted else ""
    say(f"memory: measured {gigabytes(measured)}{versus}; {meter.what}")

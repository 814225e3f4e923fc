"""Schedulers, diffusers pipelines, and the one image generator that sampling, class priors
and training previews share.

``generate`` makes each image in a denoising loop of its own (the prompt and its negative
together, for classifier-free guidance). CPU and GPU kernels are not batch-invariant, so
images sampled as a batch would differ in the last bit from the same seeds made alone; one
image per loop makes image *i* of a batch exactly the image of seed + *i* made alone, and
every PNG re-makes bit for bit with ``dreambooth-lora sample --recreate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import Cancelled, UserError
from ..models.families import FAMILIES

# our name → (diffusers scheduler class, its extra settings, A1111's name)
SAMPLERS = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
}
A1111_SAMPLERS = {a1111: ours for ours, (_, _, a1111) in SAMPLERS.items()}


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; one of {', '.join(SAMPLERS)}.")
    return name


def make_scheduler(name: str, noise_scheduler):
    import diffusers

    class_name, extra, _ = SAMPLERS[check_sampler(name)]
    return getattr(diffusers, class_name).from_config(noise_scheduler.config, **extra)


def make_pipeline(base, sampler: str):
    """The family's diffusers text-to-image pipeline over the loaded components (nothing is copied)."""
    import diffusers

    family = FAMILIES[base.family]
    pipeline_class = getattr(diffusers, family.pipeline_class)
    scheduler = make_scheduler(sampler, base.noise_scheduler)
    encoders = {name: encoder for name, encoder in zip(family.text_encoders, base.text_encoders)}
    tokenizers = {name.replace("text_encoder", "tokenizer"): tokenizer
                  for name, tokenizer in zip(family.text_encoders, base.tokenizers)}
    extra = {} if family.pooled_text else {"safety_checker": None, "feature_extractor": None,
                                           "requires_safety_checker": False}
    pipe = pipeline_class(vae=base.vae, unet=base.unet, scheduler=scheduler, **encoders, **tokenizers, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Conditioning:
    """A prompt and its negative, encoded (``runtime.text.encode_prompt``), on the UNet's device."""
    positive: torch.Tensor
    negative: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL only
    negative_pooled: torch.Tensor | None = None


def generate(pipe, conditioning: Conditioning, seeds: Sequence[int], steps: int, guidance: float, width: int,
             height: int, on_step: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None, together: bool = False) -> np.ndarray:
    """Images [len(seeds), H, W, 3] in [0, 1] (float32), image i from ``seeds[i]``, each made alone:
    exactly the image its seed makes by itself, whatever else is in the batch.

    ``together``: all in one denoising loop, each image still drawing its noise from its own
    seed — several times faster for small models, and the same images up to the last bit of
    rounding (CPU kernels are not batch-invariant): for measuring, not for images to recreate.
    ``on_step(done, total)`` counts sampler steps over all images; ``should_stop()`` is checked
    at every sampler step and raises ``Cancelled``."""
    if width % 8 or height % 8:
        raise UserError(f"width and height must be multiples of 8 (got {width}×{height}).")
    kwargs = {"prompt_embeds": conditioning.positive, "negative_prompt_embeds": conditioning.negative}
    if conditioning.pooled is not None:
        kwargs.update(pooled_prompt_embeds=conditioning.pooled,
                      negative_pooled_prompt_embeds=conditioning.negative_pooled)
    total = steps * len(seeds)
    watched = on_step is not None or should_stop is not None
    if together:
        callback = _step_callback(0, total, on_step, should_stop, len(seeds)) if watched else None
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        with torch.inference_mode():
            return pipe(**kwargs, num_images_per_prompt=len(seeds), num_inference_steps=steps, guidance_scale=guidance,
                        width=width, height=height, generator=generators, output_type="np",
                        callback_on_step_end=callback).images.astype(np.float32)
    images = []
    for index, seed in enumerate(seeds):
        callback = _step_callback(index * steps, total, on_step, should_stop) if watched else None
        if should_stop is not None and should_stop():
            raise Cancelled
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.inference_mode():
            images.append(pipe(**kwargs, num_inference_steps=steps, guidance_scale=guidance, width=width,
                               height=height, generator=generator, output_type="np",
                               callback_on_step_end=callback).images[0])
    return np.stack(images).astype(np.float32)


def _step_callback(done_before: int, total: int, on_step, should_stop, images: int = 1):
    """diffusers' callback_on_step_end: report progress over all images, stop when asked."""
    def callback(pipeline, step, timestep, callback_kwargs):
        if should_stop is not None and should_stop():
            raise Cancelled
        if on_step is not None:
            on_step(done_before + (step + 1) * images, total)
        return callback_kwargs
    return callback


def to_image(pixels: np.ndarray):
    """[H, W, 3] floats in [0, 1] → an 8-bit PIL image (rounded, as every UI saves)."""
    from PIL import Image

    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))

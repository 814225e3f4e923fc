"""Preview grids during training, made exactly as the sampler makes images: prompts encoded in
75-token windows (``runtime.text.encode_prompt``), one denoising loop per image
(``runtime.pipeline.generate``, DDIM), the adapter at each cell's (UNet, text-encoder) scale.

    samples/step-000200.png   rows: prompt × text-encoder scale, columns: UNet scale; fixed seeds

A preview whose step has a saved LoRA carries the A1111 ``parameters`` of its first cell, so
``dreambooth-lora sample --recreate`` re-makes that cell from the checkpoint's LoRA.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch

from ..data.core import fill_caption
from ..errors import UserError
from ..runtime.files import fingerprint, write_png
from ..runtime.parameters import HASH_LENGTH, ImageParameters, format_parameters
from ..runtime.peft import adapter_scale
from ..runtime.pictures import render_grid
from ..runtime.pipeline import Conditioning, generate, make_pipeline, to_image
from ..runtime.text import encode_prompt, windows_for
from .checkpoint import lora_display_name, preview_path, step_lora_path
from .job import token_text
from .model import modules_on

SAMPLER = "ddim"
GUIDANCE = 7.5  # diffusers' pipeline default, which the previews have always used
NEGATIVE = ""


def parse_scales(text: str) -> tuple[list[float], list[float]]:
    """'1.0' → ([1.0], [1.0]); 'unet=0.5,1 te=0,1' → ([0.5, 1.0], [0.0, 1.0])."""
    text = text.strip() or "1.0"
    if "=" not in text:
        value = float(text)
        return [value], [value]
    found = {"unet": [1.0], "te": [1.0]}
    for part in text.split():
        name, _, values = part.partition("=")
        if name not in found:
            raise UserError(f"--validation-scales: unknown part {name!r}; write e.g. 'unet=0.5,1.0 te=0,1'.")
        found[name] = [float(v) for v in values.split(",") if v]
    return found["unet"], found["te"]


def preview_prompts(settings) -> list[str]:
    """--validation-prompts with {id}, {class} and {tokens} filled in."""
    return [fill_caption(p, settings.identifier, settings.class_word).replace("{tokens}", token_text(settings))
            for p in settings.validation_prompts.split("|") if p.strip()]


class Previewer:
    """Makes ``samples/step-N.png`` from the model as it is at step N (main process only)."""

    def __init__(self, base, settings, state_dir: Path, model_name: str, model_hash: str,
                 on_preview: Callable[[Path], None] | None = None):
        self.base, self.settings, self.state_dir = base, settings, state_dir
        self.model_name, self.model_hash, self.on_preview = model_name, model_hash[:HASH_LENGTH], on_preview
        self.prompts = preview_prompts(settings)
        self.unet_scales, self.te_scales = parse_scales(settings.validation_scales)
        self.pipe = None

    @torch.no_grad()
    def __call__(self, step: int) -> Path:
        base, s = self.base, self.settings
        unet, encoders = base.unet, list(base.text_encoders)
        if self.pipe is None:
            self.pipe = make_pipeline(base, SAMPLER)
        modes = [(module, module.training) for module in (unet, *encoders)]
        for module, _ in modes:
            module.eval()
        rows, labels = [], []
        device = next(unet.parameters()).device
        with modules_on(device, base.vae, *encoders):  # offloaded while training
            for index, prompt in enumerate(self.prompts):
                chunks = windows_for(base.tokenizers[0], prompt, NEGATIVE)
                for te_scale in self.te_scales:
                    with ExitStack() as stack:
                        for encoder in encoders:
                            stack.enter_context(adapter_scale(encoder, te_scale))
                        positive, pooled = encode_prompt(base.family, base.tokenizers, encoders, prompt, chunks, device)
                        negative, negative_pooled = encode_prompt(base.family, base.tokenizers, encoders, NEGATIVE,
                                                                  chunks, device)
                    conditioning = Conditioning(positive, negative, pooled, negative_pooled)
                    row = []
                    for unet_scale in self.unet_scales:
                        with adapter_scale(unet, unet_scale):
                            pixels = generate(self.pipe, conditioning, [s.seed + index], s.validation_steps, GUIDANCE,
                                              s.resolution, s.resolution)
                        row.append(to_image(pixels[0]))
                    rows.append(row)
                    labels.append(f"{index + 1} · te {te_scale:g}")
        for module, was_training in modes:
            module.train(was_training)
        title = f"step {step}: " + "  ".join(f"{i + 1}: {p}" for i, p in enumerate(self.prompts))
        grid = render_grid(rows, [f"unet {u:g}" for u in self.unet_scales], labels, title)
        path = write_png(grid, preview_path(self.state_dir, step), self.parameters(step))
        if self.on_preview is not None:
            self.on_preview(path)
        return path

    def parameters(self, step: int) -> str | None:
        """A1111 parameters of the grid's first cell, where the step's LoRA file can re-make it
        (a saved checkpoint; not with new tokens, which need their embedding file too)."""
        lora = step_lora_path(self.state_dir, step)
        if self.settings.new_tokens or not lora.is_file():
            return None
        name = lora_display_name(lora)
        s = self.settings
        return format_parameters(ImageParameters(
            prompt=self.prompts[0], seed=s.seed, steps=s.validation_steps, sampler=SAMPLER, guidance=GUIDANCE,
            width=s.resolution, height=s.resolution, negative=NEGATIVE, model_name=self.model_name,
            model_hash=self.model_hash, loras=[(name, self.unet_scales[0], self.te_scales[0])],
            lora_hashes={name: fingerprint(lora)[:HASH_LENGTH]}))

"""A1111's ``parameters`` text, written and read in one place: every PNG this pack makes
(samples, grid cells, class priors, previews) carries it, so any of them can be re-made with
``dreambooth-lora sample --recreate`` and read by A1111's PNG Info.

    a photo of sks dog <lora:sks_dog:te=0.5:unet=1>
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: 0123456789ab, …
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .pipeline import SAMPLERS

GENERATOR = "ComfyUI-DreamBooth-LoRA"
HASH_LENGTH = 12  # characters of a model's or LoRA's fingerprint, as A1111 writes short hashes


@dataclass
class ImageParameters:
    prompt: str
    seed: int
    steps: int
    sampler: str  # our name (a key of SAMPLERS)
    guidance: float
    width: int
    height: int
    negative: str = ""
    model_name: str = "model"
    model_hash: str = "unknown"
    loras: list[tuple[str, float, float]] = field(default_factory=list)  # (name, unet scale, te scale)
    lora_hashes: dict[str, str] = field(default_factory=dict)
    ti_hashes: dict[str, str] = field(default_factory=dict)


def format_parameters(p: ImageParameters) -> str:
    """A1111's text for one image. LoRAs are prompt tags in A1111's named form
    ``<lora:NAME:te=T:unet=U>`` (A1111's positional form is te first, then unet); embeddings are
    named by their bare name in the prompt (A1111's syntax) and listed in ``TI hashes``."""
    tags = "".join(f" <lora:{name}:te={te:g}:unet={unet:g}>" for name, unet, te in p.loras)
    lines = [p.prompt + tags]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    fields = [("Steps", p.steps), ("Sampler", SAMPLERS[p.sampler][2]), ("CFG scale", f"{p.guidance:g}"),
              ("Seed", p.seed), ("Size", f"{p.width}x{p.height}"), ("Model hash", p.model_hash[:HASH_LENGTH]),
              ("Model", p.model_name)]
    if p.lora_hashes:
        fields.append(("Lora hashes", '"' + ", ".join(f"{n}: {h}" for n, h in p.lora_hashes.items()) + '"'))
    if p.ti_hashes:
        fields.append(("TI hashes", '"' + ", ".join(f"{n}: {h}" for n, h in p.ti_hashes.items()) + '"'))
    fields.append(("Generator", GENERATOR))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


_PARAM = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LORA_TAG = re.compile(r"\s*<lora:([^:>]+)((?::[^:>]+)*)>")


def read_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 ``parameters`` text: prompt (LoRA tags removed), negative, loras
    [(name, unet, te)], fields {name: value}."""
    lines = text.strip().split("\n")
    fields = {}
    if lines and _PARAM.findall(lines[-1]) and lines[-1].lstrip().startswith("Steps:"):
        fields = {k.strip(): v.strip().strip('"') for k, v in _PARAM.findall(lines.pop())}
    prompt_lines, negative_lines, target = [], [], None
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if target is negative_lines else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines)
    loras = []
    for name, rest in _LORA_TAG.findall(prompt):
        values = [p for p in rest.split(":") if p]
        named = dict(p.split("=", 1) for p in values if "=" in p)
        positional = [float(p) for p in values if "=" not in p]
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        loras.append((name, unet, te))
    return {"prompt": _LORA_TAG.sub("", prompt).strip(), "negative": "\n".join(negative_lines), "loras": loras,
            "fields": fields}


def hashes_field(fields: dict[str, str], name: str) -> dict[str, str]:
    """``Lora hashes``/``TI hashes`` as {name: hash}."""
    return dict(item.split(": ", 1) for item in fields.get(name, "").split(", ") if ": " in item)


def png_parameters(path: str | Path, required: bool = True) -> str | None:
    """The ``parameters`` text of a PNG (None if it has none and ``required`` is False)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except OSError as err:
        raise UserError(f"{path}: not a readable image ({err}).") from None
    if not text and required:
        raise UserError(f"{path}: has no 'parameters' text; only images made by this sampler or A1111 can be re-made.")
    return text or None

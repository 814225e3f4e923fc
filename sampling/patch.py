"""LoRA files put onto a loaded base model at given (UNet, text-encoder) strengths.

LoRAs are applied the way ComfyUI's LoraLoader and A1111 apply them: each layer's weight becomes
W₀ + Σ strength·ΔW (DoRA: W₀ + strength·(DoRA(W₀ + ΔW) − W₀)), computed in fp32 from a saved
copy of W₀. Changing a scale re-patches only the touched layers, never reloads the model, and
never drifts: the weights are always recomputed from W₀.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..converters.files import load_adapter
from ..converters.keys import canonical_path
from ..converters.structure import structure_of_base
from ..errors import UserError
from ..models.families import FAMILIES
from ..runtime.files import file_stamp
from ..trainer.checkpoint import lora_display_name


@dataclass(frozen=True)
class LoraChoice:
    path: str
    unet_scale: float = 1.0
    te_scale: float = 1.0

    @property
    def name(self) -> str:
        """How prompts and PNG metadata name it: the file's stem, or for a training checkpoint
        (``x.state/step-000100/lora.safetensors``) ``x-step-000100``."""
        return lora_display_name(Path(self.path))


def parse_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_lora(text: str) -> LoraChoice:
    """``FILE``, ``FILE:S`` (UNet and text encoder both at S) or ``FILE:UNET:TE``."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2 and parse_number(parts[-1]) is not None:
        numbers.insert(0, float(parts.pop()))
    path = ":".join(parts)
    if not path:
        raise UserError(f"--lora {text!r}: give a file, optionally with scales: FILE[:UNET_SCALE[:TE_SCALE]].")
    if not numbers:
        return LoraChoice(path)
    return LoraChoice(path, numbers[0], numbers[1] if len(numbers) > 1 else numbers[0])


def patched_weight(original: torch.Tensor, patches: Sequence[tuple[Any, float]]) -> torch.Tensor:
    """W₀ with each (converters.AdapterModule, strength) applied in order, in fp32."""
    weight = original.float()
    for module, strength in patches:
        delta = module.delta(tuple(weight.shape)).to(weight.device)
        if "dora_scale" in module.tensors:
            # DoRA as LyCORIS defines it: the direction of W + ΔW at the learned per-output
            # magnitude. (ComfyUI 0.3.75 divides by ‖W‖ instead, 4 % off; its open PR #15458.)
            combined = weight + delta
            norm = combined.reshape(combined.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (combined.ndim - 1))
            magnitude = module.tensors["dora_scale"].float().to(weight.device).reshape(norm.shape)
            weight = weight + strength * (magnitude * combined / norm - weight)
        else:
            weight = weight + strength * delta
    return weight


class LoraPatcher:
    """Puts LoRA files onto a loaded base model at given (UNet, text-encoder) strengths."""

    def __init__(self, base):
        self.base = base
        self.structure = structure_of_base(base)
        self.layers: dict[tuple[str, str], torch.nn.Module] = {}
        for component, module in zip(FAMILIES[base.family].components, [base.unet, *base.text_encoders]):
            for path, child in module.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    self.layers[(component, canonical_path(component, path))] = child
        self.adapters: dict[str, tuple] = {}  # resolved path → (its file_stamp, converters.Adapter)
        self.originals: dict[tuple[str, str], torch.Tensor] = {}  # W₀ of every layer ever patched (CPU)
        self.applied: tuple = ()

    def adapter(self, path: str):
        key = str(Path(path).expanduser().resolve())
        # Keyed on the file's stamp too: a LoRA retrained under the same name must not be
        # sampled with the weights read before.
        stamp = file_stamp(key)
        if stamp is None:
            raise UserError(f"{path}: no such LoRA file.")
        if key not in self.adapters or self.adapters[key][0] != stamp:
            self.adapters[key] = (stamp, load_adapter(key, self.structure))
        return self.adapters[key][1]

    def apply(self, loras: Sequence[LoraChoice]) -> None:
        wanted = tuple((str(Path(c.path).expanduser().resolve()), file_stamp(c.path), c.unet_scale, c.te_scale)
                       for c in loras)
        if wanted == self.applied:
            return
        per_layer: dict[tuple[str, str], list] = {}
        for choice in loras:
            for key, module in self.adapter(choice.path).modules.items():
                strength = choice.unet_scale if key[0] == "unet" else choice.te_scale
                if strength != 0:
                    per_layer.setdefault(key, []).append((module, strength))
        with torch.no_grad():
            for key in set(self.originals) | set(per_layer):
                weight = self.layers[key].weight
                original = self.originals.setdefault(key, weight.detach().to("cpu", copy=True))
                patches = per_layer.get(key)
                target = patched_weight(original.to(weight.device), patches) if patches else original
                weight.copy_(target.to(weight.dtype))
        self.applied = wanted



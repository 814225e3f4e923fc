"""The adaptable layers of a base model: what a LoRA file's modules must match.

A ``Structure`` maps (component, module path) to the weight shape of every Linear/Conv2d. It
comes from a loaded model, from a checkpoint's header alone, or from a family's reference
configs; the last two build the model on the meta device, so they cost no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..models.families import FAMILIES, family_config
from ..models.inspect import inspect
from ..models.load import BaseModel, empty_modules
from . import keys


def unet_layout_of(unet_config: Mapping) -> dict:
    """What kohya's SDXL module names depend on: the UNet's blocks per level and up-block types."""
    return {"layers_per_block": unet_config["layers_per_block"], "up_block_types": list(unet_config["up_block_types"])}


@dataclass
class Structure:
    """The adaptable modules of a base model: (component, path) → weight shape."""

    family: str
    shapes: dict[tuple[str, str], tuple[int, ...]]
    unet_layout: dict

    def names(self) -> dict[str, tuple[str, str]]:
        return keys.accepted_names(self.family, self.shapes, self.unet_layout)


def structure_of(family: str, unet, text_encoders: list) -> Structure:
    shapes = {}
    for component, module in zip(FAMILIES[family].components, [unet, *text_encoders]):
        for path, child in module.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) or ".lora_" in path:
                continue
            # a model that already carries a PEFT adapter wraps each target: "<path>.base_layer"
            path = path.removesuffix(".base_layer")
            shapes[(component, keys.canonical_path(component, path))] = tuple(child.weight.shape)
    return Structure(family, shapes, unet_layout_of(unet.config))


def structure_of_base(base: BaseModel) -> Structure:
    """Structure of a loaded base model."""
    return structure_of(base.family, base.unet, base.text_encoders)


def reference_structure(family: str) -> Structure:
    """The structure of the real model of ``family`` (its reference configs, meta device, ~1 s)."""
    config = family_config(family)
    unet, _, encoders = empty_modules(config["unet"], text_encoders=[
        (entry["model_class"], entry["config"]) for entry in config["text_encoders"]])
    return structure_of(family, unet, encoders)


def structure_of_checkpoint(path: str | Path) -> Structure:
    """The adaptable modules of a checkpoint's model, built from its header alone (meta device)."""
    info = inspect(path)
    unet, _, encoders = empty_modules(info.unet_config, text_encoders=[
        (spec.model_class, spec.config) for spec in info.text_encoders])
    return structure_of(info.family, unet, encoders)

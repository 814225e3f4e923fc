"""diffusers / PEFT LoRA files ⇄ Adapter: diffusers' ``save_lora_weights`` layout
(``unet.<path>.lora_A.weight`` …, each component's LoraConfig in the ``lora_adapter_metadata``
JSON), which ``load_lora_weights`` reads back, and peft's own ``save_pretrained`` keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..models.families import FAMILIES
from ..models.load import DTYPES
from ..runtime.files import write_safetensors
from .adapter import Adapter, LoraFormatError
from .kohya import check_family, guess_family
from .peft import from_peft, to_peft
from .structure import Structure


def from_diffusers_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], structure: Structure,
                        path: Path) -> Adapter:
    """A diffusers ``save_lora_weights`` file: ``unet.<path>.lora_A.weight`` … plus the LoraConfig
    of each component in the ``lora_adapter_metadata`` JSON (``unet.r``, ``unet.lora_alpha`` …)."""
    config_json = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    per_component: dict[str, tuple[dict, dict]] = {}
    for key, tensor in tensors.items():
        key = key.removeprefix("base_model.model.")  # peft's own save_pretrained of a PeftModel
        component, _, rest = key.partition(".")
        if component not in FAMILIES[structure.family].components:
            owner = next((f for f in FAMILIES.values() if component in f.components), None)
            if owner is not None:  # a component only another family has
                raise LoraFormatError(f"{path}: a LoRA for {owner.display} (it has {component} keys), but the base model is {FAMILIES[structure.family].display}.")
            component, rest = "unet", key  # bare PEFT keys: a UNet adapter
        per_component.setdefault(component, ({}, {}))[0][rest] = tensor
    for component, (_, config) in per_component.items():
        prefix = component + "."
        config.update({k[len(prefix):]: v for k, v in config_json.items() if k.startswith(prefix)})
    file_family = guess_family(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()})
    adapter = from_peft(structure.family, structure.unet_layout, per_component)
    unmatched = [f"{c}.{p}" for c, p in adapter.modules if (c, p) not in structure.shapes]
    check_family(path, structure, file_family, unmatched, len(adapter.modules))
    return adapter


def to_diffusers_file(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, config_json = {}, {}
    for component in adapter.components():
        state, config = to_peft(adapter, component)
        tensors.update({f"{component}.{k}": v.contiguous() for k, v in state.items()})
        config_json.update({f"{component}.{k}": v for k, v in config.items()})
    return tensors, {"lora_adapter_metadata": json.dumps(config_json, indent=2, sort_keys=True)}


def save_peft(adapter: Adapter, path: str | Path, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Write diffusers' ``save_lora_weights`` layout (loadable with ``load_lora_weights``)."""
    tensors, metadata = to_diffusers_file(adapter)
    tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    return write_safetensors(Path(path).expanduser(), tensors, metadata, overwrite)

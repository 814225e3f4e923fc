"""kohya / A1111 LoRA module names ⇄ our module paths.

We write what kohya's sd-scripts writes (``networks/lora.py``: ``LoRANetwork`` and its
``create_modules``; the per-family prefixes are in ``models.families``):
- SD1.x / SD2.x UNet: diffusers module paths, ``lora_unet_down_blocks_0_attentions_0_…``;
- SDXL UNet: LDM module paths, ``lora_unet_input_blocks_4_1_…``;
- text encoders: ``lora_te_`` (one encoder) or ``lora_te1_`` / ``lora_te2_`` (SDXL), always
  with ``text_model_`` (transformers 5 dropped that level from CLIPTextModel; every loader
  still expects it).

Reading is more forgiving: both UNet namings, and ``lora_te1_`` or a missing ``text_model_``
for single-encoder families, as ComfyUI and A1111 accept them.

A *module path* is the dotted name of a Linear/Conv2d inside its component (``unet``,
``text_encoder``, ``text_encoder_2``); text-encoder paths are kept without ``text_model.``.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..models import layouts
from ..models.families import FAMILIES

UNET_PREFIX = "lora_unet_"


def canonical_path(component: str, path: str) -> str:
    return layouts.strip_text_model(path) if component != "unet" else path


def ldm_module_path(path: str, unet_layout: Mapping) -> str:
    """diffusers UNet module path → LDM module path (``down_blocks.1.attentions.0.proj_in`` →
    ``input_blocks.4.1.proj_in``), by the same rules the checkpoint loader uses."""
    up_attention = [t.startswith("CrossAttn") for t in unet_layout["up_block_types"]]
    key = layouts.unet_key_to_ldm(path + ".weight", unet_layout["layers_per_block"], up_attention)
    return key[len(layouts.UNET_PREFIX):-len(".weight")]


def kohya_name(family: str, component: str, path: str, unet_layout: Mapping) -> str:
    """The module name kohya would write for ``component``/``path``."""
    record = FAMILIES[family]
    if component == "unet":
        if record.kohya_unet_names == "ldm":
            path = ldm_module_path(path, unet_layout)
        return UNET_PREFIX + path.replace(".", "_")
    return record.kohya_text_prefixes[component] + "text_model_" + canonical_path(component, path).replace(".", "_")


def accepted_names(family: str, modules: Iterable[tuple[str, str]], unet_layout: Mapping) -> dict[str, tuple[str, str]]:
    """Every module name a file may use → (component, path), for the given model structure."""
    record = FAMILIES[family]
    names: dict[str, tuple[str, str]] = {}
    for component, path in modules:
        target = (component, canonical_path(component, path))
        if component == "unet":
            names[UNET_PREFIX + path.replace(".", "_")] = target
            try:
                names[UNET_PREFIX + ldm_module_path(path, unet_layout).replace(".", "_")] = target
            except KeyError:
                pass  # a module with no LDM counterpart keeps only its diffusers name
        else:
            flat = target[1].replace(".", "_")
            prefixes = {record.kohya_text_prefixes[component], *record.kohya_text_aliases.get(component, ())}
            for prefix in prefixes:
                names[prefix + "text_model_" + flat] = target
                names[prefix + flat] = target
    return names

"""PEFT ⇄ Adapter: peft's state dicts and configs (LoRA, DoRA, LoHa, LoKr) to our adapter and
back, and injecting an adapter into a model as PEFT LoRA layers.

peft scales a layer by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), with per-layer
``rank_pattern``/``alpha_pattern`` overrides; the loaders scale by ``alpha / rank`` of the
factors themselves. Both directions keep the delta exact.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Mapping

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

from . import keys
from .adapter import Adapter, AdapterModule, LoraFormatError, full_lokr_w2

_PEFT_KEY = re.compile(r"(?P<path>.+)\.(?P<name>lora_A|lora_B|lora_magnitude_vector|hada_\w+|lokr_\w+)(?:\.default)?(?:\.weight)?$")
_PEFT_TO_KOHYA = {"lora_A": "lora_down", "lora_B": "lora_up", "lora_magnitude_vector": "dora_scale"}


def _pattern_value(path: str, pattern: Mapping[str, Any], default: Any) -> Any:
    # peft matches pattern keys as a suffix of the module path (tuners_utils: re.match(rf"(.*\.)?({key})$"))
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _module_from_peft(component: str, path: str, tensors: dict[str, torch.Tensor], config: Mapping) -> AdapterModule:
    """One PEFT layer → the loaders' form. The PEFT scale is alpha/r (alpha/sqrt(r) with rsLoRA),
    r being the configured rank; we store the alpha that gives that scale under the loaders' rule."""
    r = int(_pattern_value(path, config.get("rank_pattern"), config.get("r", 8)))
    alpha = float(_pattern_value(path, config.get("alpha_pattern"), config.get("lora_alpha", config.get("alpha", r))))
    peft_scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    canonical = keys.canonical_path(component, path)
    if "dora_scale" in tensors:
        # peft keeps the magnitude as [out] (Linear) or [1, out, 1, 1] (Conv); LyCORIS and
        # ComfyUI read an output-axis dora_scale as [out, 1] / [out, 1, 1, 1]
        magnitude = tensors["dora_scale"]
        tensors["dora_scale"] = magnitude.reshape(-1, 1) if magnitude.ndim == 1 else magnitude.reshape(-1, 1, 1, 1)
    module = AdapterModule(component, canonical, tensors, None)
    if module.algorithm == "lokr":
        if "lokr_t2" in tensors:
            # ComfyUI 0.3.75 fails on Tucker LoKr (torch.kron of a non-contiguous view); a full
            # w2 gives the same delta everywhere
            tensors["lokr_w2"] = full_lokr_w2(tensors).contiguous()
            for name in ("lokr_w2_a", "lokr_w2_b", "lokr_t2"):
                tensors.pop(name)
        if module.rank is None:
            # no decomposed factor: loaders apply scale 1, so the PEFT scale goes into w1
            tensors["lokr_w1"] = tensors["lokr_w1"] * peft_scale
            return module
    else:
        rank = module.rank
        if module.algorithm == "lora" and rank != r:
            raise LoraFormatError(f"{component}.{path}: lora_A has rank {rank} but the config says {r}.")
    module.alpha = peft_scale * module.rank
    return module


def from_peft(family: str, unet_layout: Mapping, components: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping]]) -> Adapter:
    """Build an adapter from PEFT state dicts (``get_peft_model_state_dict``) and their config dicts
    (LoraConfig with or without DoRA, LoHaConfig, LoKrConfig)."""
    modules: dict[tuple[str, str], AdapterModule] = {}
    for component, (state, config) in components.items():
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = _PEFT_KEY.match(key)
            if not match:
                raise LoraFormatError(f"{component}: unexpected PEFT key {key!r}; LoRA, DoRA, LoHa and LoKr adapters convert.")
            grouped.setdefault(match["path"], {})[_PEFT_TO_KOHYA.get(match["name"], match["name"])] = tensor
        for path, tensors in grouped.items():
            if "lora_down" in tensors or "lora_up" in tensors:
                if not {"lora_down", "lora_up"} <= set(tensors):
                    raise LoraFormatError(f"{component}.{path}: has {sorted(tensors)} but needs both lora_A and lora_B.")
            module = _module_from_peft(component, path, dict(tensors), config)
            modules[(component, module.path)] = module
    return Adapter(family, modules, dict(unet_layout))


def to_peft(adapter: Adapter, component: str, model_paths: set[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT state dict and config kwargs for one component (LoRA/DoRA: LoraConfig; LoHa/LoKr:
    their configs, ``alpha`` in place of ``lora_alpha``).

    ``model_paths`` are the module names of the model it will be injected into, so that a
    text-encoder path gains its ``text_model.`` level where the model has one.
    """
    chosen = [m for m in adapter.modules.values() if m.component == component]
    if not chosen:
        return {}, {}

    def real_path(path: str) -> str:
        if model_paths is None or path in model_paths or component == "unet":
            return path
        return "text_model." + path

    # PEFT's rank is r, and its scale alpha/r; a LoKr without a decomposed factor already
    # carries its scale in w1, so it gets alpha = r.
    peft_rank = {id(m): m.rank or 1 for m in chosen}
    peft_alpha = {id(m): m.scale * peft_rank[id(m)] for m in chosen}
    # The most common rank and alpha become the defaults; the rest go into peft's patterns,
    # which peft matches as regex suffixes of module paths: an escaped full path is exact.
    ranks = Counter(peft_rank.values())
    alphas = Counter(peft_alpha.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    state, targets, rank_pattern, alpha_pattern = {}, [], {}, {}
    for module in chosen:
        path = real_path(module.path)
        targets.append(path)
        for name, tensor in module.tensors.items():
            if name == "lora_down":
                state[f"{path}.lora_A.weight"] = tensor
            elif name == "lora_up":
                state[f"{path}.lora_B.weight"] = tensor
            elif name == "dora_scale":
                shape = (-1,) if module.tensors["lora_down"].ndim == 2 else (1, -1, 1, 1)
                state[f"{path}.lora_magnitude_vector"] = tensor.reshape(shape)
            else:
                state[f"{path}.{name}"] = tensor
        if peft_rank[id(module)] != r:
            rank_pattern[re.escape(path)] = peft_rank[id(module)]
        if peft_alpha[id(module)] != alpha:
            alpha_pattern[re.escape(path)] = peft_alpha[id(module)]
    algorithm = chosen[0].algorithm
    config = {"r": r, "lora_alpha" if algorithm == "lora" else "alpha": alpha, "target_modules": sorted(targets),
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if any("dora_scale" in m.tensors for m in chosen):
        config["use_dora"] = True
    return state, config


def inject(adapter: Adapter, component: str, model: torch.nn.Module, adapter_name: str = "default") -> None:
    """Add the adapter's modules for ``component`` to ``model`` as PEFT LoRA layers.

    Uses peft directly rather than transformers' ``add_adapter``: transformers 5.24 refuses
    peft < 0.22, and 0.21.2 is the newest peft published.
    """
    algorithms = {m.algorithm for m in adapter.modules.values() if m.component == component}
    if algorithms - {"lora"}:
        raise LoraFormatError(f"{component}: {'/'.join(sorted(algorithms))} adapters are applied by merging their "
                              "deltas (AdapterModule.delta), not as PEFT LoRA layers.")
    paths = {name for name, _ in model.named_modules()}
    state, config = to_peft(adapter, component, paths)
    if not state:
        return
    inject_adapter_in_model(LoraConfig(**config), model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise LoraFormatError(f"{component}: {len(unexpected)} adapter tensors found no module (e.g. {unexpected[0]!r}).")

"""LoRA adapters between PEFT/diffusers and the kohya/A1111 file format.

``Adapter`` is our in-memory form: one ``AdapterModule`` per adapted Linear/Conv2d, holding
its low-rank factors under kohya's tensor names (``lora_down`` = PEFT ``lora_A``,
``lora_up`` = PEFT ``lora_B``) and kohya's ``alpha`` (the delta is ``up @ down · alpha / rank``).
Everything else converts to and from it:

    PEFT state dict + LoraConfig ─┐                ┌─ kohya safetensors (ComfyUI, A1111, diffusers)
    diffusers LoRA file ──────────┼──► Adapter ◄───┤
    kohya / A1111 LoRA file ──────┘                └─ PEFT state dict + LoraConfig (sampling, training)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import UserError
from . import keys

COMPONENTS = {"sd1": ("unet", "text_encoder"), "sd2": ("unet", "text_encoder"),
              "sdxl": ("unet", "text_encoder", "text_encoder_2")}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LoraFormatError(UserError):
    """A LoRA file we cannot read, or one that does not fit the base model."""


LORA_TENSORS = ("lora_down", "lora_up", "dora_scale")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass
class AdapterModule:
    """One adapted layer, in the LyCORIS/kohya vocabulary that ComfyUI and A1111 load:
    LoRA ``lora_down``/``lora_up`` (+ DoRA ``dora_scale``), LoHa ``hada_*``, LoKr ``lokr_*``.
    ``alpha`` follows the loaders' rule: scale = alpha / rank, where a LoKr's rank is the
    inner size of its decomposed factor, and a LoKr without one has no alpha (scale 1)."""

    component: str  # unet | text_encoder | text_encoder_2
    path: str  # module path inside the component (text encoders: without "text_model.")
    tensors: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def algorithm(self) -> str:
        if "lora_down" in self.tensors:
            return "lora"
        return "loha" if "hada_w1_a" in self.tensors else "lokr"

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if "lora_down" in t:
            return t["lora_down"].shape[0]
        if "hada_w1_b" in t:
            return t["hada_w1_b"].shape[0]
        for name in ("lokr_w1_b", "lokr_w2_b"):
            if name in t:
                return t[name].shape[0]
        return None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None and self.rank else 1.0

    @property
    def is_3x3_conv(self) -> bool:
        down = self.tensors.get("lora_down", self.tensors.get("hada_t1", self.tensors.get("lokr_w2")))
        return down is not None and down.ndim == 4 and down.shape[-1] > 1

    def delta(self, weight_shape: tuple[int, ...]) -> torch.Tensor:
        """ΔW as loaders add it to a weight of ``weight_shape`` at strength 1 (not for DoRA,
        whose result also renormalises W)."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.algorithm == "lora":
            down, up = t["lora_down"], t["lora_up"]
            product = up.flatten(1) @ down.flatten(1)
        elif self.algorithm == "loha":
            product = _hada_factor(t, "1") * _hada_factor(t, "2")
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = _lokr_w2(t)
            if len(weight_shape) == 4 and w2.ndim == 2:  # non-Tucker conv: w2 is [out2, in2·kh·kw]
                w2 = w2.reshape(w2.shape[0], -1, *weight_shape[2:])
            # conv: the kernel stays on w2's side, as LyCORIS and ComfyUI build it
            product = torch.kron(w1[..., None, None], w2) if w2.ndim == 4 else torch.kron(w1, w2)
        return self.scale * product.reshape(weight_shape)


def _hada_factor(t: Mapping[str, torch.Tensor], i: str) -> torch.Tensor:
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    if f"hada_t{i}" in t:  # Tucker conv: a [r, out], b [r, in], t [r, r, kh, kw]
        return torch.einsum("ijkl,jr,ip->prkl", t[f"hada_t{i}"], b, a)
    return a @ b


def _lokr_w2(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "lokr_w2" in t:
        return t["lokr_w2"]
    if "lokr_t2" in t:
        return torch.einsum("ijkl,jr,ip->prkl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    return t["lokr_w2_a"] @ t["lokr_w2_b"]


@dataclass
class Adapter:
    family: str
    modules: dict[tuple[str, str], AdapterModule]
    unet_layout: dict  # layers_per_block, up_block_types: enough to name SDXL modules the LDM way
    metadata: dict[str, str] = field(default_factory=dict)

    def components(self) -> list[str]:
        return sorted({component for component, _ in self.modules})

    def summary(self) -> dict[str, Any]:
        ranks = Counter(m.rank for m in self.modules.values())
        alphas = Counter(m.alpha for m in self.modules.values())
        algorithms = Counter(m.algorithm for m in self.modules.values())
        return {
            "family": self.family,
            "algorithm": "+".join(sorted(algorithms)) or "lora",
            "dora": any("dora_scale" in m.tensors for m in self.modules.values()),
            "modules": dict(Counter(component for component, _ in self.modules)),
            "rank": ranks.most_common(1)[0][0] if ranks else None,
            "ranks": {str(k): v for k, v in ranks.items()},
            "alpha": alphas.most_common(1)[0][0] if alphas else None,
            "alphas": {str(k): v for k, v in alphas.items()},
            "conv_modules": sum(m.is_3x3_conv for m in self.modules.values()),
        }


def unet_layout_of(unet_config: Mapping) -> dict:
    return {"layers_per_block": unet_config["layers_per_block"], "up_block_types": list(unet_config["up_block_types"])}


# --- Model structure ----------------------------------------------------------------


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
    for component, module in zip(COMPONENTS[family], [unet, *text_encoders]):
        for path, child in module.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) or ".lora_" in path:
                continue
            # a model that already carries a PEFT adapter wraps each target: "<path>.base_layer"
            path = path.removesuffix(".base_layer")
            shapes[(component, keys.canonical_path(component, path))] = tuple(child.weight.shape)
    return Structure(family, shapes, unet_layout_of(unet.config))


def reference_structure(family: str) -> Structure:
    """The structure of the real model of ``family``, built on the meta device (no memory, ~1 s)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from ..models.core import family_config

    config = family_config(family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config["unet"])
        encoders = [getattr(transformers, e["model_class"])(transformers.CLIPTextConfig(**e["config"]))
                    for e in config["text_encoders"]]
    return structure_of(family, unet, encoders)


def structure_of_base(base) -> Structure:
    """Structure of a loaded ``models.core.BaseModel``."""
    return structure_of(base.family, base.unet, base.text_encoders)


# --- PEFT ⇄ Adapter -----------------------------------------------------------------

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
            tensors["lokr_w2"] = _lokr_w2(tensors).contiguous()
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
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

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


# --- kohya ⇄ Adapter ----------------------------------------------------------------


def to_kohya(adapter: Adapter, dtype: torch.dtype = torch.float16, bake_alpha: bool = False) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors. ``bake_alpha`` folds a LoRA's alpha/rank into ``lora_up`` and writes
    alpha = rank: the same delta in every loader, including diffusers 0.42, which misapplies
    per-module alphas."""
    out = {}
    for module in adapter.modules.values():
        name = keys.kohya_name(adapter.family, module.component, module.path, adapter.unet_layout)
        alpha = module.alpha
        for tensor_name, tensor in module.tensors.items():
            if bake_alpha and tensor_name == "lora_up":
                tensor, alpha = tensor.float() * module.scale, float(module.rank)
            suffix = ".weight" if tensor_name in ("lora_down", "lora_up") else ""
            # DoRA magnitudes stay fp32, as LyCORIS stores them
            out[f"{name}.{tensor_name}{suffix}"] = tensor.to(torch.float32 if tensor_name == "dora_scale" else dtype).contiguous()
        if alpha is not None:
            # alpha stays float32: every loader calls .item() on it, and bf16 loses precision above 256
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


_KOHYA_KEY = re.compile(r"(?P<module>lora_(?:unet|te\d?)_[^.]+)\.(?P<tensor>lora_down\.weight|lora_up\.weight|alpha|dora_scale|hada_\w+|lokr_\w+)$")


def guess_family(names: list[str], shapes: Mapping[str, tuple]) -> str | None:
    """Which base family a LoRA was made for, from its key names and shapes alone."""
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names):
        return "sdxl"
    for name, shape in shapes.items():
        # the input width of a low-rank "down" factor is the layer's: context size for attn2.to_k
        if not any(tag in name for tag in ("lora_down", "lora_A", "hada_w1_b")):
            continue
        if re.search(r"attn2[._]to_k[._]", name):
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(shape[-1])
        if re.search(r"(lora_te_|text_encoder\.).*layers[._]0[._]self_attn[._]q_proj[._]", name):
            return {768: "sd1", 1024: "sd2"}.get(shape[-1])
    return None


def _check_family(path: Path, structure: Structure, file_family: str | None, unmatched: list[str], total: int) -> None:
    if file_family and file_family != structure.family:
        raise LoraFormatError(f"{path}: a LoRA for {DISPLAY[file_family]}, but the base model is {DISPLAY[structure.family]}; use it with a {DISPLAY[file_family]} checkpoint.")
    if unmatched:
        raise LoraFormatError(f"{path}: {len(unmatched)} of {total} LoRA modules match no layer of the {DISPLAY[structure.family]} base (e.g. {unmatched[0]!r}); it was made for a different model.")


DISPLAY = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def from_kohya(tensors: Mapping[str, torch.Tensor], structure: Structure, path: Path) -> Adapter:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    # A1111's bundled embeddings ride along in some LoRA files; they are not layers (read them
    # with converters.embeddings.read_embedding).
    tensors = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    for key, tensor in tensors.items():
        match = _KOHYA_KEY.match(key)
        if not match:
            raise LoraFormatError(f"{path}: unsupported tensor {key!r}; this reader handles kohya LoRA (lora_down/lora_up/alpha).")
        grouped.setdefault(match["module"], {})[match["tensor"]] = tensor
    names = structure.names()
    unmatched = [name for name in grouped if name not in names]
    _check_family(path, structure, guess_family(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()}),
                  unmatched, len(grouped))
    modules = {}
    for name, parts in grouped.items():
        tensors = {k.removesuffix(".weight"): v for k, v in parts.items() if k != "alpha"}
        alpha = float(parts["alpha"].item()) if "alpha" in parts else None
        component, module_path = names[name]
        module = AdapterModule(component, module_path, tensors, alpha)
        if module.algorithm == "lora" and not {"lora_down", "lora_up"} <= set(tensors):
            raise LoraFormatError(f"{path}: module {name!r} lacks lora_down or lora_up; the file is incomplete.")
        if module.algorithm == "loha" and not {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(tensors):
            raise LoraFormatError(f"{path}: LoHa module {name!r} lacks one of hada_w1_a/w1_b/w2_a/w2_b; the file is incomplete.")
        if alpha is None and module.algorithm != "lokr":
            module.alpha = float(module.rank)  # no alpha means scale 1, for kohya, ComfyUI and A1111 alike
        modules[(component, module_path)] = module
    return Adapter(structure.family, modules, structure.unet_layout)


# --- diffusers / PEFT files ---------------------------------------------------------


def from_diffusers_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], structure: Structure,
                        path: Path) -> Adapter:
    """A diffusers ``save_lora_weights`` file: ``unet.<path>.lora_A.weight`` … plus the LoraConfig
    of each component in the ``lora_adapter_metadata`` JSON (``unet.r``, ``unet.lora_alpha`` …)."""
    config_json = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    per_component: dict[str, tuple[dict, dict]] = {}
    for key, tensor in tensors.items():
        key = key.removeprefix("base_model.model.")  # peft's own save_pretrained of a PeftModel
        component, _, rest = key.partition(".")
        if component not in COMPONENTS[structure.family]:
            if component in ("text_encoder_2",):
                raise LoraFormatError(f"{path}: a LoRA for SDXL (it has text_encoder_2 keys), but the base model is {DISPLAY[structure.family]}.")
            component, rest = "unet", key  # bare PEFT keys: a UNet adapter
        per_component.setdefault(component, ({}, {}))[0][rest] = tensor
    for component, (_, config) in per_component.items():
        prefix = component + "."
        config.update({k[len(prefix):]: v for k, v in config_json.items() if k.startswith(prefix)})
    file_family = guess_family(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()})
    adapter = from_peft(structure.family, structure.unet_layout, per_component)
    unmatched = [f"{c}.{p}" for c, p in adapter.modules if (c, p) not in structure.shapes]
    _check_family(path, structure, file_family, unmatched, len(adapter.modules))
    return adapter


def to_diffusers_file(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, config_json = {}, {}
    for component in adapter.components():
        state, config = to_peft(adapter, component)
        tensors.update({f"{component}.{k}": v.contiguous() for k, v in state.items()})
        config_json.update({f"{component}.{k}": v for k, v in config.items()})
    return tensors, {"lora_adapter_metadata": json.dumps(config_json, indent=2, sort_keys=True)}


# --- Files --------------------------------------------------------------------------


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file; check the path.")
    if path.stat().st_size == 0:
        raise LoraFormatError(f"{path}: the file is empty (0 bytes); fetch it again.")
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path}: only .safetensors LoRA files are read (pickled .pt/.ckpt files can run code); convert it to safetensors first.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:120]}); download it again.") from None


def load_adapter(path: str | Path, structure: Structure) -> Adapter:
    """Read a kohya/A1111 or diffusers/PEFT LoRA file into an adapter for ``structure``'s model."""
    path = Path(path).expanduser()
    tensors, metadata = read_lora_file(path)
    if not tensors:
        raise LoraFormatError(f"{path}: holds no tensors; it is not a LoRA.")
    if any(k.startswith("lora_") for k in tensors):
        adapter = from_kohya(tensors, structure, path)
    elif any(".lora_A." in k or ".lora_B." in k for k in tensors):
        adapter = from_diffusers_file(tensors, metadata, structure, path)
    elif any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in tensors):
        raise LoraFormatError(f"{path}: a full checkpoint, not a LoRA; load it as the base model.")
    else:
        raise LoraFormatError(f"{path}: no LoRA tensors (lora_down/lora_up or lora_A/lora_B) in it; it is not a LoRA we can read.")
    adapter.metadata = metadata
    return adapter


def detect_family(path: str | Path) -> str:
    tensors, _ = read_lora_file(path)
    family = guess_family(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()})
    if family is None:
        raise LoraFormatError(f"{path}: cannot tell which base model family this LoRA is for from its keys; pass --base with the checkpoint it belongs to.")
    return family


def data_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the safetensors data section (header excluded), as kohya's ``sshs_model_hash``:
    metadata can change without changing the hash users compare."""
    from safetensors.torch import save

    blob = save(dict(tensors))
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def output_path_in(folder: str | Path, name: str) -> Path:
    """``folder/name`` for a user-given file name, refusing names that would leave the folder."""
    folder = Path(folder).resolve()
    candidate = (folder / name).resolve()
    if not name or name != Path(name).name or candidate.parent != folder:
        raise UserError(f"{name!r}: give a plain file name (no folders or '..'); the file is written into {folder}.")
    return candidate


def write_atomically(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str], overwrite: bool) -> Path:
    """Write to a temp file beside ``path`` and rename: never a half-written file, never an
    existing file replaced unless asked."""
    from safetensors.torch import save_file

    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite (or choose another name) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def structure_of_checkpoint(path: str | Path) -> Structure:
    """The adaptable modules of a checkpoint's model, built from its header alone (meta device)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from ..models.core import inspect

    info = inspect(path)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(info.unet_config)
        encoders = [getattr(transformers, s.model_class)(transformers.CLIPTextConfig(**s.config))
                    for s in info.text_encoders]
    return structure_of(info.family, unet, encoders)


def save_kohya(adapter: Adapter, path: str | Path, dtype: str = "fp16", overwrite: bool = False,
               keep_metadata: Mapping[str, str] | None = None, bake_alpha: bool = False,
               extra_tensors: Mapping[str, torch.Tensor] | None = None, **metadata_fields: Any) -> Path:
    """Write the kohya/A1111 file with its ss_*/modelspec metadata (atomically).

    ``keep_metadata`` (e.g. a converted file's training record) is kept except where our
    computed keys (hash, architecture, network shape) supersede it. ``extra_tensors`` are
    written as given (A1111's bundled embeddings, ``bundle_emb.*``).
    """
    from .metadata import build_metadata

    path = Path(path).expanduser()
    tensors = {**to_kohya(adapter, SAVE_DTYPES[dtype], bake_alpha), **dict(extra_tensors or {})}
    kept = dict(keep_metadata or {})
    kept.pop("lora_adapter_metadata", None)
    output_name = metadata_fields.pop("output_name", None) or kept.get("ss_output_name") or path.stem
    metadata = {**kept, **build_metadata(adapter, data_sha256(tensors), output_name, **metadata_fields)}
    return write_atomically(tensors, path, metadata, overwrite)


def save_peft(adapter: Adapter, path: str | Path, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Write diffusers' ``save_lora_weights`` layout (loadable with ``load_lora_weights``)."""
    tensors, metadata = to_diffusers_file(adapter)
    tensors = {k: v.to(SAVE_DTYPES[dtype]) for k, v in tensors.items()}
    return write_atomically(tensors, Path(path).expanduser(), metadata, overwrite)

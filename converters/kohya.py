"""kohya / A1111 LoRA files ⇄ Adapter: the format ComfyUI's LoraLoader, A1111/Forge and
diffusers' ``load_lora_weights`` all read.

Module names follow ``keys``; tensors are ``<name>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha`` (LoRA, + ``.dora_scale``), ``.hada_*`` (LoHa) or ``.lokr_*`` (LoKr); the file
carries kohya's ``ss_*`` and Stability's ``modelspec.*`` metadata (``metadata``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

from ..models.families import FAMILIES, family_config
from ..models.load import DTYPES
from ..runtime.files import write_safetensors
from . import keys
from .adapter import Adapter, AdapterModule, LoraFormatError
from .metadata import build_metadata, data_sha256
from .structure import Structure


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


@lru_cache(maxsize=None)
def _family_clues() -> tuple[dict[str, str], dict[int, str], dict[int, str], re.Pattern]:
    """What tells the families apart in a LoRA file, from their records and reference configs:
    a name prefix only one family's extra text encoder has (SDXL's ``lora_te2_``), the
    cross-attention width of the UNet, and the width of a single text encoder."""
    markers = {}  # name prefix → family
    for record in FAMILIES.values():
        if len(record.text_encoders) > 1:
            last = record.text_encoders[-1]
            markers[record.kohya_text_prefixes[last]] = markers[last + "."] = record.name
    context = {family_config(name)["unet"]["cross_attention_dim"]: name for name in FAMILIES}
    singles = [record for record in FAMILIES.values() if len(record.text_encoders) == 1]
    text_width = {family_config(r.name)["text_encoders"][0]["config"]["hidden_size"]: r.name for r in singles}
    single_names = sorted({r.kohya_text_prefixes[r.text_encoders[0]] for r in singles}
                          | {r.text_encoders[0] + "." for r in singles})
    first_query = re.compile("(" + "|".join(map(re.escape, single_names)) + r").*layers[._]0[._]self_attn[._]q_proj[._]")
    return markers, context, text_width, first_query


def guess_family(names: list[str], shapes: Mapping[str, tuple]) -> str | None:
    """Which base family a LoRA was made for, from its key names and shapes alone."""
    markers, context, text_width, first_query = _family_clues()
    for name in names:
        for prefix, family in markers.items():
            if name.startswith(prefix):
                return family
    for name, shape in shapes.items():
        # the input width of a low-rank "down" factor is the layer's: context size for attn2.to_k
        if not any(tag in name for tag in ("lora_down", "lora_A", "hada_w1_b")):
            continue
        if re.search(r"attn2[._]to_k[._]", name):
            return context.get(shape[-1])
        if first_query.search(name):
            return text_width.get(shape[-1])
    return None


def check_family(path: Path, structure: Structure, file_family: str | None, unmatched: list[str], total: int) -> None:
    """Refuse a LoRA made for another family, or one whose modules the base does not have."""
    display = FAMILIES[structure.family].display
    if file_family and file_family != structure.family:
        theirs = FAMILIES[file_family].display
        raise LoraFormatError(f"{path}: a LoRA for {theirs}, but the base model is {display}; use it with a {theirs} checkpoint.")
    if unmatched:
        raise LoraFormatError(f"{path}: {len(unmatched)} of {total} LoRA modules match no layer of the {display} base (e.g. {unmatched[0]!r}); it was made for a different model.")


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
    check_family(path, structure, guess_family(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()}),
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


def save_kohya(adapter: Adapter, path: str | Path, dtype: str = "fp16", overwrite: bool = False,
               keep_metadata: Mapping[str, str] | None = None, bake_alpha: bool = False,
               extra_tensors: Mapping[str, torch.Tensor] | None = None, **metadata_fields: Any) -> Path:
    """Write the kohya/A1111 file with its ss_*/modelspec metadata (one durable write).

    ``keep_metadata`` (e.g. a converted file's training record) is kept except where our
    computed keys (hash, architecture, network shape) supersede it. ``extra_tensors`` are
    written as given (A1111's bundled embeddings, ``bundle_emb.*``).
    """
    path = Path(path).expanduser()
    tensors = {**to_kohya(adapter, DTYPES[dtype], bake_alpha), **dict(extra_tensors or {})}
    kept = dict(keep_metadata or {})
    kept.pop("lora_adapter_metadata", None)
    output_name = metadata_fields.pop("output_name", None) or kept.get("ss_output_name") or path.stem
    metadata = {**kept, **build_metadata(adapter, data_sha256(tensors), output_name, **metadata_fields)}
    return write_safetensors(path, tensors, metadata, overwrite)

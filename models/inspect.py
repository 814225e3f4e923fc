"""Inspection: everything we learn about a base model before (or without) loading it, and the
report the ``inspect`` command and node show.

A single-file checkpoint is identified (``identify``), its component configs are derived from
its shapes (``derive``), and its parameters are counted; a diffusers folder is read from its
config files. Both give a ``CheckpointInfo``, which is all the loader needs.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import CheckpointError
from . import layouts
from .derive import TextEncoderSpec, derive_text_encoder_specs, derive_unet_config, derive_vae_config
from .families import FAMILIES, family_config
from .files import TensorIndex, index_checkpoint
from .identify import detect_prediction_type, identify_family, identify_folder_family


@dataclass
class CheckpointInfo:
    """Everything we learned about a base model before (or without) loading it."""

    path: str
    source: str  # "single-file" | "diffusers-folder"
    file_format: str
    size_bytes: int
    family: str
    display_name: str
    prediction_type: str
    prediction_evidence: str
    resolution: int
    variant: str  # "standard" | "inpainting"
    file_dtype: str
    unet_config: dict
    vae_config: dict
    text_encoders: list[TextEncoderSpec]
    param_counts: dict[str, int]
    ignored_keys: dict[str, int] = field(default_factory=dict)  # key group → count
    matches_reference_sizes: bool = False  # same sizes as the real model of the family

    def to_json(self) -> dict:
        out = asdict(self)
        out["text_encoders"] = [asdict(t) for t in self.text_encoders]
        return out


def _component_params(shapes: Mapping, prefix: str, skip: Callable[[str], bool] = lambda k: False) -> int:
    return sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(prefix) and not skip(key))


def _unused_by(spec: TextEncoderSpec, shapes: Mapping) -> Callable[[str], bool]:
    """Which of a text encoder's file tensors the loaded model does not use (not counted)."""
    layers = layouts.open_clip_layer_count(shapes, spec.checkpoint_prefix)
    first_unused = layers - spec.unused_checkpoint_layers
    resblock = re.compile(re.escape(spec.checkpoint_prefix) + r"transformer\.resblocks\.(\d+)\.")

    def unused(key: str) -> bool:
        if key.endswith(("position_ids", "logit_scale")):
            return True
        if spec.model_class == "CLIPTextModel" and key.endswith("text_projection"):
            return True
        match = resblock.match(key)
        return bool(match and int(match[1]) >= first_unused)
    return unused


def _group_key(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) + ".*" if len(parts) > 2 else key


def inspect_single_file(path: str | Path, prediction_type: str = "auto") -> tuple[CheckpointInfo, TensorIndex]:
    index = index_checkpoint(path)
    family = identify_family(index)
    try:
        return _inspect_indexed(index, family, prediction_type), index
    except KeyError as err:
        raise CheckpointError(f"{index.path}: looks like {family} but lacks the tensor {err.args[0]!r}; the file is incomplete or not a standard model.") from None


def _inspect_indexed(index: TensorIndex, family: str, prediction_type: str) -> CheckpointInfo:
    record, template = FAMILIES[family], family_config(family)
    specs = derive_text_encoder_specs(index.shapes, family)
    pooled = specs[-1].config.get("projection_dim") if record.pooled_text else None
    # Resolution depends on the prediction type, which for SD2 needs the UNet layout:
    # derive once at the family default, detect, then derive again at the right size.
    provisional = derive_unet_config(index.shapes, family, 512, "epsilon", pooled, index.path)
    prediction, evidence = detect_prediction_type(index, family, provisional, prediction_type)
    resolution = record.for_prediction(record.resolution, prediction)
    # A file may say what size it was trained at (the ModelSpec key); the built-in shapes base
    # does (64 px), real SD files mostly do not and get their family's size.
    stated = re.fullmatch(r"(\d+)x\1", index.metadata.get("modelspec.resolution", "").strip())
    if stated and int(stated[1]) % 8 == 0 and 64 <= int(stated[1]) <= 4096:
        resolution = int(stated[1])
    unet_config = derive_unet_config(index.shapes, family, resolution, prediction, pooled, index.path)
    vae_config = derive_vae_config(index.shapes, family, resolution)
    unet_config["sample_size"] = resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)

    counts = {"unet": _component_params(index.shapes, layouts.UNET_PREFIX),
              "vae": _component_params(index.shapes, layouts.VAE_PREFIX)}
    used_prefixes = [layouts.UNET_PREFIX, layouts.VAE_PREFIX]
    for spec in specs:
        counts[spec.name] = _component_params(index.shapes, spec.checkpoint_prefix, _unused_by(spec, index.shapes))
        used_prefixes.append(spec.checkpoint_prefix)
    ignored = Counter(_group_key(k) for k in index.shapes if not k.startswith(tuple(used_prefixes)))
    unet_dtypes = Counter(index.dtypes[k] for k in index.shapes if k.startswith(layouts.UNET_PREFIX))
    info = CheckpointInfo(
        path=str(index.path), source="single-file", file_format=index.file_format,
        size_bytes=index.path.stat().st_size, family=family, display_name=record.title,
        prediction_type=prediction, prediction_evidence=evidence, resolution=resolution,
        variant="inpainting" if unet_config["in_channels"] == 9 else "standard",
        file_dtype=unet_dtypes.most_common(1)[0][0], unet_config=unet_config, vae_config=vae_config,
        text_encoders=specs, param_counts=counts, ignored_keys=dict(ignored),
        matches_reference_sizes=_same_sizes(unet_config, template["unet"]) and all(
            s.config["hidden_size"] == e["config"]["hidden_size"] and s.config["num_hidden_layers"] == e["config"]["num_hidden_layers"]
            for s, e in zip(specs, template["text_encoders"])),
    )
    return info


def _same_sizes(derived: Mapping, reference: Mapping) -> bool:
    keys = ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels")
    return all(list(derived[k]) == list(reference[k]) if isinstance(reference[k], list) else derived[k] == reference[k] for k in keys)


def inspect_diffusers_folder(path: str | Path) -> CheckpointInfo:
    path = Path(path).expanduser()
    try:
        index_json = json.loads((path / "model_index.json").read_text())
        unet_config = json.loads((path / "unet" / "config.json").read_text())
        vae_config = json.loads((path / "vae" / "config.json").read_text())
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: a diffusers folder missing {Path(err.filename).relative_to(path)}; it needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/ with their configs.") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: a diffusers config file is not valid JSON ({err}); repair or re-download the folder.") from None
    family = identify_folder_family(path, index_json, unet_config)
    template = family_config(family)
    prediction = scheduler_config.get("prediction_type", "epsilon")
    specs = []
    for entry in template["text_encoders"]:
        if entry["name"] not in index_json:
            raise CheckpointError(f"{path}: model_index.json lists no {entry['name']}; a {family} folder needs it.")
        config = json.loads((path / entry["name"] / "config.json").read_text())
        specs.append(TextEncoderSpec(**{k: v for k, v in entry.items() if k != "config"}, config=config))
    counts = {}
    for component in ["unet", "vae"] + [s.name for s in specs]:
        total = 0
        for weights in sorted((path / component).glob("*.safetensors")):
            total += sum(math.prod(s) for s in index_checkpoint(weights).shapes.values())
        counts[component] = total
    resolution = unet_config.get("sample_size", 64) * 8
    return CheckpointInfo(
        path=str(path), source="diffusers-folder", file_format="diffusers", size_bytes=sum(
            f.stat().st_size for f in path.rglob("*") if f.is_file()),
        family=family, display_name=FAMILIES[family].title, prediction_type=prediction,
        prediction_evidence="scheduler/scheduler_config.json", resolution=resolution,
        variant="inpainting" if unet_config.get("in_channels") == 9 else "standard",
        file_dtype=str(index_json.get("_dtype", "see weights")), unet_config=unet_config,
        vae_config=vae_config, text_encoders=specs, param_counts=counts,
        matches_reference_sizes=_same_sizes(unet_config, template["unet"]))


def inspect(path: str | Path, prediction_type: str = "auto") -> CheckpointInfo:
    path = Path(path).expanduser()
    if path.is_dir() and (path / "model_index.json").exists():
        return inspect_diffusers_folder(path)
    return inspect_single_file(path, prediction_type)[0]


# --- The report ---------------------------------------------------------------------


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}K"


def describe(info: CheckpointInfo, load_seconds: float | None = None, dtype: torch.dtype | None = None) -> str:
    """The human-readable inspection report (CLI and node)."""
    size = info.size_bytes
    size_text = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    unet = info.unet_config
    lines = [
        f"file:           {info.path} ({size_text}, {info.file_format}, weights in {info.file_dtype})",
        f"family:         {info.family} ({info.display_name}){'' if info.variant == 'standard' else ', ' + info.variant}",
        f"prediction:     {info.prediction_type} ({info.prediction_evidence})",
        f"resolution:     {info.resolution} px",
        f"architecture:   {'same sizes as the reference ' + info.display_name if info.matches_reference_sizes else 'non-standard sizes (a small or custom model)'}",
        f"unet:           {_millions(info.param_counts['unet'])} params; channels {'-'.join(map(str, unet['block_out_channels']))}, "
        f"{unet['layers_per_block']} layers/level, cross-attention {unet['cross_attention_dim']}",
        f"vae:            {_millions(info.param_counts['vae'])} params; latent channels {info.vae_config['latent_channels']}, "
        f"scaling factor {info.vae_config['scaling_factor']}",
    ]
    for spec in info.text_encoders:
        cfg = spec.config
        kind = "CLIP" if spec.layout == "hf_clip" else "OpenCLIP"
        lines.append(f"{spec.name + ':':<16}{_millions(info.param_counts.get(spec.name, 0))} params; {kind}, "
                     f"{cfg['num_hidden_layers']} layers, width {cfg['hidden_size']}")
    if info.ignored_keys:
        groups = ", ".join(f"{k} ({v})" for k, v in sorted(info.ignored_keys.items())[:6])
        lines.append(f"not used:       {sum(info.ignored_keys.values())} tensors: {groups}")
    if load_seconds is not None:
        lines.append(f"loaded:         in {load_seconds:.1f} s as {str(dtype).replace('torch.', '')}, offline")
    return "\n".join(lines)

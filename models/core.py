"""Base models: find out what a checkpoint is, and load it as diffusers components, offline.

Everything is derived from the file itself: the family (SD1.x / SD2.x / SDXL) from the
key layout, the component sizes from tensor shapes, the prediction type from markers in
the file. The few facts a file cannot tell (attention heads, activation functions, VAE
scaling, scheduler betas) come from the family configs shipped in ``configs/``. Nothing
is downloaded, so ``HF_HUB_OFFLINE`` does not matter.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointError
from . import layouts

CONFIG_DIR = Path(__file__).parent / "configs"
TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"
FAMILIES = ("sd1", "sd2", "sdxl")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "fp8_e4m3", "F8_E5M2": "fp8_e5m2"}
# A header this large is not a model header: it is some other file read as one.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@lru_cache(maxsize=None)
def family_config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


# --- Reading files ------------------------------------------------------------------


@dataclass
class TensorIndex:
    """What a checkpoint holds, without its data: shapes, dtypes, metadata, a reader."""

    path: Path
    file_format: str  # "safetensors" | "pickle"
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    read: Callable[[str], torch.Tensor]  # key → tensor (CPU)


def _describe_start(data: bytes) -> str:
    text = data[:40].decode("utf-8", errors="replace").replace("\n", " ").strip()
    return text if text else repr(data[:16])


def _looks_like_text(data: bytes) -> bool:
    if not data:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in data)
    return printable / len(data) > 0.95


def _index_safetensors(path: Path) -> TensorIndex:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, too short to be a safetensors file; the download was probably cut off, download it again.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            start = head + handle.read(56)
            if _looks_like_text(start):
                raise CheckpointError(f"{path}: this is a text file, not a model (it starts with {_describe_start(start)!r}); point to the .safetensors checkpoint itself.")
            if header_len <= _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: truncated: its header alone needs {header_len + 8} bytes but the file has {size}; download it again.")
            raise CheckpointError(f"{path}: not a safetensors file (its first bytes are no safetensors header); use a .safetensors or .ckpt Stable Diffusion checkpoint.")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON); download the file again.") from None
    metadata = header.pop("__metadata__", None) or {}
    shapes, dtypes, data_end = {}, {}, 0
    for key, entry in header.items():
        try:
            shapes[key] = tuple(entry["shape"])
            dtypes[key] = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
            data_end = max(data_end, entry["data_offsets"][1])
        except (TypeError, KeyError, IndexError):
            raise CheckpointError(f"{path}: corrupt safetensors header (entry {key!r} is malformed); download the file again.") from None
    available = size - 8 - header_len
    if data_end > available:
        raise CheckpointError(f"{path}: truncated: its tensors need {data_end + 8 + header_len} bytes but the file has {size} ({100 * size / (data_end + 8 + header_len):.0f}%); download it again.")

    def read(key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    return TensorIndex(path, "safetensors", shapes, dtypes, {str(k): str(v) for k, v in metadata.items()}, read)


def _index_pickle(path: Path) -> TensorIndex:
    with path.open("rb") as handle:
        start = handle.read(64)
    if not (start.startswith(b"PK\x03\x04") or start[:1] == b"\x80"):
        if _looks_like_text(start):
            raise CheckpointError(f"{path}: this is a text file, not a model (it starts with {_describe_start(start)!r}); point to the checkpoint itself.")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip or pickle signature); use a .safetensors or .ckpt Stable Diffusion checkpoint.")
    import pickle

    try:
        # weights_only: a .ckpt is a pickle, and a pickle can run code. We accept tensors and
        # plain containers only; anything else is refused before it can execute.
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=start.startswith(b"PK"))
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0][:160]
        raise CheckpointError(f"{path}: refused to load: it holds Python objects, not only tensors, and loading those could run code ({reason}); convert it to .safetensors with a tool you trust, or use a .safetensors download.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch file ({str(err).splitlines()[0][:120]}); download it again.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors; it is not a Stable Diffusion checkpoint.")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return TensorIndex(path, "pickle", {k: tuple(v.shape) for k, v in tensors.items()},
                       {k: str(v.dtype).replace("torch.", "").replace("float", "fp") for k, v in tensors.items()},
                       {}, tensors.__getitem__)


def index_checkpoint(path: str | Path) -> TensorIndex:
    """Open a single-file checkpoint far enough to know its keys and shapes."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; check the path.")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder without model_index.json, so not a diffusers model folder; point to a .safetensors/.ckpt file or a diffusers folder.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the download or copy failed, fetch it again.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _index_pickle(path)
    return _index_safetensors(path)


# --- What is this file? -------------------------------------------------------------

_TE_LAYOUTS = {  # single-file text-encoder prefixes → (family, description)
    "cond_stage_model.transformer.": "sd1",
    "cond_stage_model.model.": "sd2",
    "conditioner.embedders.1.model.": "sdxl",
}


def _count_prefix(keys, prefix: str) -> int:
    return sum(k.startswith(prefix) for k in keys)


def identify_family(index: TensorIndex) -> str:
    """The base family, or a ``CheckpointError`` that says what the file is instead."""
    keys = index.shapes.keys()
    path, n = index.path, len(index.shapes)
    if n == 0:
        raise CheckpointError(f"{path}: holds no tensors at all; it is not a model.")
    unet_keys = _count_prefix(keys, layouts.UNET_PREFIX)
    if unet_keys:
        if any(re.match(r"model\.diffusion_model\.(joint_blocks|double_blocks|single_blocks|transformer_blocks|x_embedder)", k) for k in keys):
            raise CheckpointError(f"{path}: a transformer-based diffusion model (SD3/Flux-style), not a Stable Diffusion UNet; use an SD1.x, SD2.x or SDXL checkpoint.")
        if layouts.UNET_PREFIX + "input_blocks.0.0.weight" not in index.shapes:
            raise CheckpointError(f"{path}: has model.diffusion_model.* keys but no UNet input block; it is not an SD1.x/SD2.x/SDXL checkpoint.")
        if _count_prefix(keys, "conditioner.embedders.0.model.") and not _count_prefix(keys, "conditioner.embedders.1."):
            raise CheckpointError(f"{path}: an SDXL *refiner* (one OpenCLIP text encoder); DreamBooth trains the SDXL base, use sd_xl_base or a model derived from it.")
        found = [fam for prefix, fam in _TE_LAYOUTS.items() if _count_prefix(keys, prefix)]
        if "sdxl" in found and _count_prefix(keys, "conditioner.embedders.0.transformer."):
            family = "sdxl"
        elif len(found) == 1 and found[0] != "sdxl":
            family = found[0]
        elif not found:
            raise CheckpointError(f"{path}: has a UNet but no text encoder ({unet_keys} UNet tensors only); DreamBooth needs a full checkpoint with UNet, VAE and text encoder.")
        else:
            raise CheckpointError(f"{path}: mixes text-encoder layouts of several families ({', '.join(found)}); it is not a checkpoint we can read.")
        if not _count_prefix(keys, layouts.VAE_PREFIX):
            raise CheckpointError(f"{path}: a {family} checkpoint without a VAE (no first_stage_model.* tensors); use a full checkpoint, or one saved with its VAE baked in.")
        return family
    lora = sum(bool(re.search(r"(lora_(up|down|A|B)\b|\.lora_|^lora_(unet|te)|hada_w|lokr_w|\.alpha$|dora_scale)", k)) for k in keys)
    if lora and 2 * lora >= n:  # most of the file is adapter tensors
        return _raise(path, f"a LoRA ({n} tensors), not a base model; load it as a LoRA on top of a checkpoint (ComfyUI's LoraLoader, A1111's models/Lora folder)")
    if any(k.startswith(("string_to_param", "emb_params")) for k in keys) or set(keys) <= {"clip_l", "clip_g", "emb_params"}:
        return _raise(path, "a textual-inversion embedding, not a base model; put it in models/embeddings")
    if any(k.startswith(("control_model.", "input_hint_block.", "controlnet_cond_embedding.")) for k in keys):
        return _raise(path, "a ControlNet, not a base model")
    bare = {k.split(".", 1)[0] for k in keys}
    if {"encoder", "decoder"} <= bare and ("quant_conv" in bare or "post_quant_conv" in bare):
        return _raise(path, "a standalone VAE, not a full checkpoint; put it in models/vae and use a full SD checkpoint as the base")
    if _count_prefix(keys, layouts.VAE_PREFIX) == n:
        return _raise(path, "a VAE only (first_stage_model.*), not a full checkpoint")
    if {"conv_in", "time_embedding", "down_blocks"} <= bare:
        return _raise(path, "diffusers-format UNet weights alone; point to the diffusers model folder (the one with model_index.json) instead")
    if any(k.startswith(("text_model.", "encoder.layers.", "transformer.resblocks.")) for k in keys) and "decoder" not in bare:
        return _raise(path, "a text encoder alone, not a full checkpoint")
    examples = ", ".join(repr(k) for k in list(keys)[:3])
    return _raise(path, f"not a Stable Diffusion checkpoint: none of its {n} tensors (e.g. {examples}) belongs to an SD UNet")


def _raise(path: Path, what: str):
    raise CheckpointError(f"{path}: {what}.")


# --- Configs from shapes ------------------------------------------------------------


def _transformer_depth(shapes: Mapping, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"transformer_blocks\.(\d+)\.")
    found = {int(m[1]) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def derive_unet_config(shapes: Mapping, family: str, resolution: int, prediction_type: str,
                       pooled_dim: int | None, path: Path) -> dict:
    P = layouts.UNET_PREFIX
    template = family_config(family)
    conv_in = shapes[P + "input_blocks.0.0.weight"]
    levels: list[dict] = []
    level = {"resnets": 0, "depths": [], "channels": conv_in[0]}
    index = 1
    while True:
        if P + f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append(level)
            level = {"resnets": 0, "depths": [], "channels": level["channels"]}
        elif P + f"input_blocks.{index}.0.in_layers.0.weight" in shapes:
            level["resnets"] += 1
            level["channels"] = shapes[P + f"input_blocks.{index}.0.out_layers.3.weight"][0]
            level["depths"].append(_transformer_depth(shapes, f"{P}input_blocks.{index}.1."))
        else:
            break
        index += 1
    levels.append(level)
    layers_per_block = levels[0]["resnets"]
    if any(lv["resnets"] != layers_per_block for lv in levels) or any(len(set(lv["depths"])) > 1 for lv in levels):
        raise CheckpointError(f"{path}: a {family} UNet with an irregular block layout (blocks per level {[lv['resnets'] for lv in levels]}); it is not a standard SD architecture.")
    depths = [lv["depths"][0] if lv["depths"] else 0 for lv in levels]
    channels = [lv["channels"] for lv in levels]
    attention = [d > 0 for d in depths]
    heads_rule = template["unet_heads"]
    heads = [heads_rule["heads"] if heads_rule["rule"] == "fixed" else max(1, c // heads_rule["channels_per_head"])
             for c in channels]
    attn_keys = [k for k in shapes if k.startswith(P) and k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in shapes if k.startswith(P) and k.endswith(".proj_in.weight")]
    config = dict(template["unet"])
    config.update(
        in_channels=conv_in[1],
        out_channels=shapes[P + "out.2.weight"][0],
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=shapes[attn_keys[0]][1] if attn_keys else config["cross_attention_dim"],
        attention_head_dim=heads if len(set(heads)) > 1 or family != "sd1" else heads[0],
        use_linear_projection=bool(proj_in) and len(shapes[proj_in[0]]) == 2,
        sample_size=resolution // 8,
        upcast_attention=family == "sd2" and prediction_type == "v_prediction",
    )
    mid_depth = _transformer_depth(shapes, f"{P}middle_block.1.")
    if family == "sdxl" or any(d > 1 for d in depths) or mid_depth > 1:
        # diffusers sizes the mid block from the last level's depth.
        last_depth = depths[-1] if depths[-1] else mid_depth
        if mid_depth != last_depth:
            raise CheckpointError(f"{path}: mid-block transformer depth {mid_depth} differs from the last level's {last_depth}; not a standard SD architecture.")
        config["transformer_layers_per_block"] = [d if d else 1 for d in depths]
    adm_key = P + "label_emb.0.0.weight"
    if adm_key in shapes:
        adm_in = shapes[adm_key][1]
        if pooled_dim is None or (adm_in - pooled_dim) % 6:
            raise CheckpointError(f"{path}: SDXL added-conditioning input of {adm_in} does not fit the pooled text size {pooled_dim}; not a standard SDXL base.")
        config["projection_class_embeddings_input_dim"] = adm_in
        config["addition_time_embed_dim"] = (adm_in - pooled_dim) // 6
    return config


def derive_vae_config(shapes: Mapping, family: str, resolution: int) -> dict:
    P = layouts.VAE_PREFIX
    levels = 0
    while P + f"encoder.down.{levels}.block.0.conv1.weight" in shapes:
        levels += 1
    per_level = 0
    while P + f"encoder.down.0.block.{per_level}.conv1.weight" in shapes:
        per_level += 1
    config = dict(family_config(family)["vae"])
    config.update(
        block_out_channels=[shapes[P + f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=per_level,
        in_channels=shapes[P + "encoder.conv_in.weight"][1],
        out_channels=shapes[P + "decoder.conv_out.weight"][0],
        latent_channels=shapes[P + "encoder.conv_out.weight"][0] // 2,
        sample_size=resolution,
    )
    return config


@dataclass
class TextEncoderSpec:
    """One text encoder of a family, with its config derived from the file."""

    name: str  # diffusers component name: text_encoder / text_encoder_2
    tokenizer: str  # tokenizer / tokenizer_2
    layout: str  # "hf_clip" | "open_clip" (single-file layout)
    checkpoint_prefix: str
    model_class: str
    pad_token: str
    unused_checkpoint_layers: int
    config: dict
    has_text_model_prefix: bool = True  # HF layout in the file: "<prefix>text_model.…"


def derive_text_encoder_specs(shapes: Mapping, family: str) -> list[TextEncoderSpec]:
    specs = []
    for entry in family_config(family)["text_encoders"]:
        spec = TextEncoderSpec(**{k: v for k, v in entry.items() if k != "config"}, config=dict(entry["config"]))
        P = spec.checkpoint_prefix
        if spec.layout == "hf_clip":
            spec.has_text_model_prefix = any(k.startswith(P + "text_model.") for k in shapes)
            tm = P + ("text_model." if spec.has_text_model_prefix else "")
            vocab, hidden = shapes[tm + "embeddings.token_embedding.weight"]
            positions = shapes[tm + "embeddings.position_embedding.weight"][0]
            intermediate = shapes[tm + "encoder.layers.0.mlp.fc1.weight"][0]
            layers = layouts.hf_clip_layer_count(shapes, P)
        else:
            vocab, hidden = shapes[P + "token_embedding.weight"]
            positions = shapes[P + "positional_embedding"][0]
            intermediate = shapes[P + "transformer.resblocks.0.mlp.c_fc.weight"][0]
            layers = layouts.open_clip_layer_count(shapes, P) - spec.unused_checkpoint_layers
            if P + "text_projection" in shapes:
                spec.config["projection_dim"] = shapes[P + "text_projection"][1]
        spec.config.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions,
                           intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64))
        specs.append(spec)
    return specs


# --- Prediction type ----------------------------------------------------------------

def v_statistics_key(unet_config: Mapping) -> str:
    """The tensor whose spread tells SD2 768-v from 512-base: norm1.bias of the first
    transformer in the last attention block of the UNet (``output_blocks.11.1`` in SD2)."""
    up_types = unet_config["up_block_types"]
    level = max(i for i, t in enumerate(up_types) if t.startswith("CrossAttn"))
    up_attention = [t.startswith("CrossAttn") for t in up_types]
    lpb = unet_config["layers_per_block"]
    return layouts.unet_key_to_ldm(f"up_blocks.{level}.attentions.{lpb}.transformer_blocks.0.norm1.bias",
                                   lpb, up_attention)


_V_METADATA = re.compile(r"(^|[-_/ ])(v|v_prediction|v-prediction)($|[-_/ ])")


def detect_prediction_type(index: TensorIndex, family: str, unet_config: Mapping, override: str) -> tuple[str, str]:
    """(prediction type, the evidence for it). Weights alone cannot always tell, so say how we decided."""
    if override != "auto":
        return override, "set by --prediction-type"
    if "v_pred" in index.shapes:
        return "v_prediction", "the file has a 'v_pred' marker key"
    meta = index.metadata
    declared = meta.get("modelspec.prediction_type", "")
    if declared:
        kind = "v_prediction" if _V_METADATA.search(declared.lower()) else "epsilon"
        return kind, f"modelspec.prediction_type metadata says {declared!r}"
    if family == "sd2" and unet_config["in_channels"] == 4:
        # SD2 768-v and 512-base share every shape. The same heuristic ComfyUI uses: the
        # last up-block transformer's norm1.bias is spread wider in the v models.
        key = v_statistics_key(unet_config)
        if key in index.shapes:
            spread = float(index.read(key).float().std(unbiased=False))
            if spread > 0.09:
                return "v_prediction", f"SD2 weight statistics (norm1.bias std {spread:.3f} > 0.09, as in 768-v models); pass --prediction-type epsilon if this is a 512-base model"
            return "epsilon", f"SD2 weight statistics (norm1.bias std {spread:.3f} <= 0.09, as in 512-base models); pass --prediction-type v_prediction if this is a 768-v model"
    return "epsilon", f"the {family} default"


# --- Inspection ---------------------------------------------------------------------


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


def _unused_by(spec: "TextEncoderSpec", shapes: Mapping) -> Callable[[str], bool]:
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
    template = family_config(family)
    specs = derive_text_encoder_specs(index.shapes, family)
    pooled = specs[-1].config.get("projection_dim") if family == "sdxl" else None
    # Resolution depends on the prediction type, which for SD2 needs the UNet layout:
    # derive once at the family default, detect, then derive again at the right size.
    provisional = derive_unet_config(index.shapes, family, 512, "epsilon", pooled, index.path)
    prediction, evidence = detect_prediction_type(index, family, provisional, prediction_type)
    resolution = template["resolution"].get(prediction, template["resolution"]["epsilon"])
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
        size_bytes=index.path.stat().st_size, family=family, display_name=template["display_name"],
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
    if unet_config.get("addition_embed_type") == "text_time" or "text_encoder_2" in index_json:
        family = "sdxl"
    else:
        # SD1 uses OpenAI CLIP (quick_gelu), SD2 OpenCLIP (gelu): the one config field that
        # tells them apart at any width.
        try:
            text_config = json.loads((path / "text_encoder" / "config.json").read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: a diffusers folder without text_encoder/config.json; it needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/.") from None
        family = "sd1" if text_config.get("hidden_act") == "quick_gelu" else "sd2"
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
        family=family, display_name=template["display_name"], prediction_type=prediction,
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


# --- Loading ------------------------------------------------------------------------


@dataclass
class BaseModel:
    """A loaded base model as diffusers/transformers components (lists hold one entry per text encoder)."""

    info: CheckpointInfo
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    dtype: torch.dtype
    load_seconds: float

    @property
    def family(self) -> str:
        return self.info.family


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    if name == "auto":
        # fp16 matmuls are slow (or missing) on CPU; on CUDA fp16 halves memory and time.
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"--dtype: {name!r} is not one of auto, {', '.join(DTYPES)}.") from None


def make_tokenizer(pad_token: str, source: Path | None = None):
    from transformers import CLIPTokenizer

    if source is not None:
        return CLIPTokenizer.from_pretrained(str(source), local_files_only=True)
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         pad_token=pad_token, model_max_length=77)


def _text_encoder_class(name: str):
    import transformers

    return getattr(transformers, name)


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: str) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches
        detail = str(err).strip().splitlines()[-1].strip()[:200]
        raise CheckpointError(f"{path}: the {what} weights do not fit a standard model ({detail}).") from None
    if missing:
        raise CheckpointError(f"{path}: the {what} is missing {len(missing)} weights (e.g. {missing[0]!r}); the file is incomplete or not a standard model.")
    if unexpected:
        raise CheckpointError(f"{path}: the {what} has {len(unexpected)} weights we cannot place (e.g. {unexpected[0]!r}); the file is not a standard model.")


def text_encoder_checkpoint_keys(spec: TextEncoderSpec, model_keys) -> dict[str, str]:
    """HF-layout text encoder: model key → single-file key."""
    if spec.has_text_model_prefix:
        return {k: layouts.hf_clip_key_to_ldm(k, spec.checkpoint_prefix) for k in model_keys}
    return {k: spec.checkpoint_prefix + layouts.strip_text_model(k) for k in model_keys}


def load_single_file(path: str | Path, dtype: torch.dtype, prediction_type: str = "auto") -> BaseModel:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    started = time.perf_counter()
    info, index = inspect_single_file(path, prediction_type)
    read = index.read
    if index.file_format == "safetensors":
        from safetensors import safe_open

        handle = safe_open(str(index.path), framework="pt", device="cpu")
        read = handle.get_tensor

    def fetch(key_map: Mapping[str, str], what: str,
              transform: Callable[[str, torch.Tensor], torch.Tensor] = lambda k, t: t):
        missing = [src for src in key_map.values() if src not in index.shapes]
        if missing:
            raise CheckpointError(f"{info.path}: the {what} is missing {len(missing)} weights (e.g. {missing[0]!r}); the file is incomplete or not a standard model.")
        return {dst: transform(dst, read(src)).to(dtype) for dst, src in key_map.items()}

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(info.unet_config)
        vae = AutoencoderKL.from_config(info.vae_config)
    _assign(unet, fetch(layouts.unet_key_map(unet.state_dict().keys(), info.unet_config), "UNet"), "UNet", info.path)

    def vae_shape(key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.flatten(1) if layouts.is_vae_attention_projection(key) and tensor.ndim == 4 else tensor
    _assign(vae, fetch(layouts.vae_key_map(vae.state_dict().keys(), info.vae_config), "VAE", vae_shape), "VAE", info.path)

    text_encoders, tokenizers = [], []
    for spec in info.text_encoders:
        from transformers import CLIPTextConfig

        cls = _text_encoder_class(spec.model_class)
        with init_empty_weights():
            encoder = cls(CLIPTextConfig(**spec.config))
        keys = list(encoder.state_dict().keys())
        if spec.layout == "hf_clip":
            state = fetch(text_encoder_checkpoint_keys(spec, keys), spec.name.replace("_", " "))
        else:
            needed = {k: v for k, v in index.shapes.items() if k.startswith(spec.checkpoint_prefix)}
            lazy = {k: read(k) for k in needed if _open_clip_needed(k, spec)}
            try:
                state = layouts.open_clip_to_hf(lazy, spec.checkpoint_prefix, spec.config["num_hidden_layers"],
                                                spec.model_class.endswith("WithProjection"),
                                                any(k.startswith("text_model.") for k in keys))
            except KeyError as err:
                raise CheckpointError(f"{info.path}: the {spec.name.replace('_', ' ')} is missing the weight {err.args[0]!r}; the file is incomplete or not a standard model.") from None
            state = {k: v.to(dtype) for k, v in state.items()}
        _assign(encoder, state, spec.name.replace("_", " "), info.path)
        text_encoders.append(encoder.eval())
        tokenizers.append(make_tokenizer(spec.pad_token))
    scheduler = DDPMScheduler.from_config({**family_config(info.family)["scheduler"], "prediction_type": info.prediction_type})
    return BaseModel(info, unet.eval(), vae.eval(), text_encoders, tokenizers, scheduler, dtype,
                     time.perf_counter() - started)


def _open_clip_needed(key: str, spec: TextEncoderSpec) -> bool:
    m = re.match(re.escape(spec.checkpoint_prefix) + r"transformer\.resblocks\.(\d+)\.", key)
    if m:
        return int(m[1]) < spec.config["num_hidden_layers"]
    return not key.endswith("logit_scale")


def load_diffusers_folder(path: str | Path, dtype: torch.dtype) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    started = time.perf_counter()
    info = inspect_diffusers_folder(path)
    folder = str(Path(path).expanduser())
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    text_encoders, tokenizers = [], []
    for spec in info.text_encoders:
        cls = _text_encoder_class(spec.model_class)
        text_encoders.append(cls.from_pretrained(folder, subfolder=spec.name, dtype=dtype, local_files_only=True).eval())
        tokenizers.append(make_tokenizer(spec.pad_token, Path(folder) / spec.tokenizer))
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return BaseModel(info, unet.eval(), vae.eval(), text_encoders, tokenizers, scheduler, dtype,
                     time.perf_counter() - started)


def load_base_model(path: str | Path, dtype: str = "auto", prediction_type: str = "auto",
                    device: str = "cpu") -> BaseModel:
    """Load a single-file checkpoint or a diffusers folder as diffusers components on ``device``."""
    torch_dtype = resolve_dtype(dtype, device)
    path = Path(path).expanduser()
    if path.is_dir() and (path / "model_index.json").exists():
        model = load_diffusers_folder(path, torch_dtype)
    else:
        model = load_single_file(path, torch_dtype, prediction_type)
    if torch.device(device).type != "cpu":
        for module in [model.unet, model.vae, *model.text_encoders]:
            module.to(device)
    return model


def save_diffusers_folder(model: BaseModel, out: str | Path) -> Path:
    """Write a loaded model as a diffusers folder (configs, safetensors weights, tokenizers)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out / "unet")
    model.vae.save_pretrained(out / "vae")
    for spec, encoder, tokenizer in zip(model.info.text_encoders, model.text_encoders, model.tokenizers):
        encoder.save_pretrained(out / spec.name)
        tokenizer.save_pretrained(out / spec.tokenizer)
    model.noise_scheduler.save_pretrained(out / "scheduler")
    pipeline = "StableDiffusionXLPipeline" if model.family == "sdxl" else "StableDiffusionPipeline"
    index = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}
    for spec in model.info.text_encoders:
        index[spec.name] = ["transformers", spec.model_class]
        index[spec.tokenizer] = ["transformers", "CLIPTokenizer"]
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    return out


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

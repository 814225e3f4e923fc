"""Loading a base model as diffusers/transformers components, offline.

A single-file checkpoint is loaded by building each component empty on the meta device (no
memory, about a second even for SDXL) from the configs ``inspect`` derived, then assigning the
file's tensors to it under their diffusers names (``layouts``). A diffusers folder loads with
diffusers' own ``from_pretrained``. Nothing is downloaded, so ``HF_HUB_OFFLINE`` does not matter.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTokenizer

from ..errors import CheckpointError
from . import layouts
from .derive import TextEncoderSpec
from .families import TOKENIZER_DIR, family_config
from .inspect import CheckpointInfo, inspect_diffusers_folder, inspect_single_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    if source is not None:
        return CLIPTokenizer.from_pretrained(str(source), local_files_only=True)
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         pad_token=pad_token, model_max_length=77)


def noise_scheduler(family: str, prediction_type: str) -> DDPMScheduler:
    """The family's training noise schedule (DDPM, as the reference models were trained)."""
    return DDPMScheduler.from_config({**family_config(family)["scheduler"], "prediction_type": prediction_type})


def empty_modules(unet_config: Mapping | None = None, vae_config: Mapping | None = None,
                  text_encoders: Iterable[tuple[str, Mapping]] = ()) -> tuple[Any, Any, list]:
    """(UNet, VAE, text encoders) built on the meta device: shapes and module names without
    memory, for loading weights into (``assign=True``) or for reading the structure alone.
    ``text_encoders`` are (transformers class name, CLIPTextConfig fields) pairs; a component
    whose config is None is None."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config) if unet_config is not None else None
        vae = AutoencoderKL.from_config(vae_config) if vae_config is not None else None
        encoders = [getattr(transformers, model_class)(transformers.CLIPTextConfig(**config))
                    for model_class, config in text_encoders]
    return unet, vae, encoders


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
    started = time.perf_counter()
    info, index = inspect_single_file(path, prediction_type)
    read = index.read
    if index.file_format == "safetensors":
        handle = safe_open(str(index.path), framework="pt", device="cpu")
        read = handle.get_tensor

    def fetch(key_map: Mapping[str, str], what: str,
              transform: Callable[[str, torch.Tensor], torch.Tensor] = lambda k, t: t):
        missing = [src for src in key_map.values() if src not in index.shapes]
        if missing:
            raise CheckpointError(f"{info.path}: the {what} is missing {len(missing)} weights (e.g. {missing[0]!r}); the file is incomplete or not a standard model.")
        return {dst: transform(dst, read(src)).to(dtype) for dst, src in key_map.items()}

    unet, vae, encoders = empty_modules(info.unet_config, info.vae_config,
                                        [(spec.model_class, spec.config) for spec in info.text_encoders])
    _assign(unet, fetch(layouts.unet_key_map(unet.state_dict().keys(), info.unet_config), "UNet"), "UNet", info.path)

    def vae_shape(key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.flatten(1) if layouts.is_vae_attention_projection(key) and tensor.ndim == 4 else tensor
    _assign(vae, fetch(layouts.vae_key_map(vae.state_dict().keys(), info.vae_config), "VAE", vae_shape), "VAE", info.path)

    tokenizers = []
    for spec, encoder in zip(info.text_encoders, encoders):
        keys = list(encoder.state_dict().keys())
        what = spec.name.replace("_", " ")
        if spec.layout == "hf_clip":
            state = fetch(text_encoder_checkpoint_keys(spec, keys), what)
        else:
            needed = {k: v for k, v in index.shapes.items() if k.startswith(spec.checkpoint_prefix)}
            lazy = {k: read(k) for k in needed if _open_clip_needed(k, spec)}
            try:
                state = layouts.open_clip_to_hf(lazy, spec.checkpoint_prefix, spec.config["num_hidden_layers"],
                                                spec.model_class.endswith("WithProjection"),
                                                any(k.startswith("text_model.") for k in keys))
            except KeyError as err:
                raise CheckpointError(f"{info.path}: the {what} is missing the weight {err.args[0]!r}; the file is incomplete or not a standard model.") from None
            state = {k: v.to(dtype) for k, v in state.items()}
        _assign(encoder, state, what, info.path)
        encoder.eval()
        tokenizers.append(make_tokenizer(spec.pad_token))
    return BaseModel(info, unet.eval(), vae.eval(), encoders, tokenizers,
                     noise_scheduler(info.family, info.prediction_type), dtype, time.perf_counter() - started)


def _open_clip_needed(key: str, spec: TextEncoderSpec) -> bool:
    m = re.match(re.escape(spec.checkpoint_prefix) + r"transformer\.resblocks\.(\d+)\.", key)
    if m:
        return int(m[1]) < spec.config["num_hidden_layers"]
    return not key.endswith("logit_scale")


def load_diffusers_folder(path: str | Path, dtype: torch.dtype) -> BaseModel:
    started = time.perf_counter()
    info = inspect_diffusers_folder(path)
    folder = str(Path(path).expanduser())
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    text_encoders, tokenizers = [], []
    for spec in info.text_encoders:
        cls = getattr(transformers, spec.model_class)
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

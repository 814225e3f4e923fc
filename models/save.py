"""Writing a model out: as one single-file (LDM) state dict, or as a diffusers folder.

``to_single_file`` only builds the tensors, in the layout ``load.load_single_file`` reads and
the UIs load; the caller writes them (``runtime.files.write_safetensors``, the one durable
writer, which lives above this package: models imports no runtime).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from . import layouts
from .families import FAMILIES
from .load import BaseModel


def to_single_file(states: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping) -> dict[str, torch.Tensor]:
    """diffusers-layout state dicts (``states["unet"]``, ``states["vae"]``, one per text encoder
    under its diffusers name) → one single-file (LDM) state dict. ``configs`` holds the
    ``unet`` and ``vae`` configs and the family's ``text_encoders`` entries (configs/*.json)."""
    out: dict[str, torch.Tensor] = {}
    for key, ldm in layouts.unet_key_map(states["unet"].keys(), configs["unet"]).items():
        out[ldm] = states["unet"][key]
    for key, ldm in layouts.vae_key_map(states["vae"].keys(), configs["vae"]).items():
        tensor = states["vae"][key]
        out[ldm] = tensor[..., None, None] if layouts.is_vae_attention_projection(key) else tensor
    for entry in configs["text_encoders"]:
        state = states[entry["name"]]
        prefix = entry["checkpoint_prefix"]
        if entry["layout"] == "hf_clip":
            for key, tensor in state.items():
                out[layouts.hf_clip_key_to_ldm(key, prefix)] = tensor
            if entry["model_class"] == "CLIPTextModel":
                # Real SD1/SDXL files carry this buffer; loaders must cope with it.
                positions = entry["config"]["max_position_embeddings"]
                out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
        else:
            out.update(layouts.hf_to_open_clip(state, prefix))
            out[prefix + "logit_scale"] = torch.tensor(4.6052)
    # Real files carry the DDPM schedule buffers at the top level; loaders ignore them.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    out["betas"] = betas
    out["alphas_cumprod"] = torch.cumprod(1 - betas, dim=0)
    return out


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
    index = {"_class_name": FAMILIES[model.family].pipeline_class, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}
    for spec in model.info.text_encoders:
        index[spec.name] = ["transformers", spec.model_class]
        index[spec.tokenizer] = ["transformers", "CLIPTokenizer"]
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    return out

"""What a file is: its model family, or one sentence saying what it is instead; and what its
UNet predicts (epsilon or v), with the evidence for the answer.

A single-file checkpoint is recognised by its keys: an LDM UNet (``model.diffusion_model.``), a
VAE, and the text encoders of exactly one family, each under the single-file prefix its family
config gives. Anything else (a LoRA, an embedding, a ControlNet, a VAE alone, an SD3/Flux
transformer, an SDXL refiner) is named as such, with where it belongs instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

from ..errors import CheckpointError
from . import layouts
from .families import FAMILIES, Family, family_config
from .files import TensorIndex


def _count_prefix(keys, prefix: str) -> int:
    return sum(k.startswith(prefix) for k in keys)


def _text_prefixes(family: Family) -> list[str]:
    """The single-file prefixes of the family's text encoders, in encoder order."""
    return [entry["checkpoint_prefix"] for entry in family_config(family.name)["text_encoders"]]


def _family_of_text_encoders(keys, path: Path, unet_keys: int) -> str:
    # A family is marked by its last text encoder's prefix. A family of several encoders needs
    # all of them (SDXL's first encoder has SD1's layout under another prefix); a family of one
    # must be the only one found.
    found = [f for f in FAMILIES.values() if _count_prefix(keys, _text_prefixes(f)[-1])]
    complete = [f for f in found if len(f.text_encoders) > 1
                and all(_count_prefix(keys, prefix) for prefix in _text_prefixes(f))]
    if complete:
        return complete[0].name
    if len(found) == 1 and len(found[0].text_encoders) == 1:
        return found[0].name
    if not found:
        raise CheckpointError(f"{path}: has a UNet but no text encoder ({unet_keys} UNet tensors only); DreamBooth needs a full checkpoint with UNet, VAE and text encoder.")
    raise CheckpointError(f"{path}: mixes text-encoder layouts of several families ({', '.join(f.name for f in found)}); it is not a checkpoint we can read.")


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
        family = _family_of_text_encoders(keys, path, unet_keys)
        if not _count_prefix(keys, layouts.VAE_PREFIX):
            raise CheckpointError(f"{path}: a {family} checkpoint without a VAE (no first_stage_model.* tensors); use a full checkpoint, or one saved with its VAE baked in.")
        return family
    lora = sum(bool(re.search(r"(lora_(up|down|A|B)\b|\.lora_|^lora_(unet|te)|hada_w|lokr_w|\.alpha$|dora_scale)", k)) for k in keys)
    if lora and 2 * lora >= n:  # most of the file is adapter tensors
        return _not_a_base(path, f"a LoRA ({n} tensors), not a base model; load it as a LoRA on top of a checkpoint (ComfyUI's LoraLoader, A1111's models/Lora folder)")
    if any(k.startswith(("string_to_param", "emb_params")) for k in keys) or set(keys) <= {"clip_l", "clip_g", "emb_params"}:
        return _not_a_base(path, "a textual-inversion embedding, not a base model; put it in models/embeddings")
    if any(k.startswith(("control_model.", "input_hint_block.", "controlnet_cond_embedding.")) for k in keys):
        return _not_a_base(path, "a ControlNet, not a base model")
    bare = {k.split(".", 1)[0] for k in keys}
    if {"encoder", "decoder"} <= bare and ("quant_conv" in bare or "post_quant_conv" in bare):
        return _not_a_base(path, "a standalone VAE, not a full checkpoint; put it in models/vae and use a full SD checkpoint as the base")
    if _count_prefix(keys, layouts.VAE_PREFIX) == n:
        return _not_a_base(path, "a VAE only (first_stage_model.*), not a full checkpoint")
    if {"conv_in", "time_embedding", "down_blocks"} <= bare:
        return _not_a_base(path, "diffusers-format UNet weights alone; point to the diffusers model folder (the one with model_index.json) instead")
    if any(k.startswith(("text_model.", "encoder.layers.", "transformer.resblocks.")) for k in keys) and "decoder" not in bare:
        return _not_a_base(path, "a text encoder alone, not a full checkpoint")
    examples = ", ".join(repr(k) for k in list(keys)[:3])
    return _not_a_base(path, f"not a Stable Diffusion checkpoint: none of its {n} tensors (e.g. {examples}) belongs to an SD UNet")


def _not_a_base(path: Path, what: str):
    raise CheckpointError(f"{path}: {what}.")


def identify_folder_family(path: Path, index_json: Mapping, unet_config: Mapping) -> str:
    """The family of a diffusers folder, from its configs."""
    if unet_config.get("addition_embed_type") == "text_time" or "text_encoder_2" in index_json:
        return "sdxl"
    # SD1 uses OpenAI CLIP (quick_gelu), SD2 OpenCLIP (gelu): the one config field that
    # tells them apart at any width.
    try:
        text_config = json.loads((path / "text_encoder" / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: a diffusers folder without text_encoder/config.json; it needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/.") from None
    return "sd1" if text_config.get("hidden_act") == "quick_gelu" else "sd2"


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
    record = FAMILIES[family]
    if record.v_from_weights and unet_config["in_channels"] == 4:
        # SD2 768-v and 512-base share every shape. The same heuristic ComfyUI uses: the
        # last up-block transformer's norm1.bias is spread wider in the v models.
        key = v_statistics_key(unet_config)
        if key in index.shapes:
            spread = float(index.read(key).float().std(unbiased=False))
            if spread > 0.09:
                return "v_prediction", f"SD2 weight statistics (norm1.bias std {spread:.3f} > 0.09, as in 768-v models); pass --prediction-type epsilon if this is a 512-base model"
            return "epsilon", f"SD2 weight statistics (norm1.bias std {spread:.3f} <= 0.09, as in 512-base models); pass --prediction-type v_prediction if this is a 768-v model"
    return record.default_prediction, f"the {family} default"

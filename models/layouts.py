"""Key layouts: single-file (LDM / "original") checkpoints ⇄ diffusers components.

One set of renaming rules serves both directions: the loader (``load``) reads LDM keys into
diffusers modules, and ``save.to_single_file`` writes diffusers modules out as LDM keys (the
test fixtures, the shapes base). The tests check these rules against ComfyUI's own
converters, an independent implementation.

Conventions: a *diffusers key* is a key of the diffusers/transformers module's state dict;
an *LDM key* is the key as it appears in a single-file checkpoint (prefix included).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# --- UNet ---------------------------------------------------------------------------

_RESNET_RENAMES = {  # diffusers ResnetBlock2D → LDM ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_RENAMES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _rename_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_RENAMES.get(head, head)}.{tail}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_block_has_attention: list[bool]) -> str:
    """diffusers UNet2DConditionModel key → LDM key (with ``model.diffusion_model.``).

    LDM numbers blocks flat: each down level has ``layers_per_block`` res(+attn) blocks
    and then one downsampler; each up level has ``layers_per_block + 1`` blocks, the last
    also holding the upsampler (after the attention, when the level has one).
    """
    per_down = layers_per_block + 1
    per_up = layers_per_block + 1
    for src, dst in _UNET_TOP_RENAMES.items():
        if key.startswith(src + "."):
            return UNET_PREFIX + dst + key[len(src):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_down * level + j + 1
        if kind == "resnets":
            return f"{UNET_PREFIX}input_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"{UNET_PREFIX}input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"{UNET_PREFIX}input_blocks.{per_down * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_up * level + j
        if kind == "resnets":
            return f"{UNET_PREFIX}output_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"{UNET_PREFIX}output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        slot = 2 if up_block_has_attention[level] else 1
        return f"{UNET_PREFIX}output_blocks.{per_up * level + layers_per_block}.{slot}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{UNET_PREFIX}middle_block.{2 * int(m[1])}.{_rename_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"{UNET_PREFIX}middle_block.1.{m[1]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def unet_key_map(diffusers_keys, unet_config: Mapping) -> dict[str, str]:
    up_attention = [t.startswith("CrossAttn") for t in unet_config["up_block_types"]]
    return {k: unet_key_to_ldm(k, unet_config["layers_per_block"], up_attention) for k in diffusers_keys}


# --- VAE ----------------------------------------------------------------------------

_VAE_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_vae_attention(rest: str) -> str:
    for src, dst in _VAE_ATTENTION_RENAMES.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src):]
    return rest


def _rename_vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.", 1) if rest.startswith("conv_shortcut.") else rest


def vae_key_to_ldm(key: str, num_levels: int) -> str:
    """diffusers AutoencoderKL key → LDM key. The LDM decoder numbers its levels in reverse."""
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"{VAE_PREFIX}encoder.down.{m[1]}.block.{m[2]}.{_rename_vae_resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"{VAE_PREFIX}encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"{VAE_PREFIX}decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_rename_vae_resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"{VAE_PREFIX}decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{VAE_PREFIX}{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_vae_resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{VAE_PREFIX}{m[1]}.mid.attn_1.{_rename_vae_attention(m[2])}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{VAE_PREFIX}{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"(encoder\.conv_in|encoder\.conv_out|decoder\.conv_in|decoder\.conv_out|quant_conv|post_quant_conv)\..+", key):
        return VAE_PREFIX + key
    raise KeyError(f"no LDM name for VAE key {key!r}")


def vae_key_map(diffusers_keys, vae_config: Mapping) -> dict[str, str]:
    levels = len(vae_config["block_out_channels"])
    return {k: vae_key_to_ldm(k, levels) for k in diffusers_keys}


def is_vae_attention_projection(diffusers_key: str) -> bool:
    """LDM stores the VAE mid-block attention projections as 1×1 convs, diffusers as linears."""
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


# --- Text encoders ------------------------------------------------------------------


def strip_text_model(key: str) -> str:
    # transformers 5 dropped the ``text_model.`` level from CLIPTextModel (not from
    # CLIPTextModelWithProjection); single-file checkpoints always carry it.
    return key[len("text_model."):] if key.startswith("text_model.") else key


def hf_clip_key_to_ldm(key: str, prefix: str) -> str:
    """transformers CLIP text key → single-file key (HF layout under ``prefix``)."""
    return f"{prefix}text_model.{strip_text_model(key)}"


_OPEN_CLIP_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_to_hf(checkpoint: Mapping[str, torch.Tensor], prefix: str, num_layers: int,
                    with_projection: bool, text_model_prefix: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (SD2, SDXL's second encoder) → transformers CLIP keys.

    The fused ``in_proj`` is split into q/k/v; ``text_projection`` is stored transposed
    (OpenCLIP multiplies ``x @ P``, a Linear computes ``x @ W.T``). Layers past
    ``num_layers`` are left out (SD2 never uses its last one).
    """
    tm = "text_model." if text_model_prefix else ""
    out = {
        f"{tm}embeddings.token_embedding.weight": checkpoint[prefix + "token_embedding.weight"],
        f"{tm}embeddings.position_embedding.weight": checkpoint[prefix + "positional_embedding"],
        f"{tm}final_layer_norm.weight": checkpoint[prefix + "ln_final.weight"],
        f"{tm}final_layer_norm.bias": checkpoint[prefix + "ln_final.bias"],
    }
    for layer in range(num_layers):
        src = f"{prefix}transformer.resblocks.{layer}."
        dst = f"{tm}encoder.layers.{layer}."
        for hf_name, oc_name in _OPEN_CLIP_LAYER_RENAMES.items():
            for param in ("weight", "bias"):
                out[f"{dst}{hf_name}.{param}"] = checkpoint[f"{src}{oc_name}.{param}"]
        for param, fused in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            q, k, v = checkpoint[f"{src}attn.{fused}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{param}"] = q
            out[f"{dst}self_attn.k_proj.{param}"] = k
            out[f"{dst}self_attn.v_proj.{param}"] = v
    if with_projection:
        out["text_projection.weight"] = checkpoint[prefix + "text_projection"].t()
    return out


def hf_to_open_clip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text keys → OpenCLIP single-file keys (inverse of ``open_clip_to_hf``)."""
    state = {strip_text_model(k): v for k, v in state.items()}
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for layer in layers:
        src = f"encoder.layers.{layer}."
        dst = f"{prefix}transformer.resblocks.{layer}."
        for hf_name, oc_name in _OPEN_CLIP_LAYER_RENAMES.items():
            for param in ("weight", "bias"):
                out[f"{dst}{oc_name}.{param}"] = state[f"{src}{hf_name}.{param}"]
        for param, fused in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[f"{dst}attn.{fused}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{param}"] for p in ("q", "k", "v")], dim=0)
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].t().contiguous()
    return out


def open_clip_layer_count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m[1]) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def hf_clip_layer_count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(?:text_model\.)?encoder\.layers\.(\d+)\.")
    found = {int(m[1]) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0

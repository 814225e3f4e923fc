"""Component configs from tensor shapes: the diffusers UNet, VAE and text-encoder configs of a
single-file checkpoint, whatever its widths and depths.

Shapes give channels, block counts, transformer depths, context and vocabulary sizes; the
family config (``configs/<family>.json``) gives what shapes cannot (activations, attention-head
rule, norm settings, scaling factor). A custom or miniature model of a family loads as long as
its layout is regular.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import CheckpointError
from . import layouts
from .families import FAMILIES, family_config


def _transformer_depth(shapes: Mapping, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"transformer_blocks\.(\d+)\.")
    found = {int(m[1]) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def derive_unet_config(shapes: Mapping, family: str, resolution: int, prediction_type: str,
                       pooled_dim: int | None, path: Path) -> dict:
    unet = layouts.UNET_PREFIX
    template = family_config(family)
    conv_in = shapes[unet + "input_blocks.0.0.weight"]
    levels: list[dict] = []
    level = {"resnets": 0, "depths": [], "channels": conv_in[0]}
    index = 1
    while True:
        if unet + f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append(level)
            level = {"resnets": 0, "depths": [], "channels": level["channels"]}
        elif unet + f"input_blocks.{index}.0.in_layers.0.weight" in shapes:
            level["resnets"] += 1
            level["channels"] = shapes[unet + f"input_blocks.{index}.0.out_layers.3.weight"][0]
            level["depths"].append(_transformer_depth(shapes, f"{unet}input_blocks.{index}.1."))
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
    fixed_heads = heads_rule["rule"] == "fixed"
    heads = [heads_rule["heads"] if fixed_heads else max(1, c // heads_rule["channels_per_head"])
             for c in channels]
    attn_keys = [k for k in shapes if k.startswith(unet) and k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in shapes if k.startswith(unet) and k.endswith(".proj_in.weight")]
    config = dict(template["unet"])
    config.update(
        in_channels=conv_in[1],
        out_channels=shapes[unet + "out.2.weight"][0],
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=shapes[attn_keys[0]][1] if attn_keys else config["cross_attention_dim"],
        # a fixed head count is written as one number, as in the family's own config
        attention_head_dim=heads if len(set(heads)) > 1 or not fixed_heads else heads[0],
        use_linear_projection=bool(proj_in) and len(shapes[proj_in[0]]) == 2,
        sample_size=resolution // 8,
        upcast_attention=FAMILIES[family].upcast_attention_for_v and prediction_type == "v_prediction",
    )
    mid_depth = _transformer_depth(shapes, f"{unet}middle_block.1.")
    if "transformer_layers_per_block" in template["unet"] or any(d > 1 for d in depths) or mid_depth > 1:
        # diffusers sizes the mid block from the last level's depth.
        last_depth = depths[-1] if depths[-1] else mid_depth
        if mid_depth != last_depth:
            raise CheckpointError(f"{path}: mid-block transformer depth {mid_depth} differs from the last level's {last_depth}; not a standard SD architecture.")
        config["transformer_layers_per_block"] = [d if d else 1 for d in depths]
    adm_key = unet + "label_emb.0.0.weight"
    if adm_key in shapes:
        adm_in = shapes[adm_key][1]
        if pooled_dim is None or (adm_in - pooled_dim) % 6:
            raise CheckpointError(f"{path}: SDXL added-conditioning input of {adm_in} does not fit the pooled text size {pooled_dim}; not a standard SDXL base.")
        config["projection_class_embeddings_input_dim"] = adm_in
        config["addition_time_embed_dim"] = (adm_in - pooled_dim) // 6
    return config


def derive_vae_config(shapes: Mapping, family: str, resolution: int) -> dict:
    vae = layouts.VAE_PREFIX
    levels = 0
    while vae + f"encoder.down.{levels}.block.0.conv1.weight" in shapes:
        levels += 1
    per_level = 0
    while vae + f"encoder.down.0.block.{per_level}.conv1.weight" in shapes:
        per_level += 1
    config = dict(family_config(family)["vae"])
    config.update(
        block_out_channels=[shapes[vae + f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=per_level,
        in_channels=shapes[vae + "encoder.conv_in.weight"][1],
        out_channels=shapes[vae + "decoder.conv_out.weight"][0],
        latent_channels=shapes[vae + "encoder.conv_out.weight"][0] // 2,
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
        prefix = spec.checkpoint_prefix
        if spec.layout == "hf_clip":
            spec.has_text_model_prefix = any(k.startswith(prefix + "text_model.") for k in shapes)
            tm = prefix + ("text_model." if spec.has_text_model_prefix else "")
            vocab, hidden = shapes[tm + "embeddings.token_embedding.weight"]
            positions = shapes[tm + "embeddings.position_embedding.weight"][0]
            intermediate = shapes[tm + "encoder.layers.0.mlp.fc1.weight"][0]
            layers = layouts.hf_clip_layer_count(shapes, prefix)
        else:
            vocab, hidden = shapes[prefix + "token_embedding.weight"]
            positions = shapes[prefix + "positional_embedding"][0]
            intermediate = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
            layers = layouts.open_clip_layer_count(shapes, prefix) - spec.unused_checkpoint_layers
            if prefix + "text_projection" in shapes:
                spec.config["projection_dim"] = shapes[prefix + "text_projection"][1]
        spec.config.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions,
                           intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64))
        specs.append(spec)
    return specs

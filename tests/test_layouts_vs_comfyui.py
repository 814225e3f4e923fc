"""Our single-file ⇄ diffusers key rules, checked against ComfyUI's own converters.

ComfyUI is an independent implementation of the same layouts, so agreement here means the
fixtures are written in the real key layout and the loader reads real files correctly.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lora.models import layouts
from dreambooth_lora.models.load import load_base_model

FAMILIES = {"sd1-tiny": "sd1", "sd2-tiny": "sd2", "sdxl-tiny": "sdxl"}


@pytest.mark.parametrize("name", FAMILIES)
def test_unet_key_map_equals_comfyui(comfy, tiny, name):
    import comfy.model_detection
    import comfy.utils

    file_state = load_file(str(tiny[name]))
    comfy_config = comfy.model_detection.detect_unet_config(file_state, layouts.UNET_PREFIX)
    comfy_map = comfy.utils.unet_to_diffusers(comfy_config)  # diffusers key → LDM key (no prefix)
    model = load_base_model(tiny[name])
    ours = layouts.unet_key_map(model.unet.state_dict().keys(), model.info.unet_config)
    assert len(ours) > 100
    for diffusers_key, ldm_key in ours.items():
        assert layouts.UNET_PREFIX + comfy_map[diffusers_key] == ldm_key, diffusers_key
    # and the map covers the file: every UNet tensor is read by exactly one diffusers key
    file_unet = {k for k in file_state if k.startswith(layouts.UNET_PREFIX)}
    assert sorted(ours.values()) == sorted(file_unet)


@pytest.mark.parametrize("name", FAMILIES)
def test_vae_layout_equals_comfyui(comfy, tiny, name):
    import comfy.diffusers_convert

    file_state = load_file(str(tiny[name]))
    model = load_base_model(tiny[name])
    converted = comfy.diffusers_convert.convert_vae_state_dict(model.vae.state_dict())  # → LDM, no prefix
    file_vae = {k[len(layouts.VAE_PREFIX):]: v for k, v in file_state.items() if k.startswith(layouts.VAE_PREFIX)}
    assert converted.keys() == file_vae.keys()
    for key, tensor in file_vae.items():
        assert converted[key].shape == tensor.shape, key  # includes the 1×1-conv attention weights
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("name,prefix", [("sd2-tiny", "cond_stage_model.model."),
                                         ("sdxl-tiny", "conditioner.embedders.1.model.")])
def test_open_clip_conversion_equals_comfyui(comfy, tiny, name, prefix):
    import comfy.utils

    file_state = load_file(str(tiny[name]))
    theirs = comfy.utils.clip_text_transformers_convert(dict(file_state), prefix, "te.")
    theirs = {k[len("te."):]: v for k, v in theirs.items() if k.startswith("te.")}
    layers = layouts.open_clip_layer_count(file_state, prefix)
    ours = layouts.open_clip_to_hf(file_state, prefix, layers, with_projection=True, text_model_prefix=True)
    theirs = {k: v for k, v in theirs.items() if k in ours or not k.endswith(("logit_scale", "position_ids"))}
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key
    # and the inverse gives back the file's tensors
    back = layouts.hf_to_open_clip(ours, prefix)
    for key, tensor in back.items():
        assert torch.equal(tensor, file_state[key]), key

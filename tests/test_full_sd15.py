"""The full-size SD1.5-architecture fixture: real shapes, read identically by us and by ComfyUI."""

from __future__ import annotations

import json

import pytest
import torch

from dreambooth_lora.cli import main
from dreambooth_lora.models import layouts
from dreambooth_lora.models.load import load_base_model

# Parameter counts of the real runwayml/stable-diffusion-v1-5 components.
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_inspect_reports_the_real_sd15_architecture(sd15_full, capsys):
    assert main(["inspect", str(sd15_full), "--json", "--dtype", "fp16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "sd1" and report["prediction_type"] == "epsilon" and report["resolution"] == 512
    assert report["param_counts"] == SD15_PARAMS
    assert report["matches_reference_sizes"] is True
    assert report["file_dtype"] == "fp16"
    assert report["load_seconds"] > 0


@pytest.fixture(scope="module")
def both_loaded(comfy, sd15_full):
    import comfy.sd

    theirs = comfy.sd.load_checkpoint_guess_config(str(sd15_full), output_vae=True, output_clip=True)
    ours = load_base_model(sd15_full, dtype="fp16")
    return ours, theirs


def test_comfyui_detects_sd15(both_loaded):
    import comfy.model_base

    _, (model, clip, vae, _) = both_loaded
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert clip is not None and vae is not None


def test_every_unet_weight_agrees_with_comfyui(both_loaded):
    import comfy.utils

    ours, (model, _, _, _) = both_loaded
    their_unet = model.model.diffusion_model.state_dict()
    # ComfyUI's own diffusers→LDM key map: independent of ours
    their_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    our_unet = ours.unet.state_dict()
    pairs = {d: l for d, l in their_map.items() if l in their_unet}
    assert set(pairs) == set(our_unet) and len(our_unet) == 686
    assert sorted(pairs.values()) == sorted(their_unet)
    for diffusers_key, ldm_key in pairs.items():
        assert torch.equal(our_unet[diffusers_key], their_unet[ldm_key].to(torch.float16)), diffusers_key


def test_text_encoder_and_vae_agree_with_comfyui(both_loaded):
    ours, (_, clip, vae, _) = both_loaded
    their_clip = clip.cond_stage_model.state_dict()
    our_clip = ours.text_encoders[0].state_dict()
    compared = 0
    for key, tensor in our_clip.items():
        if key.endswith("position_ids"):
            continue
        their_key = layouts.hf_clip_key_to_ldm(key, "clip_l.transformer.")
        assert torch.equal(tensor, their_clip[their_key].to(torch.float16)), key
        compared += 1
    assert compared == 196
    their_vae = vae.first_stage_model.state_dict()
    our_vae = ours.vae.state_dict()
    vae_map = layouts.vae_key_map(our_vae.keys(), ours.info.vae_config)
    assert sorted(k[len(layouts.VAE_PREFIX):] for k in vae_map.values()) == sorted(their_vae)
    for key, ldm_key in vae_map.items():
        theirs = their_vae[ldm_key[len(layouts.VAE_PREFIX):]].to(torch.float16)
        assert torch.equal(our_vae[key], theirs.reshape(our_vae[key].shape)), key

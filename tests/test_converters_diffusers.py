"""Our kohya files through diffusers' own ``load_lora_weights``: same UNet and text-encoder outputs."""

from __future__ import annotations

import warnings

import pytest
import torch

from dreambooth_lora.converters.kohya import save_kohya
from dreambooth_lora.converters.peft import from_peft
from dreambooth_lora.converters.structure import unet_layout_of
from dreambooth_lora.fixtures.adapters import TEXT, UNET_ATTENTION, UNET_CONV, add_random_lora
from dreambooth_lora.models import families
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.runtime.peft import peft_state


def _pipeline(base):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if base.family == "sdxl":
        return StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
                                         tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=base.unet,
                                         scheduler=base.noise_scheduler)
    return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                   unet=base.unet, scheduler=base.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2-tiny", "sdxl-tiny"])
@pytest.mark.parametrize("mixed", [False, True], ids=["one-alpha-per-component", "per-module-alphas-baked"])
def test_diffusers_load_lora_weights_matches_peft(tiny, tmp_path, name, mixed):
    ours = load_base_model(tiny[name])
    unet_patterns = {"rank_pattern": {"conv1": 2}, "alpha_pattern": {"to_k": 3.0}} if mixed else {}
    peft = {"unet": (None, add_random_lora(ours.unet, UNET_ATTENTION + UNET_CONV, 4, 2.0, 0, **unet_patterns))}
    peft["unet"] = (peft_state(ours.unet), peft["unet"][1])
    for index, (component, encoder) in enumerate(zip(families.family(ours.family).components[1:], ours.text_encoders)):
        config = add_random_lora(encoder, TEXT, 4, 8.0, 1 + index, alpha_pattern={"fc1": 2.0} if mixed else None)
        peft[component] = (peft_state(encoder), config)
    adapter = from_peft(ours.family, unet_layout_of(ours.unet.config), peft)
    # Per-module alphas must be baked for diffusers 0.42, which applies them wrongly otherwise
    # (measured on sd1-tiny: UNet 4.4e-3, text encoder 6.0e-2 relative error).
    path = save_kohya(adapter, tmp_path / "lora.safetensors", dtype="fp32", bake_alpha=mixed)

    pipe = _pipeline(load_base_model(tiny[name]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, ours.unet.config.cross_attention_dim, generator=generator)
    added = None
    if ours.family == "sdxl":
        added = {"text_embeds": torch.randn(1, ours.text_encoders[1].config.projection_dim, generator=generator),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = ours.tokenizers[0]("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        unet_error = _relative(ours.unet(latents, torch.tensor([500]), context, added_cond_kwargs=added).sample,
                               pipe.unet(latents, torch.tensor([500]), context, added_cond_kwargs=added).sample)
        their_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if ours.family == "sdxl" else [])
        text_errors = [_relative(mine(ids).last_hidden_state, theirs(ids).last_hidden_state)
                       for mine, theirs in zip(ours.text_encoders, their_encoders)]
    assert unet_error < 1e-3, unet_error
    assert max(text_errors) < 1e-3, text_errors

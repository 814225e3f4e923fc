"""Our sampler with a LoRA at UNet scale s and text-encoder scale t against the real ComfyUI's
LoraLoader at strength_model=s, strength_clip=t: the same first denoising step (full-size
SD1.5, fp32)."""

from __future__ import annotations

import pytest
import torch

from dreambooth_lora.fixtures.adapters import random_lora_file
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.runtime.pipeline import make_scheduler
from dreambooth_lora.runtime.text import encode_base_prompt
from dreambooth_lora.sampling.patch import LoraChoice
from dreambooth_lora.sampling.session import SamplingSession

PROMPT, NEGATIVE, GUIDANCE = "a photo of sks dog on the beach", "blurry", 7.5
TOLERANCE = 1e-4  # relative; measured about 1e-6 (print with -s)


@pytest.fixture(scope="module")
def setup(comfy, sd15_full, tmp_path_factory):
    import comfy.sd
    import comfy.utils

    lora = random_lora_file(sd15_full, tmp_path_factory.mktemp("lora") / "subject.safetensors", rank=8)
    # fp32 text encoder: on the CPU ComfyUI otherwise keeps CLIP in fp16 (see test_converters_comfyui)
    unet, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_full), output_vae=False,
                                                             te_model_options={"dtype": torch.float32})
    session = SamplingSession(load_base_model(sd15_full, dtype="fp32"), sd15_full)
    return lora, comfy.utils.load_torch_file(str(lora), safe_load=True), unet, clip, session


# Each scale alone, both halfway, both full, and none (the LoRA must then change nothing): the
# full 3×3 grid repeats these cases at twice the time (each case patches a full-size SD1.5 twice).
@pytest.mark.parametrize("unet_scale, te_scale", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 1.0)])
def test_first_denoising_step_matches_comfyui_lora_loader(setup, unet_scale, te_scale):
    import comfy.model_management
    import comfy.sd

    lora_path, lora, unet, clip, session = setup
    patched_unet, patched_clip = comfy.sd.load_lora_for_models(unet, clip, lora, unet_scale, te_scale)
    comfy.model_management.load_models_gpu([patched_unet, patched_clip.patcher])
    session.patcher.apply([LoraChoice(str(lora_path), unet_scale, te_scale)])

    scheduler = make_scheduler("euler_a", session.base.noise_scheduler)
    scheduler.set_timesteps(20)
    timestep = scheduler.timesteps[:1].float()  # the sampler's first step
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_cond, _ = encode_base_prompt(session.base, PROMPT)
        ours_uncond, _ = encode_base_prompt(session.base, NEGATIVE)
        theirs_cond = patched_clip.encode_from_tokens(patched_clip.tokenize(PROMPT))
        theirs_uncond = patched_clip.encode_from_tokens(patched_clip.tokenize(NEGATIVE))

        def guided(forward, cond, uncond):
            eps_uncond, eps_cond = forward(uncond), forward(cond)
            return eps_uncond + GUIDANCE * (eps_cond - eps_uncond)

        ours = guided(lambda c: session.base.unet(latents, timestep, encoder_hidden_states=c).sample,
                      ours_cond, ours_uncond)
        theirs = guided(lambda c: patched_unet.model.diffusion_model(latents, timestep, context=c),
                        theirs_cond, theirs_uncond)
        session.patcher.apply([])  # the base model alone: how much the LoRA changes the step
        plain = guided(lambda c: session.base.unet(latents, timestep, encoder_hidden_states=c).sample,
                       *(encode_base_prompt(session.base, p)[0] for p in (PROMPT, NEGATIVE)))
    effect = float((ours - plain).norm() / plain.norm())
    text_error = float((ours_cond - theirs_cond).norm() / theirs_cond.norm())
    step_error = float((ours - theirs).norm() / theirs.norm())
    print(f"\nunet {unet_scale} te {te_scale}: conditioning rel. error {text_error:.2e}, guided noise prediction "
          f"{step_error:.2e}; the LoRA changes the step by {effect:.2e}")
    assert text_error < TOLERANCE and step_error < TOLERANCE
    assert effect > 100 * TOLERANCE if (unet_scale or te_scale) else effect == 0

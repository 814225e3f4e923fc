"""Learned tokens in the real ComfyUI 0.3.75: the exported embedding file, used as
``embedding:NAME`` in a prompt through the stock CLIPTextEncode node, gives the conditioning our
own pipeline gives with the learned tokens; with the LoRA through the stock LoraLoader node
(strength_clip 1) the full conditioning matches too. SD1 and SDXL (both CLIP-L and bigG
vectors, and SDXL's pooled output), fp32 on the CPU; ``-s`` prints the differences.

ComfyUI builds its text encoders from fixed configs; ``model_options["<name>_model_config"]``
(``comfy/sd1_clip.py`` l.104) gives them the tiny sizes. SDXL's CLIP-L reads the penultimate
layer and ComfyUI asserts more than two layers (l.153), so the SDXL model here is a tiny one
with three text-encoder layers, built for the test.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from dreambooth_lora.fixtures import checkpoints
from dreambooth_lora.fixtures.checkpoints import fixture_path
from dreambooth_lora.models import layouts
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.runtime.peft import adapters_disabled
from dreambooth_lora.runtime.text import encode_base_prompt
from dreambooth_lora.sampling.patch import LoraChoice
from dreambooth_lora.sampling.session import SamplingSession
from dreambooth_lora.trainer.loop import train

from test_styles import style_job

TOLERANCE = 1e-5  # max abs difference; measured 1.4e-6 at values up to 4.5 (fp32)
PROMPT = "a car in the style of {}, at night"


def comfy_clip(comfy_family: str, checkpoint, embedding_dir, layers: int):
    """ComfyUI's own CLIP (tokenizer + text encoders, its key conversion) for a tiny checkpoint."""
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models as supported
    from safetensors.torch import load_file

    state = load_file(str(checkpoint))
    unet_config = comfy.model_detection.detect_unet_config(state, layouts.UNET_PREFIX)
    model_config = {"sd1": supported.SD15, "sdxl": supported.SDXL}[comfy_family](unet_config)
    clip_state = model_config.process_clip_state_dict(state)
    sizes = {**checkpoints.TINY_TEXT, "num_hidden_layers": layers}
    options = {"dtype": torch.float32, "clip_l_model_config": sizes, "clip_g_model_config": sizes}
    clip = comfy.sd.CLIP(model_config.clip_target(clip_state), embedding_directory=[str(embedding_dir)],
                         model_options=options)
    missing, unexpected = clip.load_sd(clip_state, full_model=True)
    # CLIP-L has no projection in SD checkpoints (ComfyUI's own checkpoint loader leaves it unset too)
    ignorable = ("position_ids", "logit_scale", "clip_l.transformer.text_projection")
    assert not [k for k in missing if not any(i in k for i in ignorable)], missing
    return clip


@pytest.fixture(scope="module")
def sdxl_three_layers(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl3") / "sdxl3-tiny.safetensors"
    saved = dict(checkpoints.TINY_TEXT)
    checkpoints.TINY_TEXT["num_hidden_layers"] = 3
    try:
        return checkpoints.build_checkpoint(path, "sdxl", tiny=True)
    finally:
        checkpoints.TINY_TEXT.clear()
        checkpoints.TINY_TEXT.update(saved)


def _encode_comfyui(clip, text):
    import nodes

    (conditioning,) = nodes.CLIPTextEncode().encode(clip, text)
    cond, extra = conditioning[0]
    return cond, extra.get("pooled_output")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_embedding_and_lora_in_comfyui_match_our_pipeline(comfy, tmp_path, sdxl_three_layers, family):
    import folder_paths
    import nodes

    checkpoint = fixture_path("sd1-tiny") if family == "sd1" else sdxl_three_layers
    layers = 2 if family == "sd1" else 3
    base = load_base_model(checkpoint)
    job = style_job(tmp_path, "pivot", fixture=checkpoint, base=base, steps=4, train_text_encoder=True,
                    text_encoder_lr=5e-3, new_tokens=2)
    result = train(job)
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    shutil.copy(result.embedding, embeddings / "mystyle.safetensors")  # ComfyUI's name is the file name
    loras = tmp_path / "loras"
    loras.mkdir()
    lora_name = f"mystyle_{family}.safetensors"  # one loras list for the whole session: a name per test
    shutil.copy(result.output, loras / lora_name)
    folder_paths.add_model_folder_path("loras", str(loras))

    clip = comfy_clip(family, checkpoint, embeddings, layers)
    session = SamplingSession(load_base_model(checkpoint), checkpoint)
    session.load_embedding(result.embedding)
    ours_text = PROMPT.format("<s1><s2>")
    theirs_text = PROMPT.format("embedding:mystyle")

    def compare(label, ours, theirs):
        (o_cond, o_pooled), (t_cond, t_pooled) = ours, theirs
        assert o_cond.shape == t_cond.shape
        error = float((o_cond - t_cond).abs().max())
        pooled_error = float((o_pooled - t_pooled).abs().max()) if o_pooled is not None else 0.0
        print(f"\n{family} {label}: max abs difference {error:.2e} (pooled {pooled_error:.2e}), "
              f"conditioning scale {float(t_cond.abs().max()):.2f}")
        assert error < TOLERANCE and pooled_error < TOLERANCE
        return o_cond

    with torch.no_grad():
        # 1. the embedding alone: ComfyUI vs the training's own model (its TE LoRA switched off)
        #    and vs our sampler that loaded the file
        theirs = _encode_comfyui(clip, theirs_text)
        with adapters_disabled(*base.text_encoders):
            trained = encode_base_prompt(base, ours_text)
        compare("embedding, training model", trained, theirs)
        with_tokens = compare("embedding, sampler", session.encode(ours_text), theirs)
        without, _ = session.encode(PROMPT.format("painting"))  # the tokens' starting word: they moved away
        assert float((with_tokens - without).abs().max()) > 100 * TOLERANCE
        # 2. embedding + LoRA through the stock LoraLoader (strength_clip 1): the full conditioning
        _, lora_clip = nodes.LoraLoader().load_lora(None, clip, lora_name, 1.0, 1.0)  # no UNet here: its keys
        # are reported as not loaded; the text-encoder keys all patch CLIP
        theirs_lora = _encode_comfyui(lora_clip, theirs_text)
        session.patcher.apply([LoraChoice(str(result.output), 1.0, 1.0)])
        full = compare("embedding + LoRA", session.encode(ours_text), theirs_lora)
        assert float((full - with_tokens).abs().max()) > 100 * TOLERANCE  # the TE LoRA matters

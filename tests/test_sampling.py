"""Sampling with LoRAs at separate UNet / text-encoder scales, long prompts, grids, and
re-creating an image from its PNG parameters (tiny models, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lora.converters.kohya import save_kohya
from dreambooth_lora.converters.peft import from_peft
from dreambooth_lora.converters.structure import unet_layout_of
from dreambooth_lora.errors import UserError
from dreambooth_lora.fixtures.adapters import add_random_lora, random_lora_file
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.runtime.parameters import png_parameters, read_parameters
from dreambooth_lora.runtime.peft import peft_state
from dreambooth_lora.runtime.text import encode_base_prompt
from dreambooth_lora.sampling.grid import make_grid, parse_axis, with_axis
from dreambooth_lora.sampling.patch import LoraChoice, LoraPatcher, parse_lora
from dreambooth_lora.sampling.session import SamplingSession
from dreambooth_lora.sampling.settings import SampleSettings, parameters_text, settings_from_parameters


@pytest.fixture(scope="module")
def sd1(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return tiny["sd1-tiny"], random_lora_file(tiny["sd1-tiny"], folder / "subject.safetensors")


def pixels(samples) -> np.ndarray:
    return np.stack([np.asarray(s.image) for s in samples])


def test_parse_lora():
    assert parse_lora("a/b.safetensors") == LoraChoice("a/b.safetensors", 1.0, 1.0)
    assert parse_lora("a/b.safetensors:0.5") == LoraChoice("a/b.safetensors", 0.5, 0.5)
    assert parse_lora("a/b.safetensors:0.8:0") == LoraChoice("a/b.safetensors", 0.8, 0.0)
    assert parse_lora("C:/x/b.safetensors:1:0.25") == LoraChoice("C:/x/b.safetensors", 1.0, 0.25)
    with pytest.raises(UserError, match="FILE\\[:UNET_SCALE\\[:TE_SCALE\\]\\]"):
        parse_lora(":1")


def test_same_seed_same_image_and_scales_change_without_reloading(sd1):
    base_path, lora = sd1
    session = SamplingSession(load_base_model(base_path), base_path)
    plain = SampleSettings(prompt="a photo of sks dog", seed=3, steps=3, width=64, height=64, batch=2)
    with_lora = SampleSettings(**{**plain.__dict__, "loras": [LoraChoice(str(lora), 1.0, 1.0)]})
    first = pixels(session.sample(with_lora))
    assert not np.array_equal(first[0], first[1])  # seeds 3 and 4
    without = pixels(session.sample(plain))
    assert not np.array_equal(first, without)
    half = SampleSettings(**{**plain.__dict__, "loras": [LoraChoice(str(lora), 0.5, 0.5)]})
    assert not np.array_equal(pixels(session.sample(half)), first)
    # back to full strength, and to none: the weights are rebuilt from the saved originals
    assert np.array_equal(pixels(session.sample(with_lora)), first)
    assert np.array_equal(pixels(session.sample(plain)), without)
    # a fresh model gives the same images: nothing depends on what was sampled before
    fresh = SamplingSession(load_base_model(base_path), base_path)
    assert np.array_equal(pixels(fresh.sample(with_lora)), first)
    # image i of a batch is seed + i on its own
    alone = SampleSettings(**{**with_lora.__dict__, "seed": 4, "batch": 1})
    assert np.array_equal(pixels(fresh.sample(alone))[0], first[1])
    # made together (one denoising loop, for measuring): each image still from its own seed, equal up
    # to rounding (CPU kernels are not batch-invariant: at most 1 level apart in a few values)
    together = pixels(fresh.sample(with_lora, together=True)).astype(int)
    apart = np.abs(together - first.astype(int))
    assert apart.max() <= 1 and (apart > 0).mean() < 0.01, (apart.max(), (apart > 0).mean())
    assert np.abs(together[0] - together[1]).mean() > 10, "two seeds, two images"


def test_a_lora_rewritten_under_the_same_name_is_read_again(tiny, tmp_path):
    """Retraining to the same file name (what a ComfyUI graph does on every queue) must sample the
    new weights, not those a session read before; and its hash in the PNG parameters is the new one."""
    base_path = tiny["sd1-tiny"]
    lora = tmp_path / "subject.safetensors"
    random_lora_file(base_path, lora, seed=0)
    session = SamplingSession(load_base_model(base_path), base_path)
    settings = SampleSettings(prompt="a photo of sks dog", seed=3, steps=3, width=64, height=64,
                              loras=[LoraChoice(str(lora), 1.0, 1.0)])
    first, first_hash = pixels(session.sample(settings)), session.lora_hash(str(lora))
    random_lora_file(base_path, tmp_path / "retrained.safetensors", seed=1)
    (tmp_path / "retrained.safetensors").replace(lora)  # as the durable writer puts a new file in place
    second = pixels(session.sample(settings))
    fresh = SamplingSession(load_base_model(base_path), base_path)
    assert not np.array_equal(first, second)
    assert np.array_equal(second, pixels(fresh.sample(settings)))
    assert session.lora_hash(str(lora)) == fresh.lora_hash(str(lora)) != first_hash


def test_unet_and_text_encoder_scales_act_separately(sd1):
    base_path, lora = sd1
    base = load_base_model(base_path)
    patcher = LoraPatcher(base)
    unet_weight = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    text_weight = next(m for n, m in base.text_encoders[0].named_modules()
                       if n.endswith("layers.0.self_attn.q_proj")).weight  # with or without "text_model."
    unet_0, text_0 = unet_weight.clone(), text_weight.clone()
    patcher.apply([LoraChoice(str(lora), 1.0, 0.0)])
    assert not torch.equal(unet_weight, unet_0) and torch.equal(text_weight, text_0)
    unet_1 = unet_weight.clone()
    patcher.apply([LoraChoice(str(lora), 0.0, 0.5)])
    assert torch.equal(unet_weight, unet_0) and not torch.equal(text_weight, text_0)
    patcher.apply([LoraChoice(str(lora), 0.5, 0.0)])  # halfway, exactly: W0 + 0.5·ΔW
    assert torch.allclose(unet_weight, (unet_0 + unet_1) / 2, atol=1e-6)
    # two LoRAs on one layer add up
    patcher.apply([LoraChoice(str(lora), 0.5, 0.0), LoraChoice(str(lora), 0.5, 0.0)])
    assert torch.allclose(unet_weight, unet_1, atol=1e-6)


def test_dora_is_patched_as_peft_merges_it(tiny, tmp_path):
    base_path = tiny["sd1-tiny"]
    model = load_base_model(base_path)
    config = add_random_lora(model.unet, ["to_q"], 4, 2.0, 5, use_dora=True)
    adapter = from_peft("sd1", unet_layout_of(model.unet.config), {"unet": (peft_state(model.unet), config)})
    path = save_kohya(adapter, tmp_path / "dora.safetensors", dtype="fp32")
    layer = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    base = load_base_model(base_path)
    LoraPatcher(base).apply([LoraChoice(str(path))])
    ours = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert torch.allclose(ours, merged, atol=1e-5), float((ours - merged).abs().max())


def test_long_prompts_are_encoded_in_75_token_windows(tiny):
    base = load_base_model(tiny["sd1-tiny"])
    words = " ".join(["red"] * 100)  # 100 tokens: two windows
    hidden, pooled = encode_base_prompt(base, words)
    assert hidden.shape[1] == 2 * 77 and pooled is None
    first, _ = encode_base_prompt(base, " ".join(["red"] * 75))
    assert torch.equal(hidden[:, :77], first)
    # a short prompt is the usual single window, as the trainer and diffusers encode it
    short, _ = encode_base_prompt(base, "a photo of sks dog")
    ids = base.tokenizers[0]("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(short, base.text_encoders[0](ids)[0])
    # the negative prompt gets as many windows as the prompt; sampling a long prompt works
    session = SamplingSession(base, tiny["sd1-tiny"])
    session.sample(SampleSettings(prompt=words, negative="blurry", steps=2, width=64, height=64))
    xl = load_base_model(tiny["sdxl-tiny"])
    hidden, pooled = encode_base_prompt(xl, words)
    assert hidden.shape[1] == 154 and pooled.shape[0] == 1


def test_grid_cells_recreate_bit_identically_from_their_png(sd1, tmp_path):
    base_path, lora = sd1
    session = SamplingSession(load_base_model(base_path), base_path)
    settings = SampleSettings(prompt="a photo of sks dog, detailed", negative="blurry", seed=11, steps=3, width=64,
                              height=64, sampler="dpmpp_2m", loras=[LoraChoice(str(lora), 1.0, 0.7)])
    result = make_grid(session, settings, parse_axis("unet-scale=0,0.5,1"),
                                parse_axis("guidance=3,5,7"), tmp_path / "grid.png")
    grid = Image.open(result.path)
    assert len(result.cells) == 3 and all(len(row) == 3 for row in result.cells)
    assert grid.width > 3 * 64 and grid.height > 3 * 64  # cells plus label margins
    fresh = SamplingSession(load_base_model(base_path), base_path)
    for row, guidance in enumerate([3.0, 5.0, 7.0]):
        for column, scale in enumerate([0.0, 0.5, 1.0]):
            text = png_parameters(result.cells[row][column])
            again = settings_from_parameters(text, [lora.parent])
            assert again.guidance == guidance and again.loras[0].unet_scale == scale
            assert again.loras[0].te_scale == 0.7 and again.sampler == "dpmpp_2m" and again.negative == "blurry"
            remade = fresh.sample(again)[0]
            assert np.array_equal(np.asarray(remade.image), np.asarray(Image.open(result.cells[row][column])))
    with pytest.raises(UserError, match="exists; choose another --out or pass --overwrite"):
        make_grid(session, settings, ("seed", ["1"]), ("steps", ["2"]), tmp_path / "grid.png")


def test_parameters_text_is_a1111s(sd1):
    settings = SampleSettings(prompt="a sks dog", negative="ugly", seed=5, steps=20, guidance=7.0, sampler="euler_a",
                              loras=[LoraChoice("x/subject.safetensors", 1.0, 0.5)])
    text = parameters_text(settings, 5, 512, 512, "model", "abc", {"subject": "0123456789ab"})
    assert text.splitlines()[0] == "a sks dog <lora:subject:te=0.5:unet=1>"
    assert text.splitlines()[1] == "Negative prompt: ugly"
    assert text.splitlines()[2].startswith("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512")
    parsed = read_parameters(text)
    assert parsed["prompt"] == "a sks dog" and parsed["loras"] == [("subject", 1.0, 0.5)]
    # A1111's positional form: <lora:name:te:unet>, one number = both
    assert read_parameters("x <lora:a:0.3> <lora:b:0.2:0.9>\nSteps: 1")["loras"] == [("a", 0.3, 0.3),
                                                                                          ("b", 0.9, 0.2)]


def test_sample_and_grid_commands(sd1, tmp_path, capsys):
    from dreambooth_lora.cli import main

    base_path, lora = sd1
    common = ["--base", str(base_path), "--steps", "2", "--width", "64", "--height", "64"]
    assert main(["sample", *common, "--lora", f"{lora}:1:0.5", "--prompt", "a sks dog", "--seed", "7", "--batch", "2",
                 "--out", str(tmp_path / "out")]) == 0
    written = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in written] == ["000007.png", "000008.png"]
    assert main(["sample", "--base", str(base_path), "--recreate", str(written[1]), "--lora-dir", str(lora.parent),
                 "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "000008.png").read_bytes() == written[1].read_bytes()
    assert main(["grid", *common, "--lora", str(lora), "--x", "te-scale=0,1", "--y", "seed=1,2", "--prompt", "a sks dog",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists() and len(list((tmp_path / "g_cells").glob("*.png"))) == 4
    assert main(["sample", *common, "--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)]) == 2
    assert "missing.safetensors: no such LoRA file" in capsys.readouterr().err
    assert main(["grid", *common, "--x", "colour=1,2", "--y", "seed=1", "--out", str(tmp_path / "h.png")]) == 2
    assert "NAME one of unet-scale" in capsys.readouterr().err


def test_sdxl_lora_reaches_both_text_encoders_and_samples(tiny, tmp_path):
    lora = random_lora_file(tiny["sdxl-tiny"], tmp_path / "xl.safetensors")
    session = SamplingSession(load_base_model(tiny["sdxl-tiny"]), tiny["sdxl-tiny"])
    settings = SampleSettings(prompt="a sks dog", steps=2, width=64, height=64, loras=[LoraChoice(str(lora), 1.0, 1.0)])
    first = pixels(session.sample(settings))
    touched = {component for component, _ in session.patcher.originals}
    assert touched == {"unet", "text_encoder", "text_encoder_2"}
    te_only = SampleSettings(**{**settings.__dict__, "loras": [LoraChoice(str(lora), 0.0, 1.0)]})
    assert not np.array_equal(pixels(session.sample(te_only)), first)
    assert np.array_equal(pixels(session.sample(settings)), first)


def test_grid_over_training_steps_and_recreating_a_step_by_hash(sd1, tmp_path):
    import shutil

    base_path, lora = sd1
    state = tmp_path / "sks.state"
    for step, seed in ((2, 21), (4, 22)):  # two "checkpoints" of a training run, different weights
        (state / f"step-{step:06d}").mkdir(parents=True)
        random_lora_file(base_path, state / f"step-{step:06d}" / "lora.safetensors", seed=seed)
    shutil.copy(lora, tmp_path / "sks.safetensors")  # the final file; its state folder sits beside it
    session = SamplingSession(load_base_model(base_path), base_path)
    settings = SampleSettings(prompt="a sks dog", seed=1, steps=2, width=64, height=64,
                              loras=[LoraChoice(str(tmp_path / "sks.safetensors"), 1.0, 1.0)])
    result = make_grid(session, settings, parse_axis("step=2,4"), parse_axis("seed=1"),
                                tmp_path / "steps.png")
    cells = result.cells[0]
    assert not np.array_equal(np.asarray(Image.open(cells[0])), np.asarray(Image.open(cells[1])))
    text = png_parameters(cells[1])
    assert "<lora:sks-step-000004:" in text
    again = settings_from_parameters(text, [tmp_path])  # found by its hash below tmp_path
    assert Path(again.loras[0].path) == state / "step-000004" / "lora.safetensors"
    assert np.array_equal(np.asarray(session.sample(again)[0].image), np.asarray(Image.open(cells[1])))
    with pytest.raises(UserError, match="has no checkpoint for step 6"):
        with_axis(settings, "step", "6")

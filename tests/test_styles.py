"""Styles and pivotal tuning on tiny models: new tokens learned alone (textual inversion) or with
the LoRA, saved in the A1111/ComfyUI embedding format, and read back by the real ComfyUI.

Loader code these files are written for (ComfyUI 0.3.75 as installed; A1111 v1.10 from the
search index's copies, see ../shared/reference/lora-format.md §7 item 13 for the caveat):
- ComfyUI ``comfy/sd1_clip.py``: ``SDTokenizer.tokenize_with_weights`` (l.564-583) splits the prompt
  at `` embedding:`` and calls ``load_embed`` (l.402-471), which finds NAME(.safetensors) in the
  embeddings folders and takes ``string_to_param``, else the tensor under the tokenizer's
  ``embedding_key`` (``clip_l`` for SD1 and SDXL's CLIP-L, ``clip_g`` for SDXL's bigG, l.474 and
  ``sdxl_clip.py`` l.21), else ``bundle_emb.*`` keys, else the file's first tensor (our SD1/SD2
  ``emb_params``). ``SDClipModel.process_tokens`` (l.217-246) puts all N vectors in place of the
  word, in order, when their width matches the encoder's.
- A1111 ``modules/textual_inversion/textual_inversion.py: create_embedding_from_data``: a
  ``string_to_param`` dict with exactly one entry (.pt), or ``clip_g`` and ``clip_l`` (SDXL: width
  = clip_g + clip_l), or a dict with exactly one tensor ("diffuser concepts"; our SD1/SD2
  ``emb_params``). ``extensions-builtin/Lora/networks.py: load_network`` collects bundled
  ``bundle_emb.NAME.string_to_param.*`` / ``bundle_emb.NAME.clip_l`` keys per NAME into the same
  dicts. ``_a1111_create_embedding_from_data`` below transcribes those branches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_lora.errors import UserError
from dreambooth_lora.fixtures.checkpoints import fixture_path
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.trainer import step as trainer_step
from dreambooth_lora.trainer.job import TrainingStopped, TrainJob, caption_maker, resolve_settings
from dreambooth_lora.trainer.loop import train
from dreambooth_lora.trainer.options import STYLE_METHODS, TrainSettings

CLI = [sys.executable, "-m", "dreambooth_lora.cli"]
STYLE_CAPTIONS = ["a red square on a dark field", "a red block, off centre", "a wide red shape", "red on black"]


def make_style_set(folder: Path, count: int = 4) -> Path:
    """Pictures of one 'style' (red shapes on dark noise), each with its own caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        pixels = (rng.random((72, 80, 3)) * 60).astype(np.uint8)
        pixels[10 + 3 * i:50, 12:60 - 5 * i] = (220, 40, 30)
        Image.fromarray(pixels).save(folder / f"style_{i}.png")
        (folder / f"style_{i}.txt").write_text(STYLE_CAPTIONS[i % len(STYLE_CAPTIONS)])
    return folder


def style_job(tmp_path: Path, name: str, fixture="sd1-tiny", base=None, **options) -> TrainJob:
    values = {"resolution": 64, "steps": 6, "rank": 4, "alpha": 4, "save_every": 0, "learning_rate": 1e-3,
              "seed": 5, "mode": "style", "new_tokens": 2, "token_init": "painting", "token_lr": 1e-2}
    values.update(options)
    path = fixture if isinstance(fixture, Path) else fixture_path(fixture)
    return TrainJob(base=str(path), output=str(tmp_path / f"{name}.safetensors"),
                         instance_dir=str(make_style_set(tmp_path / "style")), options=values, base_model=base)


def model_state(base) -> dict[str, torch.Tensor]:
    """Every weight of the model, keyed as in the original modules (the wrapped token table
    under its original name)."""
    out = {}
    for index, module in enumerate([base.unet, base.vae, *base.text_encoders]):
        for key, value in module.state_dict().items():
            if key.endswith("token_embedding.extra"):
                continue
            out[f"{index}.{key.replace('token_embedding.base.', 'token_embedding.')}"] = value.detach().clone()
    return out


# --- training ------------------------------------------------------------------------


def test_textual_inversion_changes_only_the_new_rows(tmp_path):
    base = load_base_model(fixture_path("sd1-tiny"))
    before = model_state(base)
    from dreambooth_lora.runtime.tokens import initial_vectors, token_embedding

    start = initial_vectors(base.tokenizers[0], base.text_encoders[0], 2, "painting", torch.Generator())
    result = train(style_job(tmp_path, "ti", base=base, train_unet=False))
    after = model_state(base)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"{len(changed)} weights changed, e.g. {changed[:3]}"
    # ... while the two new rows moved away from where 'painting' put them
    rows = token_embedding(base.text_encoders[0]).rows(base.tokenizers[0].convert_tokens_to_ids(["<s1>", "<s2>"]))
    moved = (rows.detach().float() - start).norm(dim=1)
    assert (moved > 1e-3).all(), moved
    # textual inversion alone: the output is the embedding file, and there is no LoRA
    assert result.lora is None and result.embedding == result.output
    saved = load_file(str(result.output))
    assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (2, 32)
    assert torch.equal(saved["emb_params"], rows.detach().float())
    with safe_open(str(result.output), "pt") as handle:
        assert handle.metadata()["dreambooth_lora.tokens"] == "<s1><s2>"


def test_pivotal_tuning_trains_both_and_resumes_exactly(tmp_path):
    """Tokens + UNet/TE LoRA; the tokens stop at half the steps; a stop before that point and a
    resume give the uninterrupted run's LoRA, tokens and loss log bit for bit."""
    options = dict(steps=8, train_text_encoder=True, token_steps_fraction=0.5, save_every=2, keep_checkpoints=0)
    whole = train(style_job(tmp_path, "whole", **options))
    state = whole.state_dir
    tokens = {s: load_file(str(state / f"step-{s:06d}" / "adapter_tokens.safetensors"))["text_encoder"]
              for s in (2, 4, 8)}
    unet = {s: load_file(str(state / f"step-{s:06d}" / "adapter_unet.safetensors")) for s in (4, 8)}
    te = {s: load_file(str(state / f"step-{s:06d}" / "adapter_text_encoder.safetensors")) for s in (4, 8)}
    assert not torch.equal(tokens[2], tokens[4])  # the tokens train ...
    assert torch.equal(tokens[4], tokens[8])  # ... for half the steps
    assert any(not torch.equal(unet[4][k], unet[8][k]) for k in unet[4])  # the LoRA to the end
    assert any(not torch.equal(te[4][k], te[8][k]) for k in te[4])
    # the files: a LoRA and, beside it, the embedding
    assert whole.lora == whole.output and whole.embedding == tmp_path / "whole_emb.safetensors"
    assert torch.equal(load_file(str(whole.embedding))["emb_params"], tokens[8])
    with safe_open(str(whole.output), "pt") as handle:
        meta, keys = handle.metadata(), list(handle.keys())
    assert meta["modelspec.trigger_phrase"] == "whole_emb" and meta["dreambooth_lora.tokens"] == "<s1><s2>"
    assert meta["dreambooth_lora.mode"] == "style" and meta["ss_prior_loss_weight"] == "0"  # style: no priors
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)  # nothing bundled by default

    calls = []
    with pytest.raises(TrainingStopped, match="stopped at step 3"):
        train(style_job(tmp_path, "cut", **options), should_stop=lambda: calls.append(1) or len(calls) >= 3)
    job = style_job(tmp_path, "cut", **options)
    job.resume = str(tmp_path / "cut.state")
    resumed = train(job)
    for name in ("adapter_unet", "adapter_text_encoder", "adapter_tokens"):
        a = load_file(str(state / "adapter" / f"{name}.safetensors"))
        b = load_file(str(resumed.state_dir / "adapter" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = lambda folder: [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert losses(state) == losses(resumed.state_dir)


def test_the_three_style_methods_train_on_the_same_budget(tmp_path):
    """STYLE_METHODS: what a benchmark merges into the same options to compare them."""
    outputs = {}
    for method, options in STYLE_METHODS.items():
        result = train(style_job(tmp_path, method, steps=2, **{"new_tokens": 0, **options}))
        assert len(result.log) == 2
        outputs[method] = (result.lora is not None, result.embedding is not None)
    assert outputs == {"lora": (True, False), "textual_inversion": (False, True), "pivotal": (True, True)}


def test_captions_go_through_the_template(tmp_path, monkeypatch):
    seen = set()
    real = trainer_step.encode_text

    def spy(family, tokenizers, encoders, captions, device):
        seen.update(captions)
        return real(family, tokenizers, encoders, captions, device)

    monkeypatch.setattr(trainer_step, "encode_text", spy)
    train(style_job(tmp_path, "tpl", steps=4, train_unet=False))  # one epoch
    assert seen == {f"{c}, in the style of <s1><s2>" for c in STYLE_CAPTIONS}
    settings = resolve_settings(TrainSettings.of({"mode": "subject", "new_tokens": 2}))
    assert settings.prior_preservation == "class_images"
    assert caption_maker(settings)("a photo of sks dog") == "a photo of <s1><s2> dog"
    style = resolve_settings({"mode": "style", "caption_template": "{tokens} art, {caption}"})
    assert style.prior_preservation == "off" and caption_maker(style)("a cat") == "sks art, a cat"


def test_bad_token_setups_get_clear_errors(tmp_path):
    with pytest.raises(UserError, match=r"nothing to train: --no-train-unet .* needs --new-tokens"):
        train(style_job(tmp_path, "none", new_tokens=0, train_unet=False))
    with pytest.raises(UserError, match=r"no caption contains the new tokens <s1><s2>: put \{tokens\}"):
        train(style_job(tmp_path, "nocap", caption_template="{caption}"))
    with pytest.raises(UserError, match=r"--token-steps-fraction below 1 with textual inversion alone"):
        train(style_job(tmp_path, "frac", train_unet=False, token_steps_fraction=0.5))


# --- files: A1111 by structure --------------------------------------------------------


def _a1111_create_embedding_from_data(data: dict) -> tuple[int, int]:
    """(vectors, width) as A1111's create_embedding_from_data computes them; raises where it fails."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values()))
        return vec.shape[0], vec.shape[-1]
    if isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        return data["clip_g"].shape[0], data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    if isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        emb = emb.unsqueeze(0) if emb.ndim == 1 else emb
        return emb.shape[0], emb.shape[-1]
    raise ValueError("Couldn't identify as neither textual inversion embedding nor diffuser concept.")


def _a1111_bundles(lora: dict) -> dict[str, dict]:
    """networks.py load_network: bundle_emb.NAME.VEC → {NAME: {VEC or string_to_param: {k2: w}}}."""
    bundles: dict[str, dict] = {}
    for key, weight in lora.items():
        head, _, network_part = key.partition(".")
        if head == "bundle_emb":
            emb_name, vec_name = network_part.split(".", 1)
            entry = bundles.setdefault(emb_name, {})
            if vec_name.split(".")[0] == "string_to_param":
                entry["string_to_param"] = {vec_name.split(".", 1)[1]: weight}
            else:
                entry[vec_name] = weight
    return bundles


@pytest.mark.parametrize("fixture,keys,width", [("sd1-tiny", ["emb_params"], 32), ("sd2-tiny", ["emb_params"], 32),
                                                ("sdxl-tiny", ["clip_g", "clip_l"], 64)])
def test_embedding_and_bundle_have_a1111s_structure(tmp_path, fixture, keys, width):
    """SD1/SD2: one [N, dim] tensor (A1111 width = the encoder's); SDXL: clip_l and clip_g (width =
    their sum, what A1111 compares with the model's 768 + 1280). Bundled in the LoRA: the keys
    A1111's networks.py regroups into the same dicts. Sizes here are the tiny models' (32 per encoder)."""
    result = train(style_job(tmp_path, "a1", fixture=fixture, steps=2, new_tokens=3, bundle_embeddings=True,
                                  train_text_encoder=fixture == "sdxl-tiny"))
    data = load_file(str(result.embedding))
    assert sorted(data) == keys and all(v.dtype == torch.float32 and v.shape == (3, 32) for v in data.values())
    assert _a1111_create_embedding_from_data(data) == (3, width)
    lora = load_file(str(result.output))
    bundles = _a1111_bundles(lora)
    assert list(bundles) == ["a1_emb"]  # the embedding's name, as the separate file calls it
    assert _a1111_create_embedding_from_data(bundles["a1_emb"]) == (3, width)
    inner = bundles["a1_emb"].get("string_to_param", {}).get("*")
    if inner is not None:
        assert torch.equal(inner, data["emb_params"])  # SD1/SD2: bundle_emb.NAME.string_to_param.*
    else:
        assert torch.equal(bundles["a1_emb"]["clip_l"], data["clip_l"]) and \
            torch.equal(bundles["a1_emb"]["clip_g"], data["clip_g"])
    # our own loaders read the bundled LoRA: the layers, and the embedding from its keys
    from dreambooth_lora.converters.embeddings import read_embedding
    from dreambooth_lora.converters.files import load_adapter
    from dreambooth_lora.converters.structure import structure_of_checkpoint

    load_adapter(result.output, structure_of_checkpoint(fixture_path(fixture)))
    family = {"sd1-tiny": "sd1", "sd2-tiny": "sd2", "sdxl-tiny": "sdxl"}[fixture]
    again = read_embedding(result.output, family, [32] * len(keys))
    assert all(torch.equal(a, b) for a, b in zip(again.vectors, read_embedding(result.embedding, family,
                                                                                [32] * len(keys)).vectors))


# --- sampling with the learned tokens ----------------------------------------------------


def test_sampler_reads_every_prompt_syntax_and_records_a1111_parameters(tmp_path):
    from dreambooth_lora.runtime.text import encode_base_prompt
    from dreambooth_lora.sampling.session import SamplingSession
    from dreambooth_lora.sampling.settings import SampleSettings, settings_from_parameters

    base = load_base_model(fixture_path("sd1-tiny"))
    result = train(style_job(tmp_path, "sm", base=base, steps=3, train_unet=False))
    trained, _ = encode_base_prompt(base, "a car in the style of <s1><s2>")  # the training's own model
    session = SamplingSession(load_base_model(fixture_path("sd1-tiny")), fixture_path("sd1-tiny"))
    plain, _ = session.encode("a car in the style of <s1><s2>")  # nothing loaded yet: just BPE pieces
    session.load_embedding(result.embedding)
    for prompt in ("a car in the style of <s1><s2>", "a car in the style of embedding:sm",
                   "a car in the style of sm", "a car in the style of embedding:sm.safetensors"):
        ours, _ = session.encode(prompt)
        assert torch.equal(ours, trained), prompt
    assert not torch.allclose(plain, trained, atol=1e-3)
    settings = SampleSettings(prompt="a car in the style of embedding:sm", steps=2, width=64, height=64,
                              embeddings=[str(result.embedding)])
    sample = session.sample(settings)[0]
    assert sample.parameters.startswith("a car in the style of sm\n")  # A1111's own syntax
    assert f'TI hashes: "sm: {session.lora_hash(result.embedding)}"' in sample.parameters
    again = settings_from_parameters(sample.parameters, [], [tmp_path])
    assert again.embeddings == [str(result.embedding)]
    fresh = SamplingSession(load_base_model(fixture_path("sd1-tiny")), fixture_path("sd1-tiny"))
    assert np.array_equal(fresh.sample(again)[0].pixels, sample.pixels)


def test_cli_trains_a_style_with_new_tokens_and_samples_it(tmp_path):
    style = make_style_set(tmp_path / "style")
    out = tmp_path / "mystyle.safetensors"
    command = CLI + ["train", "--base", str(fixture_path("sd1-tiny")), "--instance-dir", str(style), "--output", str(out),
                     "--mode", "style", "--new-tokens", "2", "--token-init", "painting", "--steps", "3",
                     "--resolution", "64", "--rank", "4", "--save-every", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    embedding = tmp_path / "mystyle_emb.safetensors"
    assert out.is_file() and embedding.is_file()
    assert "embedding:mystyle_emb in ComfyUI" in result.stdout + result.stderr
    sample = subprocess.run(CLI + ["sample", "--base", str(fixture_path("sd1-tiny")), "--lora", str(out),
                                   "--embedding", str(embedding), "--prompt", "a car in the style of <s1><s2>",
                                   "--steps", "2", "--width", "64", "--height", "64", "--out", str(tmp_path / "img")],
                            capture_output=True, text=True, timeout=600)
    assert sample.returncode == 0, sample.stderr[-2000:]
    text = Image.open(tmp_path / "img" / "000000.png").info["parameters"]
    assert text.startswith("a car in the style of mystyle_emb <lora:mystyle:") and "TI hashes" in text

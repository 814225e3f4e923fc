"""The paper's metrics: formulas against a hand computation, `eval` end to end on tiny random
evaluators (DINO ViT, CLIP folder, ComfyUI clip_vision file), and checkpoint selection."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lora.errors import UserError
from dreambooth_lora.evaluation import choosing
from dreambooth_lora.evaluation import core as ev


def hand_cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_formulas_match_a_hand_computation():
    rng = np.random.default_rng(0)
    gen, real = rng.normal(size=(3, 5)).tolist(), rng.normal(size=(4, 5)).tolist()
    pairs = [hand_cosine(g, r) for g in gen for r in real]
    assert ev.mean_pairwise_cosine(gen, real) == pytest.approx(sum(pairs) / 12, abs=1e-12)
    within = [hand_cosine(real[i], real[j]) for i, j in itertools.permutations(range(4), 2)]
    assert ev.mean_cosine_within(real) == pytest.approx(sum(within) / 12, abs=1e-12)
    text = rng.normal(size=(3, 5)).tolist()
    assert ev.paired_cosine(gen, text) == pytest.approx(sum(hand_cosine(g, t) for g, t in zip(gen, text)) / 3, abs=1e-12)
    groups = ["a", "a", "b"]  # only prompt a has 2 images
    assert ev.diversity(gen, groups) == pytest.approx(1 - hand_cosine(gen[0], gen[1]), abs=1e-12)
    assert ev.strip_identifier("a photo of sks dog on sksx", "sks") == "a photo of dog on sksx"
    with pytest.raises(UserError, match="at least 2 images"):
        ev.mean_cosine_within(real[:1])


def test_recommend_balances_subject_and_prompt_fidelity():
    rows = [{"step": 100, "dino": 0.2, "clip_t": 0.30},   # underfit: follows prompts, not the subject
            {"step": 200, "dino": 0.5, "clip_t": 0.28},   # balanced
            {"step": 300, "dino": 0.6, "clip_t": 0.20}]   # overfit: copies the photos
    assert choosing.recommend(rows)["step"] == 200
    assert choosing.recommend([{"step": 1, "dino": 0.1}, {"step": 2, "dino": 0.3}])["step"] == 2
    # two checkpoints, each better at one thing: the smaller loss wins (0.947 vs 0.889)
    pair = [{"step": 1, "dino": 0.5, "clip_t": 0.27}, {"step": 2, "dino": 0.4, "clip_t": 0.30}]
    assert choosing.recommend(pair)["step"] == 1 and pair[0]["score"] == pytest.approx(2 * 0.9 / 1.9)


# --- tiny random evaluators, saved the way users keep them -------------------------------


@pytest.fixture(scope="module")
def evaluators(tmp_path_factory):
    import transformers
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("evaluators")
    torch.manual_seed(0)
    dino = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                        num_attention_heads=2, image_size=32, patch_size=8),
                                 add_pooling_layer=False)
    dino.save_pretrained(root / "dino")
    clip_config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        # gelu and 32/64 heads, as the loader reads a clip_vision file (OpenCLIP ViT-H/G: gelu, 16 heads)
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 1,
                       "image_size": 32, "patch_size": 8, "hidden_act": "gelu"},
        projection_dim=16)
    clip = transformers.CLIPModel(clip_config)
    clip.save_pretrained(root / "clip")
    vision_config = transformers.CLIPVisionConfig(**{**clip_config.vision_config.to_dict(), "projection_dim": 16})
    vision = transformers.CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    # a ComfyUI models/clip_vision file: transformers key names in one safetensors file
    save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, str(root / "clip_vision.safetensors"))
    return root


def write_images(folder: Path, colours, prompt: str | None = None) -> Path:
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(colours))
    for i, colour in enumerate(colours):
        pixels = (rng.random((48, 40, 3)) * 40).astype(np.uint8) + np.array(colour, np.uint8)
        info = PngInfo()
        if prompt:
            info.add_text("parameters", f"{prompt}\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: {i}, Size: 40x48")
        Image.fromarray(pixels).save(folder / f"{i}.png", pnginfo=info)
    return folder


def test_eval_runs_end_to_end_and_equals_the_formula(evaluators, tmp_path):
    gen = write_images(tmp_path / "gen", [(200, 10, 10), (190, 30, 20), (20, 20, 200)], "a sks dog on the beach")
    real = write_images(tmp_path / "real", [(210, 20, 10), (180, 20, 30)])
    dino = ev.load_evaluator(evaluators / "dino", "dino")
    clip = ev.load_evaluator(evaluators / "clip", "clip")
    generated = [(image, ev.image_prompt(path)) for path, image in ev.read_images(gen)]
    assert {p for _, p in generated} == {"a sks dog on the beach"}
    real_images = [image for _, image in ev.read_images(real)]
    scores = ev.evaluate(generated, real_images, dino, clip, identifier="sks", class_generated=real_images)
    # the same numbers straight from the models, written out
    with torch.no_grad():
        d_gen = dino.model(pixel_values=dino.pixels([g for g, _ in generated])).last_hidden_state[:, 0]
        d_real = dino.model(pixel_values=dino.pixels(real_images)).last_hidden_state[:, 0]
        c_gen = clip.model.visual_projection(clip.model.vision_model(pixel_values=clip.pixels([g for g, _ in generated])).pooler_output)
        c_real = clip.model.visual_projection(clip.model.vision_model(pixel_values=clip.pixels(real_images)).pooler_output)
        ids = clip.tokenizer(["a dog on the beach"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        c_text = clip.model.text_projection(clip.model.text_model(input_ids=ids).pooler_output)[0]
    expect_dino = np.mean([hand_cosine(a.tolist(), b.tolist()) for a in d_gen for b in d_real])
    expect_clip_i = np.mean([hand_cosine(a.tolist(), b.tolist()) for a in c_gen for b in c_real])
    expect_clip_t = np.mean([hand_cosine(a.tolist(), c_text.tolist()) for a in c_gen])
    assert scores.values["dino"] == pytest.approx(expect_dino, abs=1e-5)
    assert scores.values["clip_i"] == pytest.approx(expect_clip_i, abs=1e-5)
    assert scores.values["clip_t"] == pytest.approx(expect_clip_t, abs=1e-5)
    assert scores.values["pres"] == pytest.approx(ev.mean_pairwise_cosine(d_real, d_real), abs=1e-5)
    assert 0 <= scores.values["div"] <= 2 and "dino" in scores.real and "clip_i" in scores.real
    # a ComfyUI clip_vision file gives the same image embeddings as the folder's CLIP
    vision = ev.load_evaluator(evaluators / "clip_vision.safetensors", "clip")
    assert vision.kind == "clip_vision" and not vision.has_text
    assert torch.allclose(vision.image_features(real_images), c_real, atol=1e-5)


def test_eval_command_and_clear_errors(evaluators, tmp_path, capsys):
    from dreambooth_lora.cli import main

    gen = write_images(tmp_path / "gen", [(200, 10, 10), (20, 20, 200)], "a sks dog")
    real = write_images(tmp_path / "real", [(210, 20, 10), (180, 20, 30)])
    assert main(["eval", "--generated", str(gen), "--real", str(real), "--dino", str(evaluators / "dino"),
                 "--clip", str(evaluators / "clip"), "--identifier", "sks", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["scores"]) == {"dino", "clip_i", "clip_t", "div"}
    (gen / "broken.png").write_bytes(b"not a png")  # left out, and said so
    assert main(["eval", "--generated", str(gen), "--real", str(real), "--dino", str(evaluators / "dino")]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped" in err and "broken.png" in err
    assert main(["eval", "--generated", str(gen), "--real", str(real)]) == 2
    assert "no evaluator model: pass --dino" in capsys.readouterr().err
    assert main(["eval", "--generated", str(gen), "--real", str(real), "--dino", str(tmp_path / "nope")]) == 2
    assert "nope: no such evaluator model" in capsys.readouterr().err
    assert main(["eval", "--generated", str(gen), "--real", str(real), "--dino", str(evaluators / "clip")]) == 2
    assert "a clip model, not a DINO ViT" in capsys.readouterr().err


def test_best_scores_every_checkpoint_and_recommends_one(evaluators, tmp_path, capsys):
    from dreambooth_lora.cli import main
    from dreambooth_lora.fixtures.checkpoints import fixture_path
    from dreambooth_lora.trainer.job import TrainJob
    from dreambooth_lora.trainer.loop import train

    photos = write_images(tmp_path / "photos", [(200, 10, 10), (190, 30, 20), (210, 20, 30)])
    job = TrainJob(base=str(fixture_path("sd1-tiny")), output=str(tmp_path / "sks.safetensors"),
                   instance_dir=str(photos), options={"resolution": 64, "steps": 4, "save_every": 2, "rank": 4,
                                                      "alpha": 4, "prior_preservation": "off",
                                                      "learning_rate": 1e-3})
    result = train(job)
    capsys.readouterr()  # the training's own output
    assert main(["best", "--base", str(fixture_path("sd1-tiny")), "--state", str(result.state_dir), "--real",
                 str(photos), "--dino", str(evaluators / "dino"), "--clip", str(evaluators / "clip"),
                 "--prompts", "a {id} {class} on the beach|a {id} {class}", "--images-per-prompt", "1",
                 "--steps", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [row["step"] for row in printed["checkpoints"]] == [2, 4]
    assert all({"dino", "clip_i", "clip_t", "score"} <= set(row) for row in printed["checkpoints"])
    assert printed["recommended"]["step"] in (2, 4)
    assert printed["recommended"]["lora"].endswith("lora.safetensors")

"""The shapes world: the built-in base model, the judge, and DreamBooth's effects measured.

The thresholds below come from measured runs (numbers in each test's docstring and in
bench/RESULTS.md); every margin is stated where the threshold is.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from dreambooth_lora.shapes import core, world
from dreambooth_lora.shapes.judge import HEADS, Judge, check_judge


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


@pytest.fixture(scope="module")
def base():
    from dreambooth_lora.models.load import load_base_model

    return load_base_model(core.base_path(), dtype="fp32")


def test_world_is_seeded_and_captioned():
    first = world.subject_photos(world.SUBJECTS["candy"], 5, seed=3)
    again = world.subject_photos(world.SUBJECTS["candy"], 5, seed=3)
    assert first == again
    assert np.array_equal(world.render_many(first), world.render_many(again))
    assert not np.array_equal(world.render_many(first), world.render_many(world.subject_photos(world.SUBJECTS["candy"], 5, 4)))
    scene = world.Scene(world.Look("heart", "pink"), "brick", 30, 30, 15)
    assert scene.caption() == "a photo of a pink heart on a brick background"
    assert scene.caption(color=False, background=False) == "a photo of a heart"
    image = world.render(scene)
    assert image.size == (world.SIZE, world.SIZE) and image.mode == "RGB"
    # the object is drawn in its colour at its centre, the background texture around it
    assert np.abs(np.asarray(image)[30, 30].astype(int) - world.COLORS["pink"]).max() < 10
    # subjects are looks pretraining never shows: pretraining scenes are solid
    rng = random.Random(0)
    assert all(world.random_scene(rng).look.solid for _ in range(200))
    assert not any(s.look.solid for s in world.SUBJECTS.values())


def test_shipped_files_fit_the_budget_and_load_at_64_px(base):
    assert core.base_path().stat().st_size < 30e6
    info = base.info
    assert info.family == "sd1" and info.resolution == 64
    assert info.unet_config["sample_size"] == 16  # the VAE halves twice: 64 px → 16×16 latents
    record = json.loads(_metadata(core.base_path())["shapes.pretraining"])
    assert record["command"].startswith("python -m dreambooth_lora.shapes.pretrain") and not record.get("partial")


def test_vae_keeps_the_subjects_patterns(base):
    """The judge's look cosine between renders and their reconstructions (24 held-out photos per
    subject, 96 random patterned looks): the stripes, rims, dots and split squares survive."""
    from dreambooth_lora.shapes.pretrain_vae import reconstruction_fidelity

    fidelity = reconstruction_fidelity(base.vae)
    print("VAE fidelity:", fidelity)
    assert all(group["look_cosine"] > VAE_COSINE for group in fidelity.values()), fidelity
    assert all(group["mse"] < VAE_MSE for group in fidelity.values()), fidelity


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_judge_tells_looks_and_backgrounds_apart(judge):
    """On renders it never trained on (another seed): measured look retrieval 0.98 and
    background/shape/colour accuracy ≥ 0.99; asserted with margins of about 0.05."""
    scores = check_judge(judge, seed=99, count=300)
    assert scores["look_retrieval"] > 0.9, scores
    for name in HEADS:
        assert scores[f"{name}_accuracy"] > 0.93, scores


def test_base_follows_class_and_colour_prompts(base, judge):
    """Every class × colour once (48 prompts, a random background each): the judge must see
    the class and the colour asked for far above chance (1/6, 1/8)."""
    from dreambooth_lora.sampling.session import SamplingSession

    rate, _ = core.prompt_following(SamplingSession(base, core.base_path()), judge, guidance=4.0)
    print("base prompt following:", rate)
    assert rate["shape"] > SHAPE_RATE and rate["color"] > COLOR_RATE and rate["background"] > BACKGROUND_RATE, rate


def test_prior_preservation_keeps_the_class_and_its_diversity(tmp_path, base, judge):
    """The paper's claim in miniature, same subject, identifier, seed and steps, with and without
    prior preservation: the run with it through `dreambooth-lora demo` (which also writes the
    report), the run without it through the same training and measuring functions (the demo
    would only repeat the base model's row)."""
    from dreambooth_lora.sampling.session import SamplingSession
    from dreambooth_lora.shapes.options import DEMO_OPTIONS

    out = tmp_path / "class_images"
    result = subprocess.run([sys.executable, "-m", "dreambooth_lora.cli", "demo", "--out", str(out), "--json"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    demo = json.loads(result.stdout[result.stdout.index("{"):])
    assert (out / "report.html").is_file() and (out / "report.png").is_file()
    assert (out / "loras").is_dir() and list((out / "loras").glob("*.safetensors"))
    with_pp = demo["rows"]
    assert json.loads((out / "metrics.json").read_text())["options"]["prior_preservation"] == "class_images"

    options = DEMO_OPTIONS.values({"prior_preservation": "off"})
    subject, identifier = world.SUBJECTS[options["subject"]], demo["identifier"]
    run = core.train_subject(core.base_path(), subject, identifier, tmp_path / "off", options, None, "off")
    ref = core.reference(subject, judge, options["images_per_prompt"], options["seed"])
    session = SamplingSession(base, core.base_path())
    db_off = core.measure(session, subject, identifier, ref, judge, str(run.output),
                          images_per_prompt=options["images_per_prompt"], guidance=options["guidance"],
                          steps=options["sample_steps"], seed=options["seed"]).row()
    session.without_loras()  # the module's base model is shared

    base_row, real, db = with_pp["base model"], with_pp["real images"], with_pp["DreamBooth LoRA"]
    print(json.dumps({"with prior preservation": with_pp, "without: DreamBooth LoRA": db_off}, indent=1))
    assert db["SUBJ"] > base_row["SUBJ"] + SUBJ_GAIN, (db, base_row)
    assert db["PROMPT"] >= base_row["PROMPT"] - PROMPT_LOSS, (db, base_row)
    assert db["PRES"] < db_off["PRES"] - PRES_GAP, (db, db_off)
    assert db["DIV"] > db_off["DIV"] + DIV_GAP, (db, db_off)
    assert real["PRES"] == 0.0  # real class images never look like the subject


# Calibrated thresholds (see the docstrings above and bench/RESULTS.md).
# Measured on the shipped base (guidance 4, 20 DDIM steps): class 0.854, colour 1.000, background
# 0.417 (chance 0.17, 0.125, 0.14); class and colour asserted 0.15 under (7 images of 48), the
# background 0.14 under and twice chance.
SHAPE_RATE, COLOR_RATE, BACKGROUND_RATE = 0.7, 0.85, 0.28
# The VAE (24 photos per subject, 96 random looks): lowest look cosine 0.910 (domino; candy 0.971,
# tile 0.997, badge 0.983, random 0.974), highest MSE 0.0084 (candy); asserted 0.85 and 0.015.
VAE_COSINE, VAE_MSE = 0.85, 0.015
# Measured with the demo's defaults (badge, 600 steps, 24 images per measure; 165 s for this test):
# SUBJ 0.352 with prior preservation vs −0.006 for the base (+0.358, asserted +0.2); PROMPT 0.250
# vs the base's 0.208 (asserted: at most 0.09 below, a margin of 3 images); PRES 0.250 with vs
# 0.917 without (gap 0.667 = 16 of 24 images, asserted 0.4: 6 images of margin); DIV 0.695 with
# vs 0.330 without (gap 0.365, asserted 0.2).
SUBJ_GAIN, PROMPT_LOSS, PRES_GAP, DIV_GAP = 0.2, 0.09, 0.4, 0.2


def test_demo_names_a_bad_out_folder(tmp_path, capsys):
    from dreambooth_lora.cli import main

    target = tmp_path / "report.txt"
    target.write_text("not a folder")
    assert main(["demo", "--out", str(target)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {target}: is a file; give --out a folder (it is created if missing)."


def test_stock_comfyui_loader_cannot_detect_the_shapes_base(comfy):
    """Why the shapes_world workflow (and its note) loads with the pack's node: ComfyUI's own
    checkpoint loader, which CheckpointLoaderSimple calls, cannot place an SD1 this narrow."""
    import comfy.sd

    with pytest.raises(RuntimeError, match="Could not detect model type"):
        comfy.sd.load_checkpoint_guess_config(str(core.base_path()), output_vae=True, output_clip=True)

"""Class priors: generated once per model and prompt, reused, completed, never mixed up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_lora.cli import main
from dreambooth_lora.errors import UserError
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.priors import core as priors
from dreambooth_lora.runtime.files import fingerprint

FAST = dict(steps=3, resolution=64, prompt="a photo of a dog")


@pytest.fixture(scope="module")
def sd1(tiny):
    return load_base_model(tiny["sd1-tiny"]), str(tiny["sd1-tiny"])


def test_second_call_generates_only_the_missing_images(sd1, tmp_path):
    base, path = sd1
    first = priors.generate_priors(base, path, tmp_path, 16, **FAST)
    assert (first.generated, first.reused) == (16, 0)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.paths}
    second = priors.generate_priors(base, path, tmp_path, 24, **FAST)
    assert (second.generated, second.reused) == (8, 16)
    assert second.folder == first.folder and len(second.paths) == 24 and all(p.exists() for p in second.paths)
    for p in second.paths[:16]:  # the cached ones were not touched
        assert (p.read_bytes(), p.stat().st_mtime_ns) == before[p.name]
    manifest = json.loads((second.folder / "manifest.json").read_text())
    assert len(manifest["images"]) == 24 and manifest["images"]["class_00023.png"] == {"seed": 23}
    assert manifest["settings"]["prompt"] == "a photo of a dog" and manifest["settings"]["steps"] == 3
    third = priors.generate_priors(base, path, tmp_path, 10, **FAST)  # fewer: nothing to do
    assert (third.generated, third.reused, len(third.paths)) == (0, 10, 10)


def test_other_prompt_or_model_gets_its_own_entry(sd1, tiny, tmp_path):
    base, path = sd1
    dog = priors.generate_priors(base, path, tmp_path, 2, **FAST)
    cat = priors.generate_priors(base, path, tmp_path, 2, **{**FAST, "prompt": "a photo of a cat"})
    other = load_base_model(tiny["sd2-tiny"])
    dog_sd2 = priors.generate_priors(other, str(tiny["sd2-tiny"]), tmp_path, 2, **FAST)
    assert len({dog.folder, cat.folder, dog_sd2.folder}) == 3
    assert dog_sd2.generated == 2 and cat.generated == 2
    assert fingerprint(path) != fingerprint(tiny["sd2-tiny"])


def test_image_i_is_reproducible_from_its_seed_and_recreates_bit_for_bit(sd1, tmp_path):
    base, path = sd1
    result = priors.generate_priors(base, path, tmp_path / "cache", 4, **FAST)
    original = result.paths[2].read_bytes()
    result.paths[2].unlink()
    again = priors.generate_priors(base, path, tmp_path / "cache", 4, **FAST)
    assert again.generated == 1 and again.paths[2].read_bytes() == original  # each image is made alone
    text = Image.open(again.paths[2]).text["parameters"]
    assert text.startswith("a photo of a dog\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 2, Size: 64x64, "
                           f"Model hash: {fingerprint(path)[:12]}, Model: {Path(path).stem}")
    # the sampler re-makes a class image from its PNG alone, byte for byte
    assert main(["sample", "--base", path, "--recreate", str(again.paths[2]), "--out", str(tmp_path / "again")]) == 0
    remade = tmp_path / "again" / "000002.png"
    assert np.array_equal(np.asarray(Image.open(remade)), np.asarray(Image.open(again.paths[2])))
    assert Image.open(remade).text["parameters"] == text


def test_cancel_keeps_finished_images(sd1, tmp_path):
    base, path = sd1
    calls = []

    def stop_during_the_ninth_image():
        calls.append(1)
        # per image: one check before it, one before its loop, one at each of its 3 steps
        return len(calls) > 8 * 5 + 2

    with pytest.raises(KeyboardInterrupt):  # errors.Cancelled is one
        priors.generate_priors(base, path, tmp_path, 20, **FAST, should_stop=stop_during_the_ninth_image)
    folder = next(tmp_path.iterdir())
    finished = sorted(p.name for p in folder.glob("class_*.png"))
    assert finished == [f"class_{i:05d}.png" for i in range(8)]
    assert not list(folder.glob("*.tmp"))  # no half-written file
    assert sorted(p.name for p in folder.glob(".*")) == [".lock"]  # the lock is free: its owner file is gone
    assert len(json.loads((folder / "manifest.json").read_text())["images"]) == 8
    resumed = priors.generate_priors(base, path, tmp_path, 20, **FAST)
    assert (resumed.generated, resumed.reused) == (12, 8)


def test_an_edited_entry_is_refused(sd1, tmp_path):
    base, path = sd1
    result = priors.generate_priors(base, path, tmp_path, 1, **FAST)
    manifest = json.loads((result.folder / "manifest.json").read_text())
    manifest["settings"]["prompt"] = "a photo of a cat"
    (result.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="holds class images made with other settings"):
        priors.generate_priors(base, path, tmp_path, 2, **FAST)


def test_sdxl_priors(tiny, tmp_path):
    base = load_base_model(tiny["sdxl-tiny"])
    result = priors.generate_priors(base, str(tiny["sdxl-tiny"]), tmp_path, 3, negative_prompt="blurry", **FAST)
    assert result.generated == 3 and Image.open(result.paths[0]).size == (64, 64)


def test_user_supplied_class_images(tmp_path):
    Image.new("RGB", (80, 80), (1, 2, 3)).save(tmp_path / "real.jpg")
    (tmp_path / "broken.png").write_text("nope")
    assert priors.user_class_images(tmp_path, 64) == [tmp_path / "real.jpg"]


def test_priors_command(tiny, tmp_path, capsys):
    args = ["priors", "--base", str(tiny["sd1-tiny"]), "--out", str(tmp_path), "--class-prompt", "a photo of a dog",
            "--resolution", "64", "--steps", "2"]
    assert main(args + ["--num", "3"]) == 0
    assert "3 class images (0 reused, 3 generated" in capsys.readouterr().out
    assert main(args + ["--num-class-images", "5"]) == 0
    assert "5 class images (3 reused, 2 generated" in capsys.readouterr().out

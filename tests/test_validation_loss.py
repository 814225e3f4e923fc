"""The validation loss: measured every N steps at fixed timesteps and noise, logged, plotted,
recorded in each checkpoint, identical across a stop and resume, and the criterion of
`best --by validation_loss`; held-out photos are never trained on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from dreambooth_lora.errors import UserError
from dreambooth_lora.trainer.checkpoint import list_checkpoints, read_record
from dreambooth_lora.trainer.job import TrainingStopped
from dreambooth_lora.trainer.loop import train
from dreambooth_lora.trainer.validation import split_holdout

from test_trainer import tiny_job

CLI = [sys.executable, "-m", "dreambooth_lora.cli"]


def measured(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss_validation"] for r in rows if "loss_validation" in r}


def test_validation_loss_is_logged_recorded_plotted_and_chooses_the_best(tmp_path, capsys):
    result = train(tiny_job(tmp_path, "val", steps=9, validation_loss_every=3, save_every=3, keep_checkpoints=0))
    out = capsys.readouterr().out
    assert "validation loss: every 3 steps on the 4 training photos at fixed timesteps and noise" in out
    values = measured(result.log)
    assert sorted(values) == [3, 6, 9] and all(v > 0 for v in values.values())
    assert len(set(values.values())) == 3, "the adapter changed, so the loss on the same examples changed"
    records = {int(c.name[5:]): read_record(c).get("validation_loss") for c in list_checkpoints(result.state_dir)}
    assert records == values
    log = [json.loads(line) for line in (result.state_dir / "log.jsonl").read_text().splitlines()]
    assert measured(log) == values
    plot = Image.open(result.state_dir / "loss.png").convert("RGB")
    assert (20, 150, 60) in {plot.getpixel((x, y)) for x in range(0, 800, 2) for y in range(0, 400, 2)}, \
        "the validation loss is drawn (green)"

    shown = subprocess.run(CLI + ["best", "--state", str(result.state_dir), "--json"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    answer = json.loads(shown.stdout)
    lowest = min(values, key=values.get)
    assert answer["by"] == "validation_loss" and answer["recommended"]["step"] == lowest
    assert [row["validation_loss"] for row in answer["checkpoints"]] == [values[s] for s in (3, 6, 9)]
    table = subprocess.run(CLI + ["best", "--state", str(result.state_dir)], capture_output=True, text=True)
    assert f"recommended: step {lowest} (lowest validation loss)" in table.stdout
    refused = subprocess.run(CLI + ["best", "--state", str(result.state_dir), "--by", "metrics"],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "--by metrics needs --base and --real" in refused.stderr


def test_validation_loss_is_identical_across_a_stop_and_resume(tmp_path):
    options = {"steps": 8, "validation_loss_every": 2, "save_every": 0, "train_text_encoder": True,
               "text_encoder_steps": 5}  # the text side stops training between two measurements
    reference = measured(train(tiny_job(tmp_path / "ref", "ref", **options)).log)
    assert sorted(reference) == [2, 4, 6, 8]
    job = tiny_job(tmp_path / "cut", "cut", **options)
    calls = []
    with pytest.raises(TrainingStopped):
        train(job, should_stop=lambda: calls.append(1) or len(calls) == 3)  # stops after step 3
    job.resume = str(tmp_path / "cut" / "cut.state")
    resumed = measured(train(job).log)
    assert resumed == reference, "bit for bit: the same examples, the same restored adapter"


def test_held_out_photos_are_never_trained_on(tmp_path, capsys):
    result = train(tiny_job(tmp_path, "held", steps=2, validation_loss_every=1, validation_holdout=1))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("validation loss:"))
    assert "on 1 held-out photo(s) (photo_" in line and "training on the other 3" in line
    assert sorted(measured(result.log)) == [1, 2]

    from dreambooth_lora.data.core import load_folder
    from dreambooth_lora.trainer.job import resolve_settings

    photos = load_folder(tmp_path / "photos", "x", resolution=64)
    settings = resolve_settings({"validation_holdout": 1, "validation_loss_every": 5, "seed": 7})
    kept, held = split_holdout(photos, settings, lambda _: None)
    assert len(kept.images) == 3 and len(held.images) == 1
    assert held.images[0].source not in {item.source for item in kept.images}
    assert f"({held.images[0].source.rsplit('/', 1)[-1]})" in line, "the seed chooses the same photo every time"
    with pytest.raises(UserError, match="validation_holdout: holding out 3 of 4 photos leaves 1 to train on"):
        split_holdout(photos, resolve_settings({"validation_holdout": 3}), lambda _: None)
    with pytest.raises(UserError, match="validation_loss_every is 0"):
        split_holdout(photos, resolve_settings({"validation_holdout": 1, "validation_loss_every": 0}), lambda _: None)
    assert split_holdout(photos, resolve_settings({"validation_loss_every": 0}), lambda _: None)[1] is None

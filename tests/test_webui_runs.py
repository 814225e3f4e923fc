"""Real training runs through the extension's API in the stand-in webui: the `dreambooth-lora`
CLI in a child process (this venv's Python as the training interpreter), polled to the end; the
LoRA lands in the --lora-dir folder with the metadata A1111 lists it by; Cancel keeps a checkpoint
and Resume continues from it to the same number of steps."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from dreambooth_lora.fixtures.checkpoints import fixture_path
from webui_standin.harness import webui

TINY = {"resolution": 64, "rank": 4, "alpha": 4, "learning_rate": 1e-3, "seed": 3, "save_every": 0,
        "prior_preservation": "base_model"}  # the frozen model as the prior: no class images to make


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        image = Image.new("RGB", (80, 72), (30, 60 + 40 * i, 90))
        image.paste((220, 40, 30), (16 + 4 * i, 16, 56 + 4 * i, 56))
        image.save(folder / f"photo_{i}.png")
    return folder


def poll(app, run_id: str, until=lambda s: s["status"] not in ("running", "stopping"), timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while True:
        status, run = app.call("GET", f"/dreambooth-lora/runs/{run_id}")
        assert status == 200
        if until(run):
            return run
        assert time.time() < deadline, run
        time.sleep(0.5)


def test_api_trains_a_lora_into_the_webuis_lora_folder(tmp_path, photos, monkeypatch):
    monkeypatch.setenv("DBLORA_TRAIN_PYTHON", sys.executable)
    refreshed = []
    networks = types.SimpleNamespace(list_available_networks=lambda: refreshed.append(1))  # the Lora extension's
    monkeypatch.setitem(sys.modules, "networks", networks)
    lora_dir = tmp_path / "elsewhere" / "Lora"  # --lora-dir outside the data folder
    with webui(tmp_path / "data", {"tiny.safetensors": fixture_path("sd1-tiny")}, lora_dir=lora_dir) as host:
        app = host.app()
        options = dict(TINY, steps=4, new_tokens=1, validation_prompts="a photo of {id} {class}", validation_every=2,
                       validation_steps=2)
        status, run = app.call("POST", "/dreambooth-lora/train",
                               {"name": "sks_dog", "instance_dir": str(photos), "options": options})
        assert status == 200 and run["status"] == "running", run
        seen_steps = set()
        done = poll(app, run["id"], until=lambda s: seen_steps.add(s["progress"]["step"]) or
                    s["status"] not in ("running", "stopping"))
        assert done["status"] == "done", done["console"]
        assert done["progress"]["step"] == done["progress"]["total"] == 4
        assert [row["step"] for row in done["history"]] == [1, 2, 3, 4]
        assert Path(done["progress"]["loss_plot"]).is_file() and len(done["progress"]["previews"]) == 2
        lora = lora_dir / "sks_dog.safetensors"
        assert sorted(done["published"]) == sorted(str(p) for p in (
            lora, lora_dir / "sks_dog.preview.png", lora_dir / "sks_dog.json",
            host.data / "embeddings" / "sks_dog_emb.safetensors"))
        with safe_open(str(lora), "pt") as f:
            meta = f.metadata()
        # what A1111 lists a LoRA by: the alias and the base it belongs to (SD1: no sdxl_/v2 marks)
        assert meta["ss_output_name"] == "sks_dog" and meta["ss_base_model_version"] == "sd_v1"
        assert meta["ss_v2"] == "False" and meta["ss_max_train_steps"] == "4"
        assert not any(p.suffix == ".safetensors" and p.name != "sks_dog.safetensors" for p in lora_dir.rglob("*")), \
            "the state folder (checkpoints, optimizer) stays out of the LoRA folder"
        deadline = time.time() + 30  # the child writes its result, then exits; the refresh follows the exit
        while not refreshed and time.time() < deadline:
            time.sleep(0.2)
        assert refreshed, "the webui's LoRA list is refreshed when a LoRA is published"
        assert app.call("GET", "/dreambooth-lora/runs")[1]["runs"][0]["status"] == "done"
        # the same name again needs overwrite
        status, body = app.call("POST", "/dreambooth-lora/train", {"name": "sks_dog", "instance_dir": str(photos)})
        assert status == 422 and body["detail"].startswith("name:")


def test_cancel_keeps_a_checkpoint_and_resume_continues(tmp_path, photos, monkeypatch):
    monkeypatch.setenv("DBLORA_TRAIN_PYTHON", sys.executable)
    with webui(tmp_path / "data", {"tiny.safetensors": fixture_path("sd1-tiny")}) as host:
        app = host.app()
        # long enough that the Cancel sent after step 2 lands well before the end on any machine
        # (a tiny step takes milliseconds; 12 steps could all be done before the request arrived)
        steps = 200
        status, run = app.call("POST", "/dreambooth-lora/train",
                               {"name": "stop_me", "instance_dir": str(photos), "options": dict(TINY, steps=steps)})
        assert status == 200, run
        poll(app, run["id"], until=lambda s: s["progress"]["step"] >= 2 or s["status"] != "running")
        status, stopping = app.call("POST", f"/dreambooth-lora/runs/{run['id']}/cancel")
        assert status == 200 and stopping["status"] in ("stopping", "cancelled"), stopping
        stopped = poll(app, run["id"])
        assert stopped["status"] == "cancelled" and stopped["resumable"], stopped["console"]
        checkpoints = sorted(Path(stopped["state_dir"]).glob("step-*"))
        assert len(checkpoints) == 1 and 2 <= int(checkpoints[0].name[5:]) < steps
        assert not (host.lora_dir / "stop_me.safetensors").exists(), "a stopped run publishes nothing"
        # a second run of the same name is refused while its state waits to be resumed
        status, body = app.call("POST", "/dreambooth-lora/train", {"name": "stop_me", "instance_dir": str(photos)})
        assert status == 422 and "resume that run" in body["detail"]

        status, resumed = app.call("POST", f"/dreambooth-lora/runs/{run['id']}/resume")
        assert status == 200, resumed
        done = poll(app, resumed["id"])
        assert done["status"] == "done", done["console"]
        assert f"resumed from {checkpoints[0]}" in done["console"]
        assert [row["step"] for row in done["history"]] == list(range(1, steps + 1))
        assert (host.lora_dir / "stop_me.safetensors").is_file()


def test_a_second_cancel_quits_while_class_images_are_made(tmp_path, photos, monkeypatch):
    """A stop waits for the step to end, and a training run making its class images has no step
    yet: the second Cancel is the CLI's second Ctrl-C and ends it at once."""
    monkeypatch.setenv("DBLORA_TRAIN_PYTHON", sys.executable)
    with webui(tmp_path / "data", {"tiny.safetensors": fixture_path("sd1-tiny")}) as host:
        app = host.app()
        options = dict(TINY, steps=5, prior_preservation="class_images", num_class_images=200)
        status, run = app.call("POST", "/dreambooth-lora/train",
                               {"name": "priors_first", "instance_dir": str(photos), "options": options})
        assert status == 200, run
        poll(app, run["id"], until=lambda s: s["progress"]["phase"].startswith("class images") or
             s["status"] != "running")
        assert app.call("POST", f"/dreambooth-lora/runs/{run['id']}/cancel")[1]["status"] == "stopping"
        time.sleep(2)
        assert app.call("GET", f"/dreambooth-lora/runs/{run['id']}")[1]["status"] == "stopping"
        asked = time.time()
        app.call("POST", f"/dreambooth-lora/runs/{run['id']}/cancel", {"now": True})
        stopped = poll(app, run["id"], timeout=60)
        assert stopped["status"] == "cancelled" and not stopped["resumable"] and stopped["published"] == []
        assert time.time() - asked < 30

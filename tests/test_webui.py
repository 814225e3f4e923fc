"""The repository as an AUTOMATIC1111 / Forge extension, against a stand-in of the webui
(tests/webui_standin: A1111 v1.10.1's ``modules`` surface, gradio 3.41.2's constructors, FastAPI
routes): the script loads light, the tab is made from the option definitions, its values become
the CLI's flags, requests are checked field by field, progress is read from the CLI's files.

Why a stand-in gradio rather than the real 3.41.2: installing it into this venv would downgrade
numpy 2.4 → 1.26.4 and Pillow 13 → 10.4 and bring fastapi/starlette versions gradio 3.41 was never
built for (`pip install --dry-run gradio==3.41.2`): it does not install cleanly beside our stack.
The real gradio runs in tests/test_webui_real.py, inside the real webui.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_lora.cli import build_parser
from dreambooth_lora.fixtures.checkpoints import fixture_path
from dreambooth_lora.identifiers.options import IDENTIFIER_OPTIONS
from dreambooth_lora.sampling.options import SAMPLE_OPTIONS
from dreambooth_lora.webui import jobs
from dreambooth_lora.webui.progress import read_progress
from dreambooth_lora.webui.widgets import cli_args, is_slider, label_of, parse_values
from webui_standin.harness import ROOT, STANDIN, webui

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "PIL")


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (72, 64), (40 * i, 120, 200)).save(folder / f"photo_{i}.png")
    return folder


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    monkeypatch.setenv("DBLORA_TRAIN_PYTHON", sys.executable)
    with webui(tmp_path / "webui-data", {"tiny.safetensors": fixture_path("sd1-tiny")}) as host:
        yield host


def components(tab):
    return {block.elem_id: block for block in tab.blocks if block.elem_id}


def test_script_loads_light_and_registers_the_tab_and_the_api(tmp_path):
    """As A1111 executes scripts/*.py (by path, the extension folder first on sys.path): nothing
    heavy is imported, by the script or by building the tab, and two callbacks are registered."""
    code = f"""
import importlib.util, json, sys, time
sys.path.insert(0, {str(STANDIN)!r})
from modules import script_callbacks, sd_models, shared
shared.configure({str(tmp_path)!r}); sd_models.list_models()
start = time.perf_counter()
sys.path.insert(0, {str(ROOT)!r})
spec = importlib.util.spec_from_file_location("dreambooth_lora.py", {str(ROOT / 'scripts' / 'dreambooth_lora.py')!r})
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
seconds = time.perf_counter() - start
sys.path.pop(0)
loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
tabs = script_callbacks.ui_tabs_callback()
after_tab = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"seconds": seconds, "heavy": loaded, "heavy_after_tab": after_tab, "errors": script_callbacks.errors,
    "tabs": [t[1:] for t in tabs], "callbacks": {{k: len(v) for k, v in script_callbacks.callback_map.items()}}}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=tmp_path).stdout)
    assert out["heavy"] == [] and out["heavy_after_tab"] == [] and out["errors"] == []
    assert out["tabs"] == [["DreamBooth LoRA", "dreambooth_lora"]]
    assert out["callbacks"]["callbacks_ui_tabs"] == 1 and out["callbacks"]["callbacks_app_started"] == 1
    assert out["seconds"] < 1.0


def test_a_broken_load_leaves_the_webui_running(tmp_path):
    """If the package cannot load, the script says so and registers nothing; the webui goes on."""
    code = f"""
import importlib.util, sys
sys.path.insert(0, {str(STANDIN)!r})
other = type(sys)("dreambooth_lora"); other.__file__ = "/elsewhere/__init__.py"
sys.modules["dreambooth_lora"] = other
from modules import script_callbacks
spec = importlib.util.spec_from_file_location("dreambooth_lora.py", {str(ROOT / 'scripts' / 'dreambooth_lora.py')!r})
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
print(len(script_callbacks.callback_map["callbacks_ui_tabs"]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0"
    assert "dreambooth-lora: the DreamBooth LoRA tab is disabled: another dreambooth_lora" in result.stderr


def test_tab_widgets_come_from_the_option_definitions(stand_in):
    (tab, title, elem_id), = stand_in.tabs()
    assert (title, elem_id) == ("DreamBooth LoRA", "dreambooth_lora")
    ids = [block.elem_id for block in tab.blocks if block.elem_id]
    assert len(ids) == len(set(ids)), "A1111 keys saved UI values by element: ids must be unique"
    by_id = components(tab)
    expected = [("", o) for o in jobs.TRAIN_OPTIONS] + \
        [("identifiers_", o) for o in IDENTIFIER_OPTIONS if o.name != "class_word"] + \
        [("sample_", o) for o in SAMPLE_OPTIONS]
    for prefix, option in expected:
        block = by_id[f"dblora_{prefix}{option.name}"]
        assert block.params["info"] == option.help and block.params["label"] == label_of(option)
        if option.choices:
            assert block.kind == "Dropdown" and block.params["choices"] == [str(c) for c in option.choices]
            assert block.params["value"] == str(option.node_start)
        elif option.value_type is bool:
            assert block.kind == "Checkbox" and block.params["value"] is option.node_start
        elif is_slider(option):
            assert block.kind == "Slider" and block.params["value"] == option.node_start
            assert (block.params["minimum"], block.params["maximum"]) == (option.min, option.max)
        elif option.value_type in (int, float):
            assert block.kind == "Number" and block.params["value"] == option.node_start
            assert block.params["precision"] == (0 if option.value_type is int else None)
        else:
            assert block.kind == "Textbox" and block.params["value"] == (option.node_start or "")
    # the base is the webui's selected checkpoint; a rank is a slider, the step count a number box
    assert by_id["dblora_checkpoint"].params["value"] == "tiny.safetensors"
    assert by_id["dblora_rank"].kind == "Slider" and by_id["dblora_steps"].kind == "Number"
    buttons = [b for b in tab.blocks if b.kind == "Button"]
    assert {d.trigger for d in tab.dependencies if d.event == "click"} == set(buttons)


def test_train_button_says_what_is_missing(stand_in):
    (tab, _, _), = stand_in.tabs()
    by_id = components(tab)
    click, = [d for d in tab.dependencies if d.trigger is by_id["dblora_train"]]
    values = [block.value for block in click.inputs]
    first = next(iter(click.fn(*values)))
    assert list(first.values()) == ["**Not started:** name: missing; it is required."]


def test_widget_values_become_the_clis_own_flags():
    """Default widget values (as gradio hands them back: numbers as floats) → parse_values →
    cli_args → the real `dreambooth-lora train` parser gives back the same values."""
    given = {o.name: float(o.node_start) if o.value_type is int else o.node_start for o in jobs.TRAIN_OPTIONS}
    given.update(validation_prompts="-negative first | a photo of {id} {class}", rank=8.0, train_text_encoder=True)
    values = parse_values(jobs.TRAIN_OPTIONS, given)
    args = build_parser().parse_args(["train", "--base", "b", "--instance-dir", "i", "--output", "o.safetensors",
                                      *cli_args(jobs.TRAIN_OPTIONS, values)])
    for option in jobs.TRAIN_OPTIONS:
        assert getattr(args, option.name) == values[option.name], option.name
    assert args.rank == 8 and args.train_text_encoder is True
    assert args.validation_prompts.startswith("-negative")


@pytest.mark.parametrize("change, message", [
    ({"name": "../escape"}, "name: '../escape' is not a plain LoRA name"),
    ({"name": "a:b"}, "name: 'a:b' is not a plain LoRA name"),
    ({"name": None}, "name: missing; it is required."),
    ({"instance_dir": None}, "instance_dir: missing; it is required."),
    ({"instance_dir": "/no/such/folder"}, "instance_dir: '/no/such/folder' is not a folder."),
    ({"checkpoint": "nothing-like-it.safetensors"}, "checkpoint: 'nothing-like-it.safetensors' is not one of"),
    ({"options": {"rank": 0}}, "options.rank: 0 is below the minimum 1."),
    ({"options": {"adapter": "lycoris"}}, "options.adapter: 'lycoris' is not one of lora, dora, loha, lokr."),
    ({"options": {"bogus": 1}}, "options.bogus: not a training option"),
    ({"options": [1]}, "options: must be an object"),
    ({"colour": "red"}, "colour: not a field of a training request"),
    ({"overwrite": "yes"}, "overwrite: 'yes' is not true or false."),
])
def test_training_requests_are_checked_field_by_field(stand_in, photos, change, message):
    request = {"name": "sks_dog", "instance_dir": str(photos), "options": {"steps": 5}, **change}
    status, body = stand_in.app().call("POST", "/dreambooth-lora/train", request)
    assert status == 422 and body["detail"].startswith(message), body


def test_requests_never_overwrite_or_escape_unasked(stand_in, photos, tmp_path):
    app = stand_in.app()
    stand_in.lora_dir.mkdir(parents=True, exist_ok=True)
    (stand_in.lora_dir / "taken.safetensors").write_bytes(b"x")
    status, body = app.call("POST", "/dreambooth-lora/train", {"name": "taken", "instance_dir": str(photos)})
    assert status == 422 and body["detail"] == (f"name: {stand_in.lora_dir / 'taken.safetensors'} exists; choose "
                                                "another name or set overwrite.")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    status, body = app.call("POST", "/dreambooth-lora/train", {"name": "x", "instance_dir": str(empty)})
    assert status == 422 and body["detail"].startswith("instance_dir:") and "has no images" in body["detail"]
    assert app.call("GET", "/dreambooth-lora/runs/20260101-000000-abcdef")[0] == 404
    assert app.call("GET", "/dreambooth-lora/runs/..")[0] == 404
    assert app.call("POST", "/dreambooth-lora/runs/nope/cancel")[0] == 404
    assert app.call("GET", "/dreambooth-lora/runs") == (200, {"runs": []})


def test_without_a_training_environment_nothing_starts(tmp_path, monkeypatch, photos):
    monkeypatch.delenv("DBLORA_TRAIN_PYTHON", raising=False)
    monkeypatch.setenv("DBLORA_TRAIN_VENV", str(tmp_path / "no-venv-here"))
    with webui(tmp_path / "data", {"tiny.safetensors": fixture_path("sd1-tiny")}) as host:
        app = host.app()
        assert app.call("GET", "/dreambooth-lora/environment")[1]["ready"] is False
        status, body = app.call("POST", "/dreambooth-lora/train", {"name": "a", "instance_dir": str(photos)})
        assert status == 409 and body["detail"].startswith("the training environment is not set up yet")


def test_routes_ask_for_the_webuis_api_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("DBLORA_TRAIN_PYTHON", sys.executable)
    with webui(tmp_path / "data", {}, api_auth="alice:secret") as host:
        app = host.app()
        assert app.call("GET", "/dreambooth-lora/runs")[0] == 401
        wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:guess").decode()}
        assert app.call("GET", "/dreambooth-lora/runs", headers=wrong)[0] == 401
        right = {"Authorization": "Basic " + base64.b64encode(b"alice:secret").decode()}
        assert app.call("GET", "/dreambooth-lora/runs", headers=right) == (200, {"runs": []})


def test_progress_comes_from_the_clis_bar_and_state_folder(tmp_path):
    console = tmp_path / "console.log"
    console.write_text(
        "class images (0 cached):  50%|#####     | 1/2 [00:03<00:03,  3.1s/img]\r"
        "class images (0 cached): 100%|##########| 2/2 [00:06<00:00,  3.0s/img]\n"
        "training:  20%|##        | 2/10 [00:04<00:16,  2.0s/step, inst=0.5, loss=0.9, lr=1.00e-04, prior=0.4]\r"
        "training:  30%|###       | 3/10 [00:06<00:14,  2.0s/step, inst=0.45, loss=0.85, lr=1.00e-04, prior=-]\r")
    state = tmp_path / "run.state"
    (state / "samples").mkdir(parents=True)
    (state / "samples" / "step-000002.png").write_bytes(b"png")
    rows = [{"step": s, "loss": 1.0, "loss_instance": 0.6, "loss_prior": 0.4, "lr": 1e-4} for s in (1, 2)]
    (state / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    progress = read_progress(console, state)
    assert (progress.phase, progress.step, progress.total, progress.eta) == ("training", 3, 10, "00:14")
    assert progress.losses == {"loss_instance": 0.45, "loss": 0.85, "lr": 1e-4, "loss_prior": None}
    assert [r["step"] for r in progress.history] == [1, 2]
    assert progress.previews == [str(state / "samples" / "step-000002.png")]
    # a checkpoint newer than the bar (the bar is throttled) wins
    (state / "log.jsonl").write_text(json.dumps({"step": 4, "loss": 0.7, "loss_instance": 0.4, "loss_prior": 0.3,
                                                 "lr": 1e-4}) + "\n")
    progress = read_progress(console, state)
    assert progress.step == 4 and progress.losses["loss"] == 0.7

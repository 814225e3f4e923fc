"""End-to-end: the pack inside a real ComfyUI server, driven over HTTP.

The other tests import ComfyUI in-process; this one does what a user does: clone the pack
into ``custom_nodes/``, start ``main.py``, and talk to the server's REST API. It proves that
ComfyUI finds and imports the pack (quickly), publishes the node's schema, runs the node,
and how a bad input is turned away.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO_ROOT, require_comfyui

PACK_NAME = "ComfyUI-DreamBooth-LoRA"  # the folder name a `git clone` by ComfyUI-Manager gives
NODE_ID = "DBLoRA_InspectCheckpoint"
CHECKPOINT = "tiny-sd1.safetensors"
FULL_CHECKPOINT = "sd15-full.safetensors"  # ComfyUI's own loader detects only real architectures
STARTUP_TIMEOUT_S = 120
PROMPT_TIMEOUT_S = 60

# A line of the log mentioning our pack: its folder name, or a file of the repository itself
# (if the pack were imported through the pip-installed package, tracebacks would show the real
# path). ComfyUI lives in REPO_ROOT/.venv, so that prefix alone does not count.
OUR_PACK = re.compile(re.escape(PACK_NAME) + "|" + re.escape(str(REPO_ROOT)) + r"/(?!\.venv/)")


@dataclass
class Server:
    url: str
    log_path: Path
    startup_s: float
    base: Path  # ComfyUI's --base-directory: models/, input/, output/

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _post(url: str, payload: dict, timeout: float = 10) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def _running_server(base: Path, log_path: Path, extra_env: dict | None = None) -> Iterator[Server]:
    """ComfyUI's main.py over ``base`` (its --base-directory) on a free loopback port, until the block ends."""
    comfyui = require_comfyui()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})})
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode} before answering:\n"
                            f"{_tail(log_path)}")
            try:
                _get(f"{url}/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - started > STARTUP_TIMEOUT_S:
                pytest.fail(f"ComfyUI did not answer /system_stats within {STARTUP_TIMEOUT_S} s:\n"
                            f"{_tail(log_path)}")
            time.sleep(0.25)
        startup_s = time.perf_counter() - started
        print(f"\nComfyUI server answered after {startup_s:.1f} s (log: {log_path})")
        yield Server(url, log_path, startup_s, base)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _comfyui_base(base: Path) -> Path:
    """A ComfyUI base directory with the pack in custom_nodes/, test checkpoints and subject photos."""
    from dreambooth_lora.fixtures.checkpoints import fixture_path

    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(fixture_path("sd1-tiny"), base / "models" / "checkpoints" / CHECKPOINT)
    (base / "models" / "checkpoints" / FULL_CHECKPOINT).symlink_to(fixture_path("sd15-full"))
    _subject_photos(base / "input" / "my_subject")
    return base


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifacts) -> Iterator[Server]:
    base = _comfyui_base(tmp_path_factory.mktemp("comfyui-base"))
    with _running_server(base, artifacts / "comfyui-server.log") as running:
        yield running


def _subject_photos(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = (rng.random((72, 80, 3)) * 60).astype(np.uint8)
        pixels[16:56, 16 + 4 * i:56 + 4 * i] = (220, 40, 30)
        Image.fromarray(pixels).save(folder / f"photo_{i}.png")
    shutil.copyfile(folder / "photo_0.png", folder.parent / "my_subject.png")


def _traceback_blocks(lines: list[str]) -> list[str]:
    """Each 'Traceback ...' through its exception line (the first unindented line after it)."""
    blocks = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = i + 1
            while end < len(lines) and (lines[end].startswith(" ") or not lines[end].strip()):
                end += 1
            blocks.append("\n".join(lines[i:end + 1]))
    return blocks


def test_pack_imports_without_errors(server):
    lines = server.log().splitlines()
    markers = ("Cannot import", "IMPORT FAILED", "Error while calling comfy_entrypoint")
    failures = [line for line in lines if any(m in line for m in markers) and OUR_PACK.search(line)]
    failures += [block for block in _traceback_blocks(lines) if OUR_PACK.search(block)]
    # ComfyUI skips (without importing) a pack that has neither NODE_CLASS_MAPPINGS nor comfy_entrypoint.
    failures += [line for line in lines if "Skip" in line and PACK_NAME in line]
    assert not failures, "ComfyUI failed to load the pack:\n" + "\n".join(failures)


def test_pack_import_time(server):
    # nodes.init_external_custom_nodes logs a header, then per pack
    # "{:6.1f} seconds{ (IMPORT FAILED)}: {module_path}", sorted by time.
    log = server.log()
    assert "Import times for custom nodes:" in log, f"no import-time summary:\n{_tail(server.log_path)}"
    summary = log.split("Import times for custom nodes:", 1)[1]
    ours = re.findall(r"^\s*(\d+\.\d+) seconds( \(IMPORT FAILED\))?: (.*/" + re.escape(PACK_NAME) + r")\s*$",
                      summary, flags=re.MULTILINE)
    assert len(ours) == 1, f"expected one import-time line for {PACK_NAME}:\n{summary[:2000]}"
    seconds, failed, path = ours[0]
    print(f"\nComfyUI-measured import time of {PACK_NAME}: {seconds} s (0.1 s resolution)")
    assert not failed, f"ComfyUI marked the pack as failed: {path}"
    assert float(seconds) < 1.0, f"the pack took {seconds} s to import; start-up must stay light"


def test_object_info(server):
    info = _get(f"{server.url}/object_info/{NODE_ID}")
    assert NODE_ID in info, f"ComfyUI does not know {NODE_ID}: {sorted(info)[:20]}"
    node = info[NODE_ID]
    assert node["category"] == "DreamBooth LoRA"

    inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
    assert {"ckpt_name", "prediction_type"} <= set(inputs), inputs.keys()
    for name, spec in inputs.items():
        extra = spec[1] if len(spec) > 1 else {}
        assert extra.get("tooltip"), f"input {name!r} has no tooltip: {spec}"

    def options(spec):
        # Classic combos are [[choices...], {...}]; V3 ones may be ["COMBO", {"options": [...]}].
        return spec[0] if isinstance(spec[0], list) else spec[1]["options"]

    assert CHECKPOINT in options(inputs["ckpt_name"])
    assert set(options(inputs["prediction_type"])) >= {"auto", "epsilon", "v_prediction"}


def _prompt(node_inputs: dict) -> dict:
    return {"prompt": {"1": {"class_type": NODE_ID, "inputs": node_inputs}}, "client_id": "test"}


def _wait_for(server: Server, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> dict:
    """The prompt's history entry once it has finished (with success or an error)."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            entry = _get(f"{server.url}/history/{prompt_id}").get(prompt_id)
        except (TimeoutError, urllib.error.URLError):  # a busy 2-core machine can answer slowly
            entry = None
        status = (entry or {}).get("status") or {}
        # Outputs are recorded together with the final status, so wait for completion or an error.
        if status.get("completed") or status.get("status_str") == "error":
            return entry
        assert time.perf_counter() < deadline, \
            f"prompt {prompt_id} did not finish in {timeout} s:\n{_tail(server.log_path)}"
        time.sleep(0.25)


def test_prompt_runs_node(server):
    queued = _post(f"{server.url}/prompt", _prompt({"ckpt_name": CHECKPOINT, "prediction_type": "auto"}))
    assert not queued.get("node_errors"), queued
    entry = _wait_for(server, queued["prompt_id"])

    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status.get("messages"), indent=1)
    # ui.PreviewText(report) → {"text": [report]} under the node's id.
    text = "\n".join(entry["outputs"]["1"]["text"])
    print(f"\nInspect report over HTTP:\n{text}")
    for expected in ("family:", "sd1", "prediction:", "epsilon"):
        assert expected in text, f"{expected!r} not in the report:\n{text}"


@pytest.mark.parametrize("inputs,phrase", [
    ({"ckpt_name": "nope.safetensors", "prediction_type": "auto"},
     "'nope.safetensors' is not in ComfyUI's models/checkpoints folder"),
    ({"ckpt_name": "tiny-sd1.safetensors", "prediction_type": "bogus"},
     "prediction_type: 'bogus' is not one of auto, epsilon, v_prediction"),
])
def test_bad_inputs_are_refused_when_queued(server, inputs, phrase):
    """ComfyUI 0.3.75 checks combo values only for V1 inputs (typed as the list of choices); a V3
    io.Combo is typed 'COMBO', so our node's validate_inputs must refuse bad values itself."""
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(f"{server.url}/prompt", _prompt(inputs))
    assert caught.value.code == 400
    body = json.loads(caught.value.read())
    errors = body["node_errors"]["1"]["errors"]
    assert any(e["type"] == "custom_validation_failed" and phrase in e["details"] for e in errors), body


def _photos_prompt(server: Server, folder: str) -> dict:
    """A Subject Photos node alone (it is an output node), every input at its published default."""
    spec = _get(f"{server.url}/object_info/DBLoRA_InstanceImages")["DBLoRA_InstanceImages"]["input"]["required"]
    inputs = {name: (entry[1] or {}).get("default", entry[0][0] if isinstance(entry[0], list) else "")
              for name, entry in spec.items()}
    node = {"class_type": "DBLoRA_InstanceImages", "inputs": {**inputs, "folder": folder, "resolution": 64}}
    return {"prompt": {"1": node}, "client_id": "test"}


def test_path_inputs_are_confined_unless_the_operator_allows_any(server, tmp_path_factory, artifacts):
    """A workflow that asks for /etc or ../../ is refused at validation by the server as it runs
    (ComfyUI's --listen makes anyone who can queue a prompt a reader of the server's files); the
    same workflow runs once the operator starts ComfyUI with DBLORA_ALLOW_ANY_PATH=1."""
    outside = tmp_path_factory.mktemp("photos-elsewhere")
    _subject_photos(outside / "dog")
    for folder in ("/etc", "../../", str(outside / "dog")):
        with pytest.raises(urllib.error.HTTPError) as caught:
            _post(f"{server.url}/prompt", _photos_prompt(server, folder))
        assert caught.value.code == 400
        body = json.loads(caught.value.read())
        details = " ".join(e["details"] for e in body["node_errors"]["1"]["errors"])
        assert "outside ComfyUI's input, output and models folders" in details and "DBLORA_ALLOW_ANY_PATH=1" in details
    assert _wait_for(server, _queue(server, _photos_prompt(server, "my_subject")["prompt"]))["status"]["status_str"] == "success"
    base = _comfyui_base(tmp_path_factory.mktemp("comfyui-open"))
    with _running_server(base, artifacts / "comfyui-server-any-path.log", {"DBLORA_ALLOW_ANY_PATH": "1"}) as open_server:
        entry = _wait_for(open_server, _queue(open_server, _photos_prompt(open_server, str(outside / "dog"))["prompt"]))
        assert entry["status"]["status_str"] == "success", entry["status"]


# --- the example workflows, queued over HTTP ---------------------------------------------------

WORKFLOWS = REPO_ROOT / "tests" / "workflows"
OUR_NODES = ("DBLoRA_InspectCheckpoint", "DBLoRA_LoadBaseModel", "DBLoRA_InstanceImages", "DBLoRA_SuggestIdentifier",
             "DBLoRA_ClassPriors", "DBLoRA_Train", "DBLoRA_SaveStep", "DBLoRA_Sampler", "DBLoRA_Grid",
             "DBLoRA_Evaluate", "DBLoRA_ShapesSubject")


def _workflow(name: str, **changes) -> dict:
    """An API-format example workflow with some inputs changed: {"<node id>.<input>": value}."""
    prompt = json.loads((WORKFLOWS / f"{name}.api.json").read_text())
    for key, value in changes.items():
        node, field = key.split(".", 1)
        prompt[node]["inputs"][field] = value
    return prompt


def _queue(server: Server, prompt: dict) -> str:
    queued = _post(f"{server.url}/prompt", {"prompt": prompt, "client_id": "test"})
    assert not queued.get("node_errors"), queued
    return queued["prompt_id"]


def test_every_node_is_published_with_its_inputs(server):
    info = _get(f"{server.url}/object_info")
    for node_id in OUR_NODES:
        assert node_id in info, f"{node_id} missing from /object_info"
        schema = info[node_id]
        for part in ("required", "optional"):
            for name, spec in schema["input"].get(part, {}).items():
                assert (spec[1] if len(spec) > 1 else {}).get("tooltip"), f"{node_id}.{name} has no tooltip"


@pytest.mark.parametrize("name", ["train_subject", "stock_lora_sampling", "evaluate_lora", "shapes_world"])
def test_ui_workflows_say_what_their_api_copies_say(server, name):
    import workflow_format

    info = _get(f"{server.url}/object_info")
    ui = json.loads((REPO_ROOT / "example_workflows" / f"{name}.json").read_text())
    assert workflow_format.from_ui(ui, info) == json.loads((WORKFLOWS / f"{name}.api.json").read_text())


SMALL_TRAINING = {
    "1.ckpt_name": FULL_CHECKPOINT, "2.folder": "", "2.resolution": 64,
    "3.num_class_images": 2, "3.steps": 2, "3.resolution": 64, "3.preview_count": 2,
    "4.steps": 2, "4.rank": 4, "4.alpha": 4.0, "4.save_every": 1, "4.validation_prompts": "",
    "5.steps": 2, "5.width": 64, "5.height": 64, "5.x": "unet-scale=0,1", "5.y": "guidance=4",
}


def test_train_workflow_then_the_stock_lora_loader_uses_the_lora(server):
    folder = str(server.base / "input" / "my_subject")
    # with a validation preview after each step: sent through ComfyUI's real progress hook
    previews = {"4.validation_prompts": "a photo of {id} {class}", "4.validation_every": 1, "4.validation_steps": 2}
    prompt_id = _queue(server, _workflow("train_subject", **{**SMALL_TRAINING, "2.folder": folder, **previews}))
    entry = _wait_for(server, prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"].get("messages"), indent=1)[-3000:]
    lora = server.base / "models" / "loras" / "sks_dog.safetensors"
    assert lora.is_file(), "the training workflow wrote no LoRA into models/loras"
    samples = server.base / "output" / "dreambooth_lora" / "sks_dog.state" / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == ["step-000001.png", "step-000002.png"]
    assert entry["outputs"]["6"]["images"], "the grid produced no image"
    # the same graph again: ComfyUI's cache answers, nothing is trained
    trainings = server.log().count("training:")
    again = _wait_for(server, _queue(server, _workflow("train_subject", **{**SMALL_TRAINING, "2.folder": folder,
                                                                           **previews})))
    assert again["status"]["status_str"] == "success" and server.log().count("training:") == trainings

    stock = _workflow("stock_lora_sampling", **{"1.ckpt_name": FULL_CHECKPOINT, "5.width": 64, "5.height": 64,
                                                "6.steps": 2})
    assert stock["2"]["inputs"]["lora_name"] == lora.name
    entry = _wait_for(server, _queue(server, stock), timeout=120)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"].get("messages"), indent=1)[-3000:]
    images = entry["outputs"]["8"]["images"]
    assert images and (server.base / "output" / images[0]["filename"]).is_file()
    log = server.log().lower()
    assert "lora key not loaded" not in log and "error lora" not in log


def test_shapes_workflow_trains_on_the_builtin_base(server):
    """The shapes example as shipped, on a fresh install: the built-in base and subject, nothing in
    models/checkpoints needed; only the step counts are cut for the test."""
    from dreambooth_lora.shapes import BASE_NAME

    small = {"4.num_class_images": 2, "4.steps": 2, "4.preview_count": 2, "5.steps": 2, "6.steps": 2}
    prompt = _workflow("shapes_world", **small)
    assert prompt["1"]["inputs"]["ckpt_name"] == f"(built-in) {BASE_NAME}"
    entry = _wait_for(server, _queue(server, prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"].get("messages"), indent=1)[-3000:]
    lora = server.base / "models" / "loras" / "shapes_badge.safetensors"
    assert lora.is_file(), "the shapes workflow wrote no LoRA into models/loras"
    assert len(entry["outputs"]["2"]["images"]) == 5  # the subject's photos, previewed
    grid = entry["outputs"]["7"]["images"]
    assert grid and (server.base / "temp" / grid[0]["subfolder"] / grid[0]["filename"]).is_file()


def test_cancel_during_training_returns_to_idle_and_leaves_a_checkpoint(server):
    from dreambooth_lora.trainer.checkpoint import list_checkpoints

    folder = str(server.base / "input" / "my_subject")
    long_run = _workflow("train_subject", **{**SMALL_TRAINING, "2.folder": folder, "4.steps": 100000,
                                             "4.lora_name": "cancelled", "4.save_every": 0,
                                             "4.prior_preservation": "base_model"})
    prompt_id = _queue(server, long_run)
    started = server.log().count("training:")
    deadline = time.perf_counter() + 120
    while server.log().count("training:") == started:  # tqdm's bar: the loop is running
        assert time.perf_counter() < deadline, _tail(server.log_path)
        time.sleep(0.2)
    time.sleep(1.0)
    request = urllib.request.Request(f"{server.url}/interrupt", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()  # answers with an empty body
    interrupted = time.perf_counter()
    while _get(f"{server.url}/queue")["queue_running"]:
        assert time.perf_counter() - interrupted < 15, "the server is still busy 15 s after /interrupt"
        time.sleep(0.2)
    idle_after = time.perf_counter() - interrupted
    entry = _get(f"{server.url}/history/{prompt_id}")[prompt_id]
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    checkpoints = list_checkpoints(server.base / "output" / "dreambooth_lora" / "cancelled.state")
    print(f"\nidle {idle_after:.1f} s after /interrupt; checkpoint {checkpoints[-1].name if checkpoints else None}")
    assert checkpoints and (checkpoints[-1] / "trainer.json").is_file()
    assert not (server.base / "models" / "loras" / "cancelled.safetensors").exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser_page(server):
    """The server's own ComfyUI frontend in headless Chromium (system chromium, driven by Playwright)."""
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        message = "headless Chromium + Playwright are not installed (bash .ci/setup installs them)"
        if os.environ.get("DBLORA_REQUIRE_COMFYUI"):
            pytest.fail(message)
        pytest.skip(message)
    # a first start opens the template browser over the canvas; mark the tutorial as done
    request = urllib.request.Request(f"{server.url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1800, "height": 1000})
        page.goto(server.url)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90_000)
        yield page
        browser.close()


@pytest.mark.parametrize("name", ["train_subject", "stock_lora_sampling", "evaluate_lora", "shapes_world"])
def test_workflow_opens_in_the_frontend_without_missing_nodes(browser_page, artifacts, name):
    ui = json.loads((REPO_ROOT / "example_workflows" / f"{name}.json").read_text())
    result = browser_page.evaluate("""async (workflow) => {
        await window.app.loadGraphData(workflow);
        const known = window.LiteGraph.registered_node_types;
        const missing = workflow.nodes.map(n => n.type).filter(t => !(t in known));
        const prompt = await window.app.graphToPrompt();
        return {missing, prompt: prompt.output};
    }""", ui)
    browser_page.wait_for_timeout(500)
    text = browser_page.inner_text("body").lower()  # a missing-node dialog would say so here
    browser_page.keyboard.press("Escape")
    browser_page.evaluate("() => { window.app.canvas.ds.scale = 0.62; window.app.canvas.ds.offset = [90, 140]; "
                          "window.app.canvas.setDirty(true, true); }")
    browser_page.wait_for_timeout(300)
    browser_page.screenshot(path=str(artifacts / f"frontend-{name}.png"))
    assert result["missing"] == [], result["missing"]
    assert "nodes are missing" not in text and "missing node" not in text
    # what the real frontend makes of the UI file is exactly our API copy
    expected = json.loads((WORKFLOWS / f"{name}.api.json").read_text())
    got = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["prompt"].items()}
    assert got == expected

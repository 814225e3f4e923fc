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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO_ROOT, require_comfyui

PACK_NAME = "ComfyUI-DreamBooth-LoRA"  # the folder name a `git clone` by ComfyUI-Manager gives
NODE_ID = "DBLoRA_InspectCheckpoint"
CHECKPOINT = "tiny-sd1.safetensors"
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


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifacts) -> Iterator[Server]:
    comfyui = require_comfyui()
    from dreambooth_lora.fixtures.checkpoints import fixture_path

    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(fixture_path("sd1-tiny"), base / "models" / "checkpoints" / CHECKPOINT)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = artifacts / "comfyui-server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
        yield Server(url, log_path, startup_s)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


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


def _wait_for(server: Server, prompt_id: str) -> dict:
    """The prompt's history entry once it has finished (with success or an error)."""
    deadline = time.perf_counter() + PROMPT_TIMEOUT_S
    while True:
        entry = _get(f"{server.url}/history/{prompt_id}").get(prompt_id)
        status = (entry or {}).get("status") or {}
        # Outputs are recorded together with the final status, so wait for completion or an error.
        if status.get("completed") or status.get("status_str") == "error":
            return entry
        assert time.perf_counter() < deadline, \
            f"prompt {prompt_id} did not finish in {PROMPT_TIMEOUT_S} s:\n{_tail(server.log_path)}"
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

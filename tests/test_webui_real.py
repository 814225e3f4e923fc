"""The extension in the real AUTOMATIC1111 v1.10.1, when one is present (skipped otherwise).

Set ``DBLORA_A1111_HOME`` to what ``/work/shared/a1111/setup.sh`` made (``webui/``, ``venv/``,
``hf/``). The test copies this repository into a fresh data folder's ``extensions/`` (as a clone
would be), runs its install.py the way the webui does (its Python, PYTHONPATH = the webui) and
compares the webui venv's ``pip freeze`` before and after, starts the webui (UI + API, CPU, model
not loaded at start), finds the tab in the page (screenshot in test-artifacts/a1111_tab.png when
Chromium is there), trains through ``/dreambooth-lora/train`` and finds the LoRA in the webui's
own list. With ``DBLORA_A1111_APPLY=1`` it then stops the webui and runs
``/work/shared/a1111/check.py`` on the LoRA (the base must be a full-size SD1.5-layout file, e.g.
``DBLORA_A1111_CHECKPOINT=$(dreambooth-lora fixture sd15-full)``): every key matched, the image
changes. One webui at a time: it needs 6-10 GB.

The training venv goes to ``$DBLORA_A1111_HOME/dblora-train-venv`` (made once; its stamp makes
later runs instant). ``DBLORA_A1111_WORK`` keeps the data folder and log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_lora.fixtures.checkpoints import fixture_path

ROOT = Path(__file__).resolve().parents[1]
HOME = os.environ.get("DBLORA_A1111_HOME")
CHECK = Path("/work/shared/a1111/check.py")
pytestmark = pytest.mark.skipif(not HOME, reason="no real webui here: set DBLORA_A1111_HOME to the folder "
                                "/work/shared/a1111/setup.sh made to run the extension in AUTOMATIC1111 v1.10.1")
COPY_IGNORE = shutil.ignore_patterns(".venv", "venv", ".webui-torch", ".git", "test-artifacts", "dreambooth-demo",
                                     "__pycache__", "*.egg-info", ".pytest_cache")


def http(url: str, payload=None, timeout: float = 60):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if payload is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def freeze(python: Path) -> list[str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    return sorted(out.stdout.splitlines())


class Webui:
    def __init__(self, home: Path, work: Path):
        self.home, self.work = home, work
        self.python, self.root = home / "venv" / "bin" / "python", home / "webui"
        self.data = work / "data"
        self.extension = self.data / "extensions" / "sd-dreambooth-lora"
        self.checkpoint = Path(os.environ.get("DBLORA_A1111_CHECKPOINT") or fixture_path("sd1-tiny"))
        self.env = dict(os.environ, HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
                        DBLORA_TRAIN_VENV=str(home / "dblora-train-venv"))
        self.env.pop("DBLORA_TRAIN_PYTHON", None)
        self.env.pop("PYTHONPATH", None)
        self.process = None
        self.log = work / "a1111.log"

    def install(self) -> tuple[float, str]:
        """install.py as A1111's run_extension_installer runs it."""
        start = time.perf_counter()
        result = subprocess.run([str(self.python), str(self.extension / "install.py")], cwd=self.root,
                                env=dict(self.env, PYTHONPATH=str(self.root)), capture_output=True, text=True,
                                timeout=3600)
        assert result.returncode == 0, result.stdout + result.stderr
        return time.perf_counter() - start, result.stdout

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(self.python), "launch.py", "--skip-prepare-environment", "--skip-install",
                   "--skip-torch-cuda-test", "--skip-version-check", "--no-download-sd-model", "--use-cpu", "all",
                   "--precision", "full", "--no-half", "--api", "--server-name", "127.0.0.1", "--port",
                   str(self.port), "--data-dir", str(self.data), "--skip-load-model-at-start", "--loglevel", "DEBUG"]
        self.process = subprocess.Popen(command, cwd=self.root, env=self.env, stdout=open(self.log, "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while True:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                http(self.url + "/sdapi/v1/options", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                assert time.time() < deadline, "the webui did not start"
                time.sleep(1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    home = Path(HOME)
    work = Path(os.environ.get("DBLORA_A1111_WORK") or tmp_path_factory.mktemp("a1111"))
    webui = Webui(home, work)
    shutil.rmtree(webui.data, ignore_errors=True)
    shutil.copytree(ROOT, webui.extension, ignore=COPY_IGNORE)
    models = webui.data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.symlink(webui.checkpoint, models / webui.checkpoint.name)
    webui.freeze_before = freeze(webui.python)
    webui.install_seconds, webui.install_output = webui.install()
    webui.freeze_after_install = freeze(webui.python)
    webui.start()
    yield webui
    webui.stop()
    assert freeze(webui.python) == webui.freeze_before, "the webui's packages changed"


def test_install_changes_no_package_of_the_webui(real):
    assert real.freeze_after_install == real.freeze_before
    pins = {line.split("==")[0].lower(): line for line in real.freeze_before if "==" in line}
    print(f"install.py: {real.install_seconds:.1f} s; webui pins kept: "
          f"{[pins.get(n) for n in ('transformers', 'numpy', 'pillow', 'gradio', 'pydantic', 'torch')]}")


def test_extension_loads_and_its_tab_appears(real):
    config = json.dumps(http(real.url + "/config"))
    assert "DreamBooth LoRA" in config and "dblora_train" in config and "dblora_steps" in config
    log = real.log.read_text(errors="replace")
    assert "dreambooth-lora: the DreamBooth LoRA tab is disabled" not in log
    assert "Traceback" not in log, log[log.find("Traceback") - 500:][:3000]
    assert "Error loading script: dreambooth_lora.py" not in log
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium:
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(real.url, timeout=120_000)
            # gradio 3.41 draws tabs as buttons in a .tab-nav row
            page.get_by_role("button", name="DreamBooth LoRA", exact=True).click(timeout=120_000)
            page.get_by_role("button", name="4. Training", exact=True).click()
            page.wait_for_selector("#dblora_train", timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(artifacts / "a1111_tab.png"))
            browser.close()


def test_a_lora_trained_through_the_api_is_listed_and_applies(real):
    photos = real.work / "photos"
    photos.mkdir(exist_ok=True)
    for i in range(3):
        image = Image.new("RGB", (80, 72), (30, 60 + 40 * i, 90))
        image.paste((220, 40, 30), (16 + 4 * i, 16, 56 + 4 * i, 56))
        image.save(photos / f"photo_{i}.png")
    assert http(real.url + "/dreambooth-lora/environment")["ready"] is True
    run = http(real.url + "/dreambooth-lora/train", {
        "name": "sks_dog", "instance_dir": str(photos),
        "options": {"steps": 4, "resolution": 64, "rank": 4, "alpha": 4, "learning_rate": 1e-3, "save_every": 0,
                    "prior_preservation": "off", "train_text_encoder": True, "text_encoder_lr": 1e-3}})
    started = time.time()
    while (status := http(real.url + f"/dreambooth-lora/runs/{run['id']}"))["status"] in ("running", "stopping"):
        assert time.time() - started < 3600
        time.sleep(2)
    assert status["status"] == "done", status["console"]
    print(f"training through the API: {time.time() - started:.0f} s")
    lora = Path(real.data / "models" / "Lora" / "sks_dog.safetensors")
    assert str(lora) in status["published"]
    listed = {item["name"]: item for item in http(real.url + "/sdapi/v1/loras")}
    assert "sks_dog" in listed, listed.keys()
    assert listed["sks_dog"]["metadata"]["ss_base_model_version"] == "sd_v1"
    if not os.environ.get("DBLORA_A1111_APPLY"):
        return
    real.stop()  # one webui at a time: check.py starts its own
    result = subprocess.run([str(real.python), str(CHECK), str(real.checkpoint), str(lora), "--keep",
                             str(real.work / "check")], capture_output=True, text=True, timeout=3600)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]

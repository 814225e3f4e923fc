"""A webui in miniature for tests: a data folder laid out as A1111's (models/Stable-diffusion,
models/Lora, embeddings), the stand-in ``modules``/``gradio``/``fastapi`` on sys.path, the
extension's script executed the way A1111 executes ``scripts/*.py``. Removed again afterwards, so
no other test sees a module named ``modules``, ``gradio`` or ``fastapi``."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

STANDIN = Path(__file__).resolve().parent
ROOT = STANDIN.parents[1]
STANDIN_MODULES = ("modules", "gradio", "fastapi")


@dataclass
class Webui:
    data: Path
    lora_dir: Path
    modules: object  # the stand-in script_callbacks, shared, sd_models as attributes
    script: object  # the executed scripts/dreambooth_lora.py

    def tabs(self):
        return self.modules.script_callbacks.ui_tabs_callback()

    def app(self):
        from fastapi import FastAPI

        app = FastAPI()
        self.modules.script_callbacks.app_started_callback(None, app)
        return app


def _forget_standin() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STANDIN_MODULES:
            del sys.modules[name]


@contextlib.contextmanager
def webui(data: Path, checkpoints: dict[str, Path], lora_dir: Path | None = None, api_auth: str | None = None):
    """A stand-in webui over ``data`` with ``checkpoints`` (file name → file) in its models folder."""
    from dreambooth_lora.webui import extension

    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True, exist_ok=True)
    for name, path in checkpoints.items():
        if not (models / name).exists():
            os.symlink(path, models / name)
    _forget_standin()
    sys.path.insert(0, str(STANDIN))
    extension._extension = None
    try:
        from modules import script_callbacks, sd_models, shared

        shared.configure(data, lora_dir=str(lora_dir) if lora_dir else None, api_auth=api_auth)
        sd_models.list_models()
        script_callbacks.clear_callbacks()
        spec = importlib.util.spec_from_file_location("dreambooth_lora.py", ROOT / "scripts" / "dreambooth_lora.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        namespace = type("Modules", (), {"script_callbacks": script_callbacks, "shared": shared,
                                         "sd_models": sd_models})
        yield Webui(data, Path(shared.cmd_opts.lora_dir), namespace, script)
    finally:
        if extension._extension is not None:  # runs still going stop as if cancelled
            extension._extension.runs.stop_all()
            for process in extension._extension.runs.processes.values():
                process.wait(timeout=300)
        extension._extension = None
        sys.path.remove(str(STANDIN))
        _forget_standin()

"""The extension's one object inside the webui: its runs, its training environment, and the two
callbacks scripts/dreambooth_lora.py registers (the tab, the API routes).

It outlives A1111's "Reload UI", which executes scripts/*.py again: the package stays in
``sys.modules``, so ``get()`` returns the same object and runs in progress stay tracked.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

from . import environment, host, jobs
from .runs import Runs

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
TAB_TITLE, TAB_ID = "DreamBooth LoRA", "dreambooth_lora"


class Extension:
    def __init__(self, root: Path = EXTENSION_ROOT):
        self.root = root
        self.places = host.places()
        self.runs = Runs(self.places.runs, self.training_python, on_finished=self.run_finished)
        self.setup_lock = threading.Lock()
        self.setup_log: list[str] = []

    # --- the training environment ---------------------------------------------------------------

    def training_python(self) -> Path | None:
        return environment.training_python(self.root)

    def environment_status(self) -> dict:
        python = self.training_python()
        return {"ready": python is not None, "python": str(python) if python else None,
                "log": self.setup_log[-20:],
                "detail": None if python else "not set up: the webui's install.py makes it at start-up (unless "
                                              "--skip-install), or use 'Set up training environment' in the tab."}

    def set_up_environment(self) -> str:
        """Make the training environment now (the tab's button; install.py does the same at start)."""
        if not self.setup_lock.acquire(blocking=False):
            return "already being set up"
        try:
            self.setup_log.clear()
            python = environment.ensure(self.root, say=self.setup_log.append)
            return f"ready: {python}"
        except (environment.EnvironmentProblem, OSError) as problem:
            self.setup_log.append(str(problem))
            return f"failed: {problem}"
        finally:
            self.setup_lock.release()

    # --- commands -------------------------------------------------------------------------------

    def running_names(self) -> set[str]:
        names = set()
        for run in self.runs.list():
            if run["kind"] == "train" and run["status"] in ("running", "stopping"):
                output = self.runs.record(run["id"]).get("output")
                if output:
                    names.add(Path(output).stem)
        return names

    def train_command(self, request: Mapping[str, Any]):
        return jobs.train_command(request, self.places, host.checkpoint_file, self.running_names)

    def run_finished(self, status: dict) -> None:
        if status["published"]:
            host.refresh_loras()

    # --- the webui's callbacks ------------------------------------------------------------------

    def ui_tabs(self) -> list:
        from .tab import build_tab

        return [(build_tab(self), TAB_TITLE, TAB_ID)]

    def app_started(self, demo, app) -> None:
        from . import api

        api.register(app, self, credentials)


def credentials() -> dict:
    """The webui's --api-auth users (user → password), or {} when its API is open."""
    from modules import shared

    text = getattr(shared.cmd_opts, "api_auth", None)
    if not text:
        return {}
    return dict(item.split(":", 1) for item in text.strip().split(",") if ":" in item)


_extension: Extension | None = None


def get() -> Extension:
    global _extension
    if _extension is None:
        _extension = Extension()
    return _extension

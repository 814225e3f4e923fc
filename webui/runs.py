"""Commands of the tab and the API as child processes, and what became of them.

Every command (train, class images, identifiers, photo check, grid) is one run: a folder
``<work>/runs/<id>/`` holding ``run.json`` (the ``dreambooth-lora`` arguments, where results go),
``console.log`` (everything the CLI printed) and, once it ended, ``result.json``. The process is
``<training python> webui/child.py <run folder>`` (see child.py), in a session of its own so that
a Ctrl-C in the webui's terminal does not reach it. All state is in the folder, so a poll after a
UI reload or a webui restart still finds the run, and a stop request is a file (``stop``) that
the child turns into the CLI's own Ctrl-C: training stops after the current step and keeps a
checkpoint; ``resume`` starts a new run with ``--resume <state folder>``.

Only one heavy run (training, class images, a grid) at a time: they would share one GPU.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .progress import console_lines, last_error, read_progress, tail

CHILD = Path(__file__).with_name("child.py")
RECORD, CONSOLE, RESULT, STOP, STOP_NOW = "run.json", "console.log", "result.json", "stop", "stop-now"
RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
HEAVY = {"train", "priors", "grid"}
CANCELLED = 130  # the CLI's exit status after Ctrl-C
# Variables of the webui's own Python that must not reach the training interpreter.
HOST_ONLY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__")


@dataclass
class Command:
    kind: str  # train, priors, identifiers, dataset, grid
    title: str
    argv: list[str]  # arguments of the dreambooth-lora command
    output: str | None = None  # the file it makes (the LoRA in the work folder, a grid image)
    state_dir: str | None = None  # a training run's state folder
    publish: list[dict] = field(default_factory=list)  # {"source", "folder", "name"}: copied on success
    sidecars: list[dict] = field(default_factory=list)  # {"folder", "name", "text"}: written on success
    preview: dict | None = None  # {"folder", "name"}: the newest preview grid, copied on success
    clear: list[str] = field(default_factory=list)  # work-folder paths removed before it starts (overwrite)
    resume_of: str | None = None


def child_environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in HOST_ONLY_ENV}
    # TRANSFORMERS_VERBOSITY: its import-time notices (e.g. "… requires torchvision") would fill the tab's console
    env.update(PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1", PYTHONIOENCODING="utf-8", TQDM_MININTERVAL="1",
               TRANSFORMERS_VERBOSITY="error")
    return env


def _process_alive(pid: int, run_dir: Path) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # Linux: make sure the pid was not reused by another process
        try:
            return str(run_dir) in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
    return True


def read_result(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / RESULT).read_text())
    except (OSError, ValueError):
        return None


class Runs:
    """The runs under ``folder``; ``python()`` gives the training interpreter (None: not ready)."""

    def __init__(self, folder: Path, python: Callable[[], Path | None],
                 on_finished: Callable[[dict], None] | None = None):
        self.folder, self.python, self.on_finished = Path(folder), python, on_finished
        self.processes: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        atexit.register(self.stop_all)

    # --- starting -----------------------------------------------------------------------------

    def start(self, command: Command) -> dict:
        python = self.python()
        if python is None:
            raise UserError("the training environment is not set up yet: restart the webui (its install.py makes it) "
                            "or press 'Set up training environment' in the DreamBooth LoRA tab.")
        with self.lock:
            if command.kind in HEAVY:
                busy = [r for r in self.list() if r["kind"] in HEAVY and r["status"] in ("running", "stopping")]
                if busy:
                    raise UserError(f"run {busy[0]['id']} ({busy[0]['title']}) is still running; cancel it or wait for "
                                    "it (one training, class-image or grid run at a time: they share the GPU).")
            run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
            run_dir = self.folder / run_id
            run_dir.mkdir(parents=True)
            for path in command.clear:
                target = Path(path)
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            record = dict(asdict(command), id=run_id, python=str(python), started=time.time())
            (run_dir / RECORD).write_text(json.dumps(record, indent=1))
            with open(run_dir / CONSOLE, "wb") as console:
                process = subprocess.Popen(
                    [str(python), str(CHILD), str(run_dir)], cwd=run_dir, stdout=console, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=child_environment(),
                    **({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                       else {"start_new_session": True}))
            record["pid"] = process.pid
            (run_dir / RECORD).write_text(json.dumps(record, indent=1))
            self.processes[run_id] = process
        threading.Thread(target=self._wait, args=(run_id, process), daemon=True, name=f"dblora-{run_id}").start()
        return self.status(run_id)

    def _wait(self, run_id: str, process: subprocess.Popen) -> None:
        process.wait()
        if self.on_finished is not None:
            try:
                self.on_finished(self.status(run_id))
            except Exception as err:  # a refresh of the host's lists must never take the webui down
                print(f"dreambooth-lora: after run {run_id}: {err}", file=sys.stderr)

    # --- reading ------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not RUN_ID.match(run_id) or not (self.folder / run_id / RECORD).is_file():
            raise KeyError(run_id)
        return self.folder / run_id

    def record(self, run_id: str) -> dict:
        return json.loads((self.run_dir(run_id) / RECORD).read_text())

    def alive(self, run_id: str, record: dict) -> bool:
        process = self.processes.get(run_id)
        if process is not None:
            return process.poll() is None
        return bool(record.get("pid")) and _process_alive(record["pid"], self.folder / run_id)

    def state(self, run_id: str, record: dict, result: dict | None) -> str:
        """running, stopping (asked to stop), done, cancelled (stopped; a checkpoint is kept) or failed."""
        if result is not None:
            return {0: "done", CANCELLED: "cancelled"}.get(result["rc"], "failed")
        if self.alive(run_id, record):
            return "stopping" if (self.folder / run_id / STOP).exists() else "running"
        return "failed"

    def status(self, run_id: str, console_tail: int = 40) -> dict:
        """Where the run stands: status (running, stopping, done, cancelled, failed), progress,
        the error sentence if it failed, what it published, the console's last lines."""
        run_dir = self.run_dir(run_id)
        record = self.record(run_id)
        console = tail(run_dir / CONSOLE)
        result = read_result(run_dir)
        status = self.state(run_id, record, result)
        state_dir = Path(record["state_dir"]) if record.get("state_dir") else None
        progress = read_progress(run_dir / CONSOLE, state_dir)
        error = None
        if status == "failed":
            error = (result or {}).get("error") or last_error(console) or \
                "the process ended without a result (killed, or out of memory?)"
        return {"id": run_id, "kind": record["kind"], "title": record["title"], "status": status,
                "started": record["started"], "output": record.get("output"), "state_dir": record.get("state_dir"),
                "resumable": record["kind"] == "train" and status in ("cancelled", "failed") and state_dir is not None
                and any(state_dir.glob("step-*")),
                "published": (result or {}).get("published", []), "error": error, "rc": (result or {}).get("rc"),
                "progress": progress.as_dict(), "history": progress.history,
                "console": "\n".join(console_lines(console)[-console_tail:]).strip()}

    def list(self) -> list[dict]:
        """Every run, newest first: id, kind, title, status."""
        runs = []
        if self.folder.is_dir():
            for run_dir in sorted(self.folder.iterdir(), reverse=True):
                if not RUN_ID.match(run_dir.name) or not (run_dir / RECORD).is_file():
                    continue
                record = self.record(run_dir.name)
                status = self.state(run_dir.name, record, read_result(run_dir))
                runs.append({"id": run_dir.name, "kind": record["kind"], "title": record["title"], "status": status})
        return runs

    # --- stopping and continuing --------------------------------------------------------------

    def cancel(self, run_id: str, now: bool = False) -> dict:
        """Ask the run to stop: training finishes its current step and saves a checkpoint (asking
        again changes nothing). ``now``: quit at once, as a second Ctrl-C, keeping the last saved
        checkpoint (a stop waits for the class images a training run is still making)."""
        run_dir = self.run_dir(run_id)
        if self.alive(run_id, self.record(run_id)) and not (run_dir / RESULT).exists():
            (run_dir / STOP).touch()
            if now:
                (run_dir / STOP_NOW).touch()
        return self.status(run_id)

    def resume_command(self, run_id: str, steps: int | None = None) -> Command:
        record = self.record(run_id)
        if record["kind"] != "train" or not record.get("state_dir"):
            raise UserError(f"run {run_id} is not a training run; only training runs can be resumed.")
        status = self.status(run_id)["status"]
        if status in ("running", "stopping"):
            raise UserError(f"run {run_id} is still {status}; wait for it to end before resuming it.")
        if not any(Path(record["state_dir"]).glob("step-*")):
            raise UserError(f"run {run_id} kept no checkpoint in {record['state_dir']}; start it again instead.")
        argv = [a for a in record["argv"] if a != "--overwrite" and not (steps and a.startswith("--steps="))]
        argv += [f"--steps={steps}"] if steps else []
        argv += ["--resume", record["state_dir"]]
        fields = {k: record[k] for k in ("kind", "output", "state_dir", "publish", "sidecars", "preview")}
        return Command(title=record["title"].split(" (resumed")[0] + f" (resumed from {run_id})", argv=argv,
                       resume_of=run_id, **fields)

    def stop_all(self) -> None:
        """At the webui's exit: every run started here stops as if cancelled (checkpoint kept)."""
        for run_id, process in list(self.processes.items()):
            if process.poll() is None:
                try:
                    (self.folder / run_id / STOP).touch()
                except OSError:
                    pass

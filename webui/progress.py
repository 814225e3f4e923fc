"""What a running command has done so far, read from the files it writes.

A training run writes ``<output stem>.state/``: ``log.jsonl`` (one row per step, rewritten at
every checkpoint), ``samples/step-N.png`` (preview grids) and ``loss.png`` (at the end). Those are
the record. Between checkpoints the only live source is the CLI's own progress bar (tqdm, on
stderr, which the child writes to ``console.log``):

    training:  40%|████      | 4/10 [00:02<00:03,  1.85step/s, loss=0.1234, inst=0.1200, prior=-, lr=1.00e-04]

so the newest bar line gives the current step, the ETA and the latest losses, and the log rows
give the history. Other commands (class images, samples) show the same kind of bar.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

TAIL_BYTES = 1 << 16
BAR = re.compile(r"(?P<desc>[^\r\n:|]*): *(?P<percent>\d+)%\|[^|\r\n]*\| *(?P<n>\d+)/(?P<total>\d+) "
                 r"\[(?P<elapsed>[\d:]+)<(?P<remaining>[\d:?]+)(?P<rest>[^\]\r\n]*)\]")
POSTFIX = re.compile(r"(\w+)=([^,\s\]]+)")
LOSS_NAMES = {"loss": "loss", "inst": "loss_instance", "prior": "loss_prior", "lr": "lr"}
TRAINING = "training"  # the trainer's bar


@dataclass
class Progress:
    phase: str = ""  # the bar's description: "training", "class images (0 cached)", …
    step: int = 0
    total: int = 0
    elapsed: str = ""
    eta: str = ""
    losses: dict = field(default_factory=dict)  # loss, loss_instance, loss_prior, lr (latest known)
    history: list = field(default_factory=list)  # log.jsonl rows (as of the last checkpoint)
    previews: list = field(default_factory=list)  # preview grid paths, oldest first
    loss_plot: str | None = None

    def as_dict(self) -> dict:
        return {"phase": self.phase, "step": self.step, "total": self.total, "elapsed": self.elapsed,
                "eta": self.eta, "losses": self.losses, "previews": self.previews, "loss_plot": self.loss_plot,
                "logged_steps": len(self.history)}


def tail(path: Path, size: int = TAIL_BYTES) -> str:
    """The last ``size`` bytes of a text file (empty when it does not exist yet)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def console_lines(text: str) -> list[str]:
    """The console as a person sees it: a progress bar's \\r-updates collapse into their last state."""
    return [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
            for line in text.split("\n")]


def bars(text: str) -> tuple[dict | None, dict | None]:
    """The newest progress bar of any kind, and the newest training bar."""
    last = training = None
    for match in BAR.finditer(text):
        last = match.groupdict()
        if last["desc"].strip() == TRAINING:
            training = last
    return last, training


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def read_progress(console: Path, state_dir: Path | None) -> Progress:
    progress = Progress()
    last, training = bars(tail(console))
    if last:
        progress.phase = last["desc"].strip()
    bar = training or last
    if bar:
        progress.step, progress.total = int(bar["n"]), int(bar["total"])
        progress.elapsed, progress.eta = bar["elapsed"], bar["remaining"]
        for key, value in POSTFIX.findall(bar["rest"]):
            if key in LOSS_NAMES:
                progress.losses[LOSS_NAMES[key]] = _number(value)
    if state_dir is None:
        return progress
    log = state_dir / "log.jsonl"
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            try:
                progress.history.append(json.loads(line))
            except ValueError:
                continue  # a line being rewritten
    if progress.history and (progress.history[-1]["step"] > progress.step or not progress.losses):
        row = progress.history[-1]
        progress.step = max(progress.step, row["step"])
        progress.losses = {name: row.get(name) for name in LOSS_NAMES.values()}
    samples = state_dir / "samples"
    if samples.is_dir():
        progress.previews = [str(p) for p in sorted(samples.glob("step-*.png"))]
    if (state_dir / "loss.png").is_file():
        progress.loss_plot = str(state_dir / "loss.png")
    return progress


def last_error(text: str) -> str | None:
    """The CLI's one-sentence error (``error: …``), or the last line of a traceback."""
    lines = [line.strip() for line in console_lines(text) if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return None

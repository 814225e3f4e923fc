"""The training log: one row per step in ``log.jsonl``, the loss plot, the progress bar, and a
warning when one loss term drowns the other.

A step's losses stay on the device until the end of the next step: reading a value from the
GPU waits for all queued work, and doing that every step would leave the GPU idle while Python
prepares the next one. ``LossLog.settle`` reads them, and stops the run on a non-finite loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..runtime.files import write_png, write_text
from ..runtime.pictures import plot_losses
from .checkpoint import LOG_FILE, LOSS_PLOT
from .job import TrainingError

DOMINANCE_WINDOW = 50  # steps averaged before comparing the two loss terms
DOMINANCE_RATIO = 10


def write_log(state_dir: Path, rows: list[dict]) -> None:
    write_text(state_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def read_log(state_dir: Path, up_to: int) -> list[dict]:
    """The log's rows up to step ``up_to`` (a resumed run continues from there)."""
    path = state_dir / LOG_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= up_to]


def write_loss_plot(state_dir: Path, rows: list[dict]) -> Path | None:
    """loss.png: instance and prior loss (exponential moving average) and the validation loss
    (as measured) against the step."""
    image = plot_losses(rows)
    if image is None:
        return None
    return write_png(image, state_dir / LOSS_PLOT)


class DominanceWarning:
    """Says once if, over 50 steps, the prior loss is 10× the instance loss (the subject learns
    slowly) or the other way round (the prior barely constrains the model)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.window: list[tuple[float, float]] = []
        self.warned: set[str] = set()

    def add(self, row: dict) -> None:
        if row["loss_prior"] is None:
            return
        self.window.append((row["loss_instance"], row["loss_prior"]))
        if len(self.window) < DOMINANCE_WINDOW:
            return
        instance = sum(w[0] for w in self.window) / len(self.window)
        prior = sum(w[1] for w in self.window) / len(self.window)
        self.window.clear()
        if prior > DOMINANCE_RATIO * instance and "prior" not in self.warned:
            self.warned.add("prior")
            self.say(f"warning: step {row['step']}: prior loss {prior:.4f} is {prior / instance:.0f}× the instance "
                     f"loss {instance:.4f} over the last {DOMINANCE_WINDOW} steps; the subject learns slowly. "
                     "Lower --prior-weight.")
        elif instance > DOMINANCE_RATIO * prior and "instance" not in self.warned:
            self.warned.add("instance")
            self.say(f"warning: step {row['step']}: instance loss {instance:.4f} is {instance / prior:.0f}× the prior "
                     f"loss {prior:.4f} over the last {DOMINANCE_WINDOW} steps; the prior barely constrains the model.")


class LossLog:
    """The rows of the log (those of a resumed run's earlier steps first), the step whose losses
    are still on the device, and the progress bar."""

    def __init__(self, rows: list[dict], start_step: int, steps: int, has_prior: bool, show: bool,
                 say: Callable[[str], None], on_step: Callable[[dict], None] | None):
        self.rows, self.has_prior, self.on_step = rows, has_prior, on_step
        self.pending: list[tuple[int, torch.Tensor, float, float]] = []
        self.dominance = DominanceWarning(say)
        self.last_validation = next((r["loss_validation"] for r in reversed(rows) if "loss_validation" in r), None)
        self.progress = tqdm(total=steps, initial=start_step, desc="training", unit="step", disable=not show)

    def add(self, step: int, losses: torch.Tensor, lr: float, seconds: float) -> None:
        """Step ``step``'s [total, instance, prior] losses, still on the device."""
        self.pending.append((step, losses, lr, seconds))

    def settle(self, last_checkpoint: Path | None) -> None:
        """Read the pending step's losses: stop on a non-finite one, else log and report it."""
        if not self.pending:
            return
        done, losses, lr, seconds = self.pending.pop()
        values = losses.tolist()
        if not all(math.isfinite(v) for v in values):
            kept = f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else \
                "no checkpoint was written yet"
            raise TrainingError(f"step {done}: the loss became {values[0]} (not finite); {kept}. Lower the "
                                "learning rate, use --mixed-precision bf16 or no instead of fp16, or set "
                                "--max-grad-norm 1.")
        row = {"step": done, "loss": values[0], "loss_instance": values[1],
               "loss_prior": values[2] if self.has_prior else None, "lr": lr, "seconds": round(seconds, 3)}
        self.rows.append(row)
        self.dominance.add(row)
        self.progress.set_postfix(loss=f"{row['loss']:.4f}", inst=f"{row['loss_instance']:.4f}",
                                  prior="-" if row["loss_prior"] is None else f"{row['loss_prior']:.4f}",
                                  lr=f"{row['lr']:.2e}",
                                  **({} if self.last_validation is None else {"val": f"{self.last_validation:.4f}"}),
                                  refresh=False)
        self.progress.update(1)
        if self.on_step is not None:
            self.on_step(row)

    def validation(self, step: int, value: float) -> None:
        """The validation loss measured after step ``step`` (whose row is settled): kept in its row."""
        row = self.rows[-1]
        assert row["step"] == step, (row["step"], step)
        row["loss_validation"] = value
        self.last_validation = value

    def close(self) -> None:
        self.progress.close()

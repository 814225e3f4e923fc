"""Choosing a checkpoint of a training run: by the paper's metrics on samples of held-out
prompts (needs evaluator models), or by the validation loss each checkpoint recorded (needs
nothing but the state folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.core import fill_caption
from ..errors import UserError
from ..sampling.patch import LoraChoice
from ..sampling.settings import SampleSettings
from ..trainer.checkpoint import TRAINER_JSON, list_checkpoints, read_record, step_of
from .core import Evaluator, evaluate


def lora_checkpoints(state_dir: str | Path) -> list[Path]:
    folder = Path(state_dir).expanduser()
    checkpoints = [c for c in list_checkpoints(folder) if (c / "lora.safetensors").is_file()]
    if not checkpoints:
        raise UserError(f"{folder}: holds no checkpoint with a LoRA (step-N/lora.safetensors); pass the "
                        "'<output>.state' folder of a training run.")
    return checkpoints


def by_validation_loss(state_dir: str | Path) -> tuple[list[dict], dict]:
    """(rows, the row of lowest validation loss) over the checkpoints that recorded one at their
    own step (a run stopped between measurements has a checkpoint without one: it is listed
    without a loss and never chosen)."""
    rows = []
    for checkpoint in lora_checkpoints(state_dir):
        record = read_record(checkpoint)
        rows.append({"step": step_of(checkpoint), "lora": str(checkpoint / "lora.safetensors"),
                     "validation_loss": record.get("validation_loss")})
    measured = [r for r in rows if r["validation_loss"] is not None]
    if not measured:
        raise UserError(f"{state_dir}: no checkpoint recorded a validation loss (trained with "
                        "--validation-loss-every 0, or by an older version); choose by the metrics instead "
                        "(--by metrics with --dino/--clip).")
    return rows, min(measured, key=lambda r: (r["validation_loss"], r["step"]))  # a tie goes to the earlier step


def recommend(rows: Sequence[dict]) -> dict:
    """The checkpoint with the best balance of subject fidelity (mean of DINO and CLIP-I,
    whichever were measured) and prompt fidelity (CLIP-T): each is divided by its best value
    across the checkpoints and the harmonic mean of the two ranks them, so neither an overfit
    checkpoint (copies the photos, ignores the prompt) nor an underfit one (ignores the subject)
    wins. Without CLIP-T only subject fidelity counts, which favours overfitting: the caller says so."""
    def relative(key: str) -> list[float] | None:
        values = [r.get(key) for r in rows]
        if any(v is None for v in values):
            return None
        best = max(values)
        # cosines of unrelated images can be ≤ 0: such a score counts as no fidelity at all
        return [max(v, 0.0) / best if best > 0 else 0.0 for v in values]

    subject_parts = [s for s in (relative("dino"), relative("clip_i")) if s is not None]
    if not subject_parts:
        raise UserError("no subject-fidelity score (DINO or CLIP-I) to choose a checkpoint by.")
    subject = [float(np.mean(values)) for values in zip(*subject_parts)]
    prompt = relative("clip_t")
    for i, row in enumerate(rows):
        s, p = subject[i], (prompt[i] if prompt is not None else None)
        row["score"] = s if p is None else (0.0 if s + p == 0 else 2 * s * p / (s + p))
    return max(rows, key=lambda r: (r["score"], -r["step"]))  # a tie goes to the earlier step


def score_checkpoints(session, state_dir: str | Path, real: Sequence[Any], prompts: Sequence[str],
                      dino: Evaluator | None, clip: Evaluator | None, images_per_prompt: int = 2, steps: int = 25,
                      sampler: str = "euler_a", guidance: float = 7.5, resolution: int = 0,
                      on_progress=None) -> tuple[list[dict], dict]:
    """Sample the held-out ``prompts`` ({id}/{class} filled from the training record) with every
    checkpoint of a training state folder, score each, and return (rows, recommended row)."""

    checkpoints = lora_checkpoints(state_dir)
    options = json.loads((checkpoints[-1] / TRAINER_JSON).read_text()).get("options", {})
    identifier, class_word = options.get("identifier", ""), options.get("class_word", "")
    filled = [fill_caption(p, identifier, class_word) for p in prompts]
    size = resolution or options.get("resolution", 0)
    rows = []
    for index, checkpoint in enumerate(checkpoints):
        generated = []
        for prompt in filled:
            settings = SampleSettings(prompt=prompt, seed=0, steps=steps, guidance=guidance, width=size, height=size,
                                      sampler=sampler, batch=images_per_prompt,
                                      loras=[LoraChoice(str(checkpoint / "lora.safetensors"))])
            generated += [(sample.image, prompt) for sample in session.sample(settings, together=True)]  # scored only
        scores = evaluate(generated, real, dino, clip, identifier)
        step = step_of(checkpoint)
        rows.append({"step": step, "lora": str(checkpoint / "lora.safetensors"), **scores.values})
        if on_progress is not None:
            on_progress(index + 1, len(checkpoints))
    return rows, recommend(rows)

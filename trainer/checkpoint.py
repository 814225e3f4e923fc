"""Resumable training state, written only as safetensors + JSON (never pickles).

    <output stem>.state/step-000200/adapter_unet.safetensors   PEFT state per trained component
                                   /adapter_te.safetensors …
                                   /optimizer.safetensors       every optimizer tensor (fp32, exact)
                                   /lora.safetensors            the kohya LoRA as of this step
                                   /trainer.json                step, optimizer/scheduler scalars,
                                                                options, base fingerprint (written last)

A checkpoint is assembled in a hidden temporary folder and renamed into place, so a kill at
any moment leaves either the previous checkpoint set or a complete new one. Randomness needs
no saved generator state: every step re-seeds from (seed, step, rank), so step N draws the
same order, noise and timesteps whether the run was resumed or not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_JSON = "trainer.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and the JSON-able rest."""
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    for param_id, values in rest["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def write_checkpoint(state_dir: Path, step: int, adapters: Mapping[str, Mapping[str, torch.Tensor]],
                     optimizer_state: Mapping[str, Any], scheduler_state: Mapping[str, Any], record: Mapping[str, Any],
                     lora_writer=None, keep: int = 0) -> Path:
    """Write ``step-N/`` atomically; ``lora_writer(path)`` adds the kohya file; keep the newest ``keep``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    final = state_dir / step_dir_name(step)
    staging = Path(tempfile.mkdtemp(dir=state_dir, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        for component, tensors in adapters.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(staging / f"adapter_{component}.safetensors"))
        opt_tensors, opt_rest = flatten_optimizer(optimizer_state)
        save_file(opt_tensors, str(staging / "optimizer.safetensors"))
        if lora_writer is not None:
            lora_writer(staging / "lora.safetensors")
        trainer = {"step": step, "optimizer": _jsonable(opt_rest), "scheduler": _jsonable(scheduler_state),
                   **_jsonable(dict(record))}
        (staging / TRAINER_JSON).write_text(json.dumps(trainer, indent=1))
        if final.exists():  # saving the same step again (a resumed run that was stopped at once)
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(state_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(state_dir: Path) -> list[Path]:
    """Complete checkpoints (those with trainer.json), oldest first."""
    found = []
    if state_dir.is_dir():
        for child in state_dir.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / TRAINER_JSON).is_file():
                found.append((int(match[1]), child))
    return [path for _, path in sorted(found)]


def resolve_resume(path: str | Path) -> Path:
    """``--resume``: a state folder (its newest checkpoint) or one ``step-N`` folder in it."""
    path = Path(path).expanduser()
    if (path / TRAINER_JSON).is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: no such folder; --resume takes the '<output>.state' folder or a step-N folder in it.")
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise UserError(f"{path}: holds no complete checkpoint (step-N/ with {TRAINER_JSON}); nothing to resume. "
                        "Start without --resume.")
    return checkpoints[-1]


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict]:
    """(trainer record, {component: adapter tensors}, optimizer state dict)."""
    try:
        record = json.loads((folder / TRAINER_JSON).read_text())
        adapters = {p.stem.removeprefix("adapter_"): load_file(str(p)) for p in sorted(folder.glob("adapter_*.safetensors"))}
        optimizer = unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), record["optimizer"])
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{folder}: unreadable checkpoint ({err}); resume from an older step-N folder.") from None
    return record, adapters, optimizer

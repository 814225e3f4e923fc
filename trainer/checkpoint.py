"""A training run's state folder: the one owner of its layout. Written only as safetensors +
JSON (never pickles).

    <output stem>.state/step-000200/adapter_unet.safetensors   PEFT state per trained component
                                   /adapter_text_encoder.safetensors …
                                   /adapter_tokens.safetensors  new token vectors (with --new-tokens)
                                   /optimizer.safetensors       every optimizer tensor (fp32, exact)
                                   /lora.safetensors            the kohya LoRA as of this step
                                   /embedding.safetensors       the embedding as of this step (new tokens)
                                   /trainer.json                step, optimizer/scheduler scalars,
                                                                options, base fingerprint
                       /adapter/adapter_*.safetensors, training.json   the final PEFT adapter
                       /log.jsonl                               one row per step (losses, lr, time)
                       /loss.png                                the loss plot
                       /samples/step-000200.png                 preview grids

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
from safetensors.torch import load_file

from ..errors import UserError
from ..runtime.files import storage_error, sync_file, sync_folder, write_safetensors, write_text

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_JSON = "trainer.json"
LORA_FILE = "lora.safetensors"
EMBEDDING_FILE = "embedding.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
FINAL_DIR = "adapter"  # the final PEFT adapter and its record
LOG_FILE = "log.jsonl"
LOSS_PLOT = "loss.png"
SAMPLES_DIR = "samples"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def state_dir_for(output: str | Path) -> Path:
    """Where the run that writes the LoRA ``output`` keeps its state: ``<output stem>.state``."""
    output = Path(output).expanduser()
    return output.with_name(output.stem + ".state")


def step_of(path: str | Path) -> int | None:
    """The step a ``step-N`` folder (or its ``samples/step-N.png`` preview) holds; None for anything else."""
    match = STEP_DIR.match(Path(path).name.removesuffix(".png"))
    return int(match[1]) if match else None


def step_lora_path(state_dir: Path, step: int) -> Path:
    """Where the checkpoint of step ``step`` keeps its LoRA (whether or not it was saved)."""
    return state_dir / step_dir_name(step) / LORA_FILE


def lora_of_step(source: str | Path, step: int) -> Path:
    """The LoRA of training step ``step``: ``source`` is the final LoRA file or its state folder."""
    path = Path(source).expanduser()
    state = path if path.is_dir() else state_dir_for(path)
    candidate = step_lora_path(state, step)
    if not candidate.is_file():
        raise UserError(f"{state}: has no checkpoint for step {step} ({candidate} is missing).")
    return candidate


def preview_path(state_dir: Path, step: int) -> Path:
    """The preview grid of training step ``step``."""
    return state_dir / SAMPLES_DIR / f"{step_dir_name(step)}.png"


def lora_display_name(path: Path) -> str:
    """How prompts and PNG metadata name a LoRA: the file's stem, or for a training checkpoint
    (``x.state/step-000100/lora.safetensors``) ``x-step-000100``."""
    if path.name == LORA_FILE and step_of(path.parent) is not None:
        return f"{path.parent.parent.name.removesuffix('.state')}-{path.parent.name}"
    return path.stem


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


def jsonable(value: Any) -> Any:
    """``value`` as JSON data: tensors as numbers or lists, paths as text, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
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
    """Write ``step-N/`` atomically; ``lora_writer(path)`` adds the kohya file; keep the newest ``keep``.

    Every file is written durably into a hidden staging folder, then the folder is renamed into
    place: that rename is the commit point, and the state folder is synced after it."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        final = state_dir / step_dir_name(step)
        staging = Path(tempfile.mkdtemp(dir=state_dir, prefix=f".{final.name}.", suffix=".tmp"))
    except OSError as err:
        raise storage_error(state_dir, err) from None
    try:
        for component, tensors in adapters.items():
            write_safetensors(staging / f"adapter_{component}.safetensors",
                              {k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        opt_tensors, opt_rest = flatten_optimizer(optimizer_state)
        write_safetensors(staging / OPTIMIZER_FILE, opt_tensors)
        if lora_writer is not None:
            lora_writer(staging / LORA_FILE)
        trainer = {"step": step, "optimizer": jsonable(opt_rest), "scheduler": jsonable(scheduler_state),
                   **jsonable(dict(record))}
        write_text(staging / TRAINER_JSON, json.dumps(trainer, indent=1))
        for path in staging.iterdir():  # whatever lora_writer wrote, too
            sync_file(path)
        sync_folder(staging)
        if final.exists():  # saving the same step again (a resumed run that was stopped at once)
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        sync_folder(state_dir)
    except OSError as err:
        raise storage_error(state_dir, err) from None
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
            step = step_of(child)
            if step is not None and (child / TRAINER_JSON).is_file():
                found.append((step, child))
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


def read_record(folder: Path) -> dict:
    """A checkpoint's ``trainer.json``: its step, options, base fingerprint, optimizer scalars."""
    try:
        return json.loads((folder / TRAINER_JSON).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}: unreadable checkpoint ({err}); resume from an older step-N folder.") from None


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict]:
    """(trainer record, {component: adapter tensors}, optimizer state dict)."""
    record = read_record(folder)
    try:
        adapters = {p.stem.removeprefix("adapter_"): load_file(str(p)) for p in sorted(folder.glob("adapter_*.safetensors"))}
        optimizer = unflatten_optimizer(load_file(str(folder / OPTIMIZER_FILE)), record["optimizer"])
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{folder}: unreadable checkpoint ({err}); resume from an older step-N folder.") from None
    return record, adapters, optimizer

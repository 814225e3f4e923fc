"""Folder and file inputs of the nodes stay inside ComfyUI's own folders.

A ComfyUI server started with ``--listen`` runs whatever prompt anyone who can reach it queues.
Like ComfyUI's stock nodes, ours then read only ComfyUI's input, output, temp and model folders:
every path input is resolved (``..`` and symlinks included) and refused at validation when it
lands anywhere else. A relative path is taken from ComfyUI's ``input`` folder (``my_dog`` is
``input/my_dog``).

The operator of a server may lift this for the whole server, never a workflow: start ComfyUI
with ``DBLORA_ALLOW_ANY_PATH=1`` in its environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..errors import UserError

ALLOW_ANY_PATH = "DBLORA_ALLOW_ANY_PATH"


def any_path_allowed() -> bool:
    return os.environ.get(ALLOW_ANY_PATH, "").strip().lower() in ("1", "true", "yes", "on")


def allowed_roots() -> list[Path]:
    """ComfyUI's input, output and temp folders, its models folder and every model folder it knows."""
    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(),
             folder_paths.get_temp_directory(), folder_paths.models_dir]
    for paths, _ in folder_paths.folder_names_and_paths.values():
        roots.extend(paths)
    return [Path(root).resolve() for root in dict.fromkeys(roots)]


def input_subfolders() -> list[str]:
    """The folders under ComfyUI's input folder (relative names), for tooltips and listings."""
    root = Path(folder_paths.get_input_directory())
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir() and not p.name.startswith("."))


def confined(value: str, input_name: str) -> Path:
    """``value`` resolved (relative to ComfyUI's input folder), or a ``UserError`` when it leaves
    ComfyUI's folders and the server's operator has not allowed any path."""
    raw = Path(value.strip()).expanduser()
    path = (raw if raw.is_absolute() else Path(folder_paths.get_input_directory()) / raw).resolve()
    if any_path_allowed() or any(path == root or root in path.parents for root in allowed_roots()):
        return path
    raise UserError(f"{input_name}: {value.strip()!r} is outside ComfyUI's input, output and models folders; put it "
                    f"under {folder_paths.get_input_directory()} (a relative name like 'my_dog' is looked up "
                    f"there), or let this server read any path by starting ComfyUI with {ALLOW_ANY_PATH}=1 (the "
                    "server operator's choice, not a workflow's).")


def problem(value: str, input_name: str) -> str | None:
    """``confined``'s message for ``validate_inputs`` (None when the path is allowed or empty)."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        confined(value, input_name)
    except UserError as err:
        return str(err)
    return None

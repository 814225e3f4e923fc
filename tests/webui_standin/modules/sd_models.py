"""Stand-in of A1111 v1.10.1 ``modules/sd_models.py``: the checkpoint list and the selection.
``CheckpointInfo`` keeps the fields the extension reads (filename, name, title, model_name); the
title carries no hash, as in A1111 before a checkpoint's sha256 is cached."""

import os
import re
import sys

from modules import paths, shared

checkpoints_list = {}
checkpoint_aliases = {}
re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        model_path = os.path.join(paths.models_path, "Stable-diffusion")
        abspath = os.path.abspath(filename)
        name = abspath.replace(model_path, "") if abspath.startswith(model_path) else os.path.basename(filename)
        name = name.lstrip("/\\")
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.name, self.name_for_extra, self.title]

    def register(self):
        checkpoints_list[self.title] = self
        for alias in self.ids:
            checkpoint_aliases[alias] = self


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    model_path = os.path.join(paths.models_path, "Stable-diffusion")
    if os.path.isdir(model_path):
        for root, _, files in os.walk(model_path):
            for file in sorted(files):
                if file.endswith((".ckpt", ".safetensors")) and not file.endswith((".vae.ckpt", ".vae.safetensors")):
                    CheckpointInfo(os.path.join(root, file)).register()


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    checkpoint_info = checkpoint_aliases.get(search_string, None)
    if checkpoint_info is not None:
        return checkpoint_info
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title],
                   key=lambda x: len(x.title))
    if found:
        return found[0]
    search_string_without_checksum = re.sub(re_strip_checksum, "", search_string)
    found = sorted([info for info in checkpoints_list.values() if search_string_without_checksum in info.title],
                   key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():
    """Raises `FileNotFoundError` if no checkpoints are found."""
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = checkpoint_aliases.get(model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError("No checkpoints found.")
    checkpoint_info = next(iter(checkpoints_list.values()))
    if model_checkpoint is not None:
        print(f"Checkpoint {model_checkpoint} not found; loading fallback {checkpoint_info.title}", file=sys.stderr)
    return checkpoint_info

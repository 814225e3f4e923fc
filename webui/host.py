"""What the extension reads from the webui (AUTOMATIC1111 v1.10.1, Forge): its folders, its
checkpoints and the one selected, and the LoRA list to refresh after a run.

Only these functions touch the webui's ``modules``, and only when called (the webui has imported
them by then), so the rest of the adapter is testable without a webui.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

WORK_FOLDER = "dreambooth-lora"  # under the webui's data folder


@dataclass(frozen=True)
class Places:
    lora: Path  # where the webui lists LoRAs (--lora-dir, default models/Lora)
    embeddings: Path  # where it loads textual-inversion embeddings (--embeddings-dir)
    work: Path  # ours: training state, class images, grids, runs

    @property
    def training(self) -> Path:
        return self.work / "training"

    @property
    def class_images(self) -> Path:
        return self.work / "class_images"

    @property
    def grids(self) -> Path:
        return self.work / "grids"

    @property
    def runs(self) -> Path:
        return self.work / "runs"


def places() -> Places:
    from modules import paths, shared

    # --lora-dir is added by the built-in Lora extension's preload.py (default models/Lora).
    lora = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
    embeddings = getattr(shared.cmd_opts, "embeddings_dir", None) or os.path.join(paths.data_path, "embeddings")
    return Places(Path(lora).resolve(), Path(embeddings).resolve(), Path(paths.data_path).resolve() / WORK_FOLDER)


def checkpoint_titles() -> list[str]:
    from modules import sd_models

    return list(sd_models.checkpoint_tiles())


def selected_checkpoint() -> str | None:
    """The title of the checkpoint the webui has selected (its checkpoint dropdown)."""
    from modules import shared, sd_models

    try:
        return sd_models.select_checkpoint().title
    except FileNotFoundError:
        return getattr(shared.opts, "sd_model_checkpoint", None)


def checkpoint_file(title: str | None, field: str = "checkpoint") -> Path:
    """The file of a checkpoint the webui knows, by title, name or hash; None: the selected one."""
    from modules import sd_models

    if not title:
        try:
            info = sd_models.select_checkpoint()
        except FileNotFoundError:
            raise UserError(f"{field}: the webui has no checkpoint; put one into models/Stable-diffusion.") from None
    else:
        info = sd_models.checkpoint_aliases.get(title) or sd_models.get_closet_checkpoint_match(title)
    if info is None or not os.path.isfile(info.filename):
        known = ", ".join(checkpoint_titles()[:5]) or "none"
        raise UserError(f"{field}: {title!r} is not one of the webui's checkpoints (e.g. {known}); use a title from "
                        "GET /sdapi/v1/sd-models or leave it empty for the selected one.")
    return Path(info.filename)


def refresh_loras() -> None:
    """Let the webui list new LoRA files now (the built-in Lora extension's own rescan)."""
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()

"""What every node needs from ComfyUI: devices, memory, progress, cancel, image tensors.

Module-level state only: V3 node classes are locked while they run, so nothing can be stored
on them. Heavy modules are imported inside the functions.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterator

CATEGORY = "DreamBooth LoRA"  # where ComfyUI lists every node of the pack
BASE_TYPE = "DBLORA_BASE"  # a base-model handle: {"path", "dtype", "prediction_type"}
DATASET_TYPE = "DBLORA_DATASET"  # {"dataset": InstanceDataset, "instance_prompt", "identifier", "class_word"}
CLASS_IMAGES_TYPE = "DBLORA_CLASS_IMAGES"  # a folder of class images (str)

_SESSIONS: dict[tuple, Any] = {}  # (path, dtype, prediction_type) → sampling.SamplingSession


def device() -> str:
    import comfy.model_management

    return str(comfy.model_management.get_torch_device())


def free_comfyui_memory() -> None:
    """Move every model ComfyUI holds off the GPU before we load ours (training needs the room)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def release() -> None:
    gc.collect()
    import comfy.model_management

    comfy.model_management.soft_empty_cache()


def load_base(handle: dict):
    """A fresh copy of the base model (training changes the model it is given)."""
    from ..models.load import load_base_model

    return load_base_model(handle["path"], dtype=handle["dtype"], prediction_type=handle["prediction_type"],
                           device=device())


def drop_sessions() -> None:
    _SESSIONS.clear()
    release()


def sampling_session(handle: dict):
    """One sampling session per base model, kept between runs: LoRA patches are undone from
    saved originals, so the cached model is always the clean base underneath."""
    from ..sampling.session import SamplingSession

    key = (handle["path"], handle["dtype"], handle["prediction_type"])
    if key not in _SESSIONS:
        _SESSIONS.clear()  # one base model in memory at a time
        release()
        _SESSIONS[key] = SamplingSession(load_base(handle), handle["path"])
    return _SESSIONS[key]


def interrupted() -> bool:
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def raise_if_interrupted() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


@contextmanager
def cancellable() -> Iterator[None]:
    """Our loops stop on Cancel with KeyboardInterrupt (the CLI's Ctrl-C); ComfyUI wants its own
    exception, which marks the node as interrupted rather than failed."""
    try:
        yield
    except KeyboardInterrupt:
        raise_if_interrupted()
        raise


class CancelWatch:
    """Cancel as a long loop must see it. ComfyUI's progress hook raises on Cancel *and clears
    the flag*, so a progress update inside the training loop must not raise (the trainer would
    stop without saving) nor lose the request: it is remembered here, and the loop's
    should_stop() sees it at the end of the step, saves a checkpoint and stops."""

    def __init__(self):
        self.seen = False

    def __call__(self) -> bool:
        return self.seen or interrupted()

    def quietly(self, function, *args) -> None:
        import comfy.model_management

        try:
            function(*args)
        except comfy.model_management.InterruptProcessingException:
            self.seen = True

    def stop(self) -> None:
        """Tell ComfyUI the node was cancelled (its flag may already be cleared)."""
        import comfy.model_management

        raise comfy.model_management.InterruptProcessingException()


class Progress:
    """ComfyUI's progress bar (a no-op outside a server), with an optional preview picture."""

    def __init__(self, total: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.total = total

    def set(self, value: int, preview=None) -> None:
        self.bar.update_absolute(value, self.total, ("PNG", preview, 512) if preview is not None else None)


@contextmanager
def training_mode() -> Iterator[None]:
    """ComfyUI runs nodes under torch.inference_mode(); training needs autograd back."""
    import torch

    with torch.inference_mode(False), torch.enable_grad():
        yield


def images_to_tensor(images: list) -> Any:
    """PIL images (same size) or float arrays → ComfyUI IMAGE [B, H, W, 3] in [0, 1]."""
    import numpy as np
    import torch

    arrays = [np.asarray(i, dtype=np.float32) / 255.0 if not isinstance(i, np.ndarray) else i for i in images]
    return torch.from_numpy(np.stack(arrays)).float()


def tensor_to_images(tensor) -> list:
    """ComfyUI IMAGE [B, H, W, C] → PIL images."""
    import numpy as np
    from PIL import Image

    array = (tensor.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a[..., :3]) for a in array]

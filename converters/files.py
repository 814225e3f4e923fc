"""Reading any LoRA file: kohya/A1111 or diffusers/PEFT, into an ``Adapter`` for a base model.

Only safetensors are read: a pickled ``.pt``/``.ckpt`` LoRA could run code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .adapter import Adapter, LoraFormatError
from .diffusers import from_diffusers_file
from .kohya import from_kohya, guess_family
from .structure import Structure


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file; check the path.")
    if path.stat().st_size == 0:
        raise LoraFormatError(f"{path}: the file is empty (0 bytes); fetch it again.")
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path}: only .safetensors LoRA files are read (pickled .pt/.ckpt files can run code); convert it to safetensors first.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:120]}); download it again.") from None


def load_adapter(path: str | Path, structure: Structure) -> Adapter:
    """Read a kohya/A1111 or diffusers/PEFT LoRA file into an adapter for ``structure``'s model."""
    path = Path(path).expanduser()
    tensors, metadata = read_lora_file(path)
    if not tensors:
        raise LoraFormatError(f"{path}: holds no tensors; it is not a LoRA.")
    if any(k.startswith("lora_") for k in tensors):
        adapter = from_kohya(tensors, structure, path)
    elif any(".lora_A." in k or ".lora_B." in k for k in tensors):
        adapter = from_diffusers_file(tensors, metadata, structure, path)
    elif any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in tensors):
        raise LoraFormatError(f"{path}: a full checkpoint, not a LoRA; load it as the base model.")
    else:
        raise LoraFormatError(f"{path}: no LoRA tensors (lora_down/lora_up or lora_A/lora_B) in it; it is not a LoRA we can read.")
    adapter.metadata = metadata
    return adapter


def detect_family(path: str | Path) -> str:
    tensors, _ = read_lora_file(path)
    family = guess_family(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()})
    if family is None:
        raise LoraFormatError(f"{path}: cannot tell which base model family this LoRA is for from its keys; pass --base with the checkpoint it belongs to.")
    return family

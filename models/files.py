"""Opening a checkpoint file far enough to know what it holds: keys, shapes, dtypes, metadata.

A safetensors file is read by its header alone (tensors are fetched one by one later); a
pickled ``.ckpt``/``.pt`` is loaded with ``weights_only=True``, so a file holding Python
objects is refused before any of its code can run. Every way a download goes wrong (empty,
cut off, a text page saved under a model's name, a garbled header) becomes one sentence
naming the file and what to do.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..errors import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SAFETENSORS_DTYPES = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "fp8_e4m3", "F8_E5M2": "fp8_e5m2"}
# A header this large is not a model header: it is some other file read as one.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class TensorIndex:
    """What a checkpoint holds, without its data: shapes, dtypes, metadata, a reader."""

    path: Path
    file_format: str  # "safetensors" | "pickle"
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    read: Callable[[str], torch.Tensor]  # key → tensor (CPU)


def _quoted_start(data: bytes) -> str:
    """The first characters of a file's bytes, for a message that shows what the file is."""
    text = data[:40].decode("utf-8", errors="replace").replace("\n", " ").strip()
    return text if text else repr(data[:16])


def _looks_like_text(data: bytes) -> bool:
    if not data:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in data)
    return printable / len(data) > 0.95


def _index_safetensors(path: Path) -> TensorIndex:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, too short to be a safetensors file; the download was probably cut off, download it again.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            start = head + handle.read(56)
            if _looks_like_text(start):
                raise CheckpointError(f"{path}: this is a text file, not a model (it starts with {_quoted_start(start)!r}); point to the .safetensors checkpoint itself.")
            if header_len <= _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: truncated: its header alone needs {header_len + 8} bytes but the file has {size}; download it again.")
            raise CheckpointError(f"{path}: not a safetensors file (its first bytes are no safetensors header); use a .safetensors or .ckpt Stable Diffusion checkpoint.")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON); download the file again.") from None
    metadata = header.pop("__metadata__", None) or {}
    shapes, dtypes, data_end = {}, {}, 0
    for key, entry in header.items():
        try:
            shapes[key] = tuple(entry["shape"])
            dtypes[key] = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
            data_end = max(data_end, entry["data_offsets"][1])
        except (TypeError, KeyError, IndexError):
            raise CheckpointError(f"{path}: corrupt safetensors header (entry {key!r} is malformed); download the file again.") from None
    available = size - 8 - header_len
    if data_end > available:
        raise CheckpointError(f"{path}: truncated: its tensors need {data_end + 8 + header_len} bytes but the file has {size} ({100 * size / (data_end + 8 + header_len):.0f}%); download it again.")

    def read(key: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    return TensorIndex(path, "safetensors", shapes, dtypes, {str(k): str(v) for k, v in metadata.items()}, read)


def _index_pickle(path: Path) -> TensorIndex:
    with path.open("rb") as handle:
        start = handle.read(64)
    if not (start.startswith(b"PK\x03\x04") or start[:1] == b"\x80"):
        if _looks_like_text(start):
            raise CheckpointError(f"{path}: this is a text file, not a model (it starts with {_quoted_start(start)!r}); point to the checkpoint itself.")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip or pickle signature); use a .safetensors or .ckpt Stable Diffusion checkpoint.")
    try:
        # weights_only: a .ckpt is a pickle, and a pickle can run code. We accept tensors and
        # plain containers only; anything else is refused before it can execute.
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=start.startswith(b"PK"))
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0][:160]
        raise CheckpointError(f"{path}: refused to load: it holds Python objects, not only tensors, and loading those could run code ({reason}); convert it to .safetensors with a tool you trust, or use a .safetensors download.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch file ({str(err).splitlines()[0][:120]}); download it again.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors; it is not a Stable Diffusion checkpoint.")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return TensorIndex(path, "pickle", {k: tuple(v.shape) for k, v in tensors.items()},
                       {k: str(v.dtype).replace("torch.", "").replace("float", "fp") for k, v in tensors.items()},
                       {}, tensors.__getitem__)


def index_checkpoint(path: str | Path) -> TensorIndex:
    """Open a single-file checkpoint far enough to know its keys and shapes."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; check the path.")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder without model_index.json, so not a diffusers model folder; point to a .safetensors/.ckpt file or a diffusers folder.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the download or copy failed, fetch it again.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _index_pickle(path)
    return _index_safetensors(path)

"""One durable writer for every user-visible file, and the fingerprint of a model file.

A write goes to a temporary file beside the target, is flushed and fsynced, renamed over the
target, and then the folder is fsynced: after a crash or power loss the target is either the
old file or the complete new one, never empty or half-written. A full disk, a read-only
folder or a missing permission becomes one sentence naming the folder (``StorageError``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Mapping

from ..errors import UserError

_FINGERPRINT_SAMPLES = 16
_SAMPLE_BYTES = 1 << 16


class StorageError(UserError):
    """A file could not be written: disk full, read-only, permission denied."""


def storage_error(folder: Path, err: OSError, needed: int | None = None) -> StorageError:
    """One sentence for an OSError of a write into ``folder``."""
    free = free_bytes(folder)
    sizes = (f" ({_size(needed)} needed, {_size(free)} free)" if needed is not None and free is not None
             else f" ({_size(free)} free)" if free is not None else "")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"the disk is full{sizes}; free some space or choose another folder"
    elif err.errno == errno.EROFS:
        why = "the file system is read-only; choose another folder"
    elif err.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied; choose a folder you can write to"
    else:
        why = f"{err.strerror or err}"
    return StorageError(f"{folder}: cannot write there: {why}.")


def _size(count: int | None) -> str:
    if count is None:
        return "?"
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return str(count)


def free_bytes(folder: Path) -> int | None:
    """Free bytes for this user on the file system of ``folder`` (its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def sync_folder(folder: Path) -> None:
    """fsync a folder, so the renames in it survive a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    """fsync a file written by someone else's writer (e.g. into a staging folder before its rename)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite (or choose another name) to replace it.")


def _durably(path: Path, fill, needed: int | None = None) -> Path:
    """Run ``fill(temporary path)``, fsync it, rename it to ``path``, fsync the folder."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + path.name + ".", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise storage_error(folder, err, needed) from None
    try:
        fill(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        sync_folder(folder)
    except OSError as err:
        raise storage_error(folder, err, needed) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> Path:
    path = Path(path)
    _check_target(path, overwrite)

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return _durably(path, fill, len(data))


def write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    return write_bytes(path, text.encode(), overwrite)


def write_safetensors(path: str | Path, tensors: Mapping, metadata: Mapping[str, str] | None = None,
                      overwrite: bool = True) -> Path:
    """A safetensors file (tensors made contiguous; ``metadata`` as its string header)."""
    from safetensors.torch import save_file

    path = Path(path)
    _check_target(path, overwrite)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    needed = sum(v.numel() * v.element_size() for v in contiguous.values())
    return _durably(path, lambda tmp: save_file(contiguous, tmp, metadata=dict(metadata or {})), needed)


def copy_file(source: str | Path, path: str | Path, overwrite: bool = True) -> Path:
    """Copy so that ``path`` never exists half-written (UIs list model folders live)."""
    path = Path(path)
    _check_target(path, overwrite)
    return _durably(path, lambda tmp: shutil.copyfile(source, tmp), Path(source).stat().st_size)


def png_bytes(image, parameters: str | None = None) -> bytes:
    """A PIL image as PNG bytes, with A1111's ``parameters`` text chunk when given."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    buffer = BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(image, path: str | Path, parameters: str | None = None, overwrite: bool = True) -> Path:
    return write_bytes(path, png_bytes(image, parameters), overwrite)


def confined_name(folder: str | Path, name: str) -> Path:
    """``folder/name`` for a user-given file name, refusing names that would leave the folder."""
    folder = Path(folder).resolve()
    candidate = (folder / name).resolve()
    if not name or name != Path(name).name or candidate.parent != folder:
        raise UserError(f"{name!r}: give a plain file name (no folders or '..'); the file is written into {folder}.")
    return candidate


def fingerprint(path: str | Path) -> str:
    """A fast identity for a checkpoint (file or diffusers folder): sha256 over its size, its
    safetensors header(s) and 16 evenly spaced 64 KB samples of the data. Reading a 2–7 GB file
    whole would take longer than many prior runs; any retrain or merge changes the samples."""
    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")) \
        if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            if file.suffix == ".safetensors" and size >= 8:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                digest.update(handle.read(min(header_len, size - 8)))
            for index in range(_FINGERPRINT_SAMPLES):
                handle.seek(max(0, size * index // _FINGERPRINT_SAMPLES))
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def file_stamp(path) -> tuple[int, int] | None:
    """What tells a rewritten file from the one read before (modification time, size); None if absent."""
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    info = path.stat()
    return info.st_mtime_ns, info.st_size

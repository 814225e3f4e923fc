"""Exclusive locks for what one run owns: a training run's state folder (and so its output), a
class-prior cache entry.

A lock is an OS file lock (``filelock``, which ComfyUI itself uses) on ``<folder>/.lock``, held
for the whole run. The kernel drops it when its process dies, however it dies, so a lock left
by a killed run is simply taken by the next one. Beside it, ``.lock.owner`` says who holds it
(pid, host, start time, what), so a second run can refuse at once and name the holder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"


class LockHeld(UserError):
    """Another run holds the lock."""


def _owner(folder: Path) -> str:
    try:
        record = json.loads((folder / OWNER_FILE).read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"]))
        return f"{record['what']} (pid {record['pid']} on {record['host']}, started {started})"
    except (OSError, ValueError, KeyError):
        return "another process (it has not said who it is yet)"


@contextmanager
def exclusive(folder: str | Path, what: str, hint: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the ``with`` block, or raise ``LockHeld`` at once, naming the holder.

    ``what`` says what this run is ("training run", "class-prior run"); ``hint`` is what the user
    can do instead, for the message."""
    import filelock

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise LockHeld(f"{folder}: in use by {_owner(folder)}; {hint}.") from None
    try:
        record = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        (folder / OWNER_FILE).write_text(json.dumps(record))
        yield
    finally:
        try:
            (folder / OWNER_FILE).unlink()
        except OSError:
            pass
        lock.release()

"""The peak memory of a piece of work, measured the way the planner predicts it.

    meter = PeakMeter(device)      # before loading anything
    ...                            # the run
    meter.peak()                   # bytes

On CUDA: ``torch.cuda.max_memory_allocated`` since the meter started — the whole amount, not an
increase, because a GPU budget is the whole card (the CUDA context itself, a few hundred MB,
is outside the allocator and outside this number). On the CPU: the growth of the process's
resident memory (RSS) over what it held when the meter started. On Linux the kernel's own
high-water mark is reset at the start (``/proc/self/clear_refs``) and read at the end, so no
short peak between samples is missed; elsewhere the process's lifetime peak (``ru_maxrss``) is
used, which overstates the run's peak when the process was larger before it.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match[1]) * 1024 if match else None


def resident_bytes() -> int:
    """The process's resident memory now (Linux), else its lifetime peak."""
    now = _status_bytes("VmRSS")
    return now if now is not None else _lifetime_peak()


def _lifetime_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "5": reset the peak RSS to the current RSS (Linux ≥ 4.0)
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


class PeakMeter:
    """The peak memory from now on, on ``device`` (see the module's docstring for what it counts)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start, self.exact = 0, True
            self.what = "peak allocated VRAM"
        else:
            self.exact = _reset_high_water_mark()
            self.start = resident_bytes()
            self.what = "peak resident-memory growth" if self.exact else "lifetime peak RSS growth (no /proc)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        high = _status_bytes("VmHWM") if self.exact else _lifetime_peak()
        return max(0, (high or 0) - self.start)


GIB = 2**30


def gigabytes(count: float) -> str:
    """Bytes as GiB (what a "8 GB" graphics card has: 8 GiB), or MiB below 0.1 GiB."""
    return f"{count / GIB:.2f} GiB" if count >= 0.1 * GIB else f"{count / 2**20:.0f} MiB"

"""Exclusive locks with real processes: a second holder is refused at once and told who holds
the lock; a lock left by a killed process is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dreambooth_lora.runtime.locks import LockHeld, exclusive

HOLDER = """
import sys, time
from dreambooth_lora.runtime.locks import exclusive
with exclusive(sys.argv[1], "training run", "wait"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_another_process(folder) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_holder_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path):
    process = hold_in_another_process(tmp_path / "run.state")
    try:
        started = time.perf_counter()
        with pytest.raises(LockHeld, match=rf"in use by training run \(pid {process.pid} on .+, started 20\d\d-"):
            with exclusive(tmp_path / "run.state", "training run", "wait for it or choose another --output"):
                pass
        assert time.perf_counter() - started < 2  # refused at once, not after waiting
    finally:
        os.kill(process.pid, signal.SIGKILL)  # dies holding the lock: no clean-up runs
        process.wait()
    with exclusive(tmp_path / "run.state", "training run", "wait"):  # the kernel dropped the dead one's lock
        owner = (tmp_path / "run.state" / ".lock.owner").read_text()
        assert f'"pid": {os.getpid()}' in owner
    assert not (tmp_path / "run.state" / ".lock.owner").exists()


def test_the_same_process_cannot_hold_a_lock_twice(tmp_path):
    with exclusive(tmp_path, "class-prior run", "wait"):
        with pytest.raises(LockHeld, match="in use by class-prior run"):
            with exclusive(tmp_path, "class-prior run", "wait"):
                pass

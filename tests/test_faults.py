"""Nothing lost, nobody let in: two runs on one output, a full disk, a long run's memory.

Real processes and a real (small) tmpfs; the tmpfs test skips with a message where mounting is
not allowed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreambooth_lora.fixtures.checkpoints import fixture_path
from dreambooth_lora.trainer.checkpoint import list_checkpoints, step_of

from test_trainer import make_photos, tiny_job

CLI = [sys.executable, "-m", "dreambooth_lora.cli"]


def train_command(tmp_path: Path, output: Path, steps: int, save_every: int, *extra: str) -> list[str]:
    return CLI + ["train", "--base", str(fixture_path("sd1-tiny")), "--instance-dir", str(make_photos(tmp_path / "photos")),
                  "--prior-preservation", "off", "--output", str(output), "--steps", str(steps), "--resolution", "64",
                  "--rank", "4", "--alpha", "4", "--seed", "3", "--save-every", str(save_every),
                  "--learning-rate", "1e-3", *extra]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"the first run ended early ({process.returncode})"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_run_on_the_same_output_is_refused_at_once_and_a_dead_runs_lock_is_taken_over(tmp_path):
    output = tmp_path / "twin.safetensors"
    first = subprocess.Popen(train_command(tmp_path, output, 100000, 5), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(output.with_name("twin.state") / "step-000005", first)
        started = time.perf_counter()
        second = subprocess.run(train_command(tmp_path, output, 20, 5), capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - started
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by a training run (pid {first.pid} on " in second.stderr and "started 20" in second.stderr
        assert "choose another --output" in second.stderr and "Traceback" not in second.stderr
        print(f"\nsecond run refused after {seconds:.1f} s (process start and imports included)")
        assert "training" not in second.stderr.split("error:")[0]  # refused before any step
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.wait()
    state = output.with_name("twin.state")
    kept = list_checkpoints(state)[-1]
    resumed = subprocess.run(train_command(tmp_path, output, step_of(kept) + 2, 5, "--resume", str(state)),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert output.exists() and f"resumed from {kept}" in resumed.stdout + resumed.stderr


def checkpoint_bytes(state: Path) -> int:
    step = list_checkpoints(state)[0]
    return sum(p.stat().st_size for p in step.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A fresh tmpfs of a given size (bytes), unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_says_where_and_keeps_the_last_good_checkpoint(tmp_path, small_disk):
    measured = subprocess.run(train_command(tmp_path, tmp_path / "probe.safetensors", 2, 1), capture_output=True,
                              text=True, timeout=300)
    assert measured.returncode == 0, measured.stderr[-2000:]
    size = checkpoint_bytes(tmp_path / "probe.state")
    disk = small_disk((size * 5 // 2) // 4096 * 4096)  # room for two checkpoints, not three
    output = disk / "full.safetensors"
    result = subprocess.run(train_command(tmp_path, output, 50, 1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    print(f"\ncheckpoint {size} bytes on a {(size * 5 // 2) // 4096 * 4096}-byte tmpfs:\n{message[0]}")
    state = disk / "full.state"
    assert f"{state}: cannot write there: the disk is full (" in message[0] and " needed, " in message[0]
    kept = list_checkpoints(state)
    assert kept and f"the last good checkpoint {kept[-1]} is kept" in message[0]
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]  # no half-written checkpoint
    assert not output.exists()
    # the run stays resumable: with room again it continues from that checkpoint
    shutil.copytree(state, tmp_path / "full.state", symlinks=True)
    resumed = subprocess.run(train_command(tmp_path, tmp_path / "full.safetensors", step_of(kept[-1]) + 1, 1,
                                           "--resume", str(tmp_path / "full.state")),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_memory_stays_flat_over_a_long_run(tmp_path):
    """Resident memory over 2,000 steps on the tiny model: after warm-up it must not grow (a leak of
    one tensor per step would show as a clear slope). Prints the slope."""
    import resource

    from dreambooth_lora.trainer.loop import train

    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize() / 2**20

    samples: list[tuple[int, float]] = []

    def on_step(row: dict) -> None:
        if row["step"] % 50 == 0:
            samples.append((row["step"], rss_mb()))

    train(tiny_job(tmp_path, steps=2000, prior_preservation="off", save_every=500, keep_checkpoints=1),
          on_step=on_step)
    late = [(s, m) for s, m in samples if s >= 500]  # allocator warm-up and the first checkpoint are done
    n = len(late)
    mean_s, mean_m = sum(s for s, _ in late) / n, sum(m for _, m in late) / n
    slope = sum((s - mean_s) * (m - mean_m) for s, m in late) / sum((s - mean_s) ** 2 for s, _ in late)
    print(f"\nRSS {late[0][1]:.0f} MB at step {late[0][0]}, {late[-1][1]:.0f} MB at step {late[-1][0]}; "
          f"slope {slope * 1000:.2f} MB per 1000 steps")
    assert slope * 1000 < 5.0  # MB per 1000 steps

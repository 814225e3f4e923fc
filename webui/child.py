"""One run of the webui tab or API, inside the training environment (never the webui's Python):
the ``dreambooth-lora`` command with the run's arguments, then its results copied where the
webui lists them.

    <training python> <extension>/webui/child.py <run folder>

``run.json`` in the run folder holds the arguments and what to publish (runs.py writes it); the
parent sends this process's output to ``console.log``; ``result.json`` records how it ended. The
command itself is a process of its own, ``python -m dreambooth_lora.cli …`` (the training venv
links the package; webui/environment.py), and a ``stop`` file appearing in the run folder becomes
one SIGINT to it: the CLI's own Ctrl-C path, so training stops after the current step and saves
a checkpoint; ``stop-now`` sends the second Ctrl-C (quit at once, the last checkpoint kept).
Windows has no SIGINT for another process: there a stop is CTRL_BREAK, which ends the command at
once and keeps the last saved checkpoint.

Training writes into the work folder and the LoRA is copied into the webui's LoRA folder only
when it is complete: the webui lists every .safetensors under that folder, and a state folder
there would show checkpoints, optimizer states and half-written runs as LoRAs.
"""

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

POLL_SECONDS = 0.5


def run_cli(argv: list, run_dir: Path) -> int:
    """``dreambooth-lora ARGV`` as a process sharing this one's output. The ``stop`` file → one
    SIGINT (stop after this step, keep a checkpoint); ``stop-now`` → a second one (quit at once,
    as a second Ctrl-C: e.g. while class images are still being made, which the first one waits for)."""
    windows = os.name == "nt"
    process = subprocess.Popen([sys.executable, "-m", "dreambooth_lora.cli", *argv], stdin=subprocess.DEVNULL,
                               creationflags=subprocess.CREATE_NEW_PROCESS_GROUP if windows else 0)
    sent = 0
    while process.poll() is None:
        wanted = 2 if (run_dir / "stop-now").exists() else 1 if (run_dir / "stop").exists() else 0
        while sent < wanted and process.poll() is None:
            process.send_signal(signal.CTRL_BREAK_EVENT if windows else signal.SIGINT)
            sent += 1
            time.sleep(POLL_SECONDS)  # let the CLI's handler take the first before the second arrives
        time.sleep(POLL_SECONDS)
    return process.returncode


def publish(record: dict) -> list:
    """Copy the finished results into the webui's folders; returns the files written."""
    from dreambooth_lora.runtime.files import confined_name, copy_file, write_text

    written = []
    for item in record.get("publish", []):
        if Path(item["source"]).is_file():  # an embedding exists only with new tokens
            written.append(str(copy_file(item["source"], confined_name(item["folder"], item["name"]))))
    preview = record.get("preview")
    if preview and record.get("state_dir") and written:
        grids = sorted((Path(record["state_dir"]) / "samples").glob("step-*.png"))
        if grids:
            written.append(str(copy_file(grids[-1], confined_name(preview["folder"], preview["name"]))))
    for item in record.get("sidecars", []):
        if written:
            written.append(str(write_text(confined_name(item["folder"], item["name"]), item["text"])))
    return written


def main(run_dir: Path) -> int:
    record = json.loads((run_dir / "run.json").read_text())
    print("$ dreambooth-lora " + " ".join(record["argv"]), flush=True)
    result = {"rc": None, "published": [], "error": None}
    try:
        result["rc"] = run_cli(record["argv"], run_dir)
        if result["rc"] == 0:
            result["published"] = publish(record)
            for path in result["published"]:
                print(f"published {path}", flush=True)
        elif (run_dir / "stop").exists() and result["rc"] != 2:  # stopped as asked (2: the CLI's own error)
            result["rc"] = 130
    except Exception as err:  # publishing failed (disk full, ...): the gist in the result, the rest in the console
        traceback.print_exc()
        result["rc"], result["error"] = 1, f"{type(err).__name__}: {err}"
    result["finished"] = time.time()
    temporary = run_dir / "result.json.tmp"
    temporary.write_text(json.dumps(result, indent=1))
    os.replace(temporary, run_dir / "result.json")
    return result["rc"]


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder: its modules must not shadow top-level ones (e.g. `progress`)
    sys.exit(main(Path(sys.argv[1]).resolve()))

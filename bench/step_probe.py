"""Run a training program unchanged and write the wall-clock time of each optimizer step.

    python bench/step_probe.py STAMPS script.py ARGS...     # a script, as `python script.py ARGS`
    python bench/step_probe.py STAMPS -m module ARGS...     # a module, as `python -m module ARGS`

Every optimizer step of every torch optimizer in the process (torch's global step post-hook,
so the program's code is not touched) appends one line, `time.time()` after the step, to
STAMPS. `bench/peers.py` starts each peer through this, so the time from the process's start
to its first step is measured the same way for every trainer.
"""

from __future__ import annotations

import os
import runpy
import sys
import time


def main() -> None:
    stamps_path, target, *rest = sys.argv[1:]
    stamps = open(stamps_path, "a", buffering=1)  # line-buffered: a killed run keeps its lines

    from torch.optim.optimizer import register_optimizer_step_post_hook

    def after_step(_optimizer, _args, _kwargs) -> None:
        stamps.write(f"{time.time():.6f}\n")

    register_optimizer_step_post_hook(after_step)
    if target == "-m":
        module, *rest = rest
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python script.py` would
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()

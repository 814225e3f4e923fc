"""How often does a training step make the CPU wait for the GPU?

    python bench/syncs.py [--fixture sd1-tiny] [--steps 10]      # needs CUDA

Runs the trainer under torch.cuda.set_sync_debug_mode("warn") from the 4th step on, records
every synchronising CUDA call with the line of our code that made it, and prints the count per
step and the places. By design there is one per step: the previous step's losses are read
(see `LossLog.settle` in trainer/logs.py), which waits only for work that is already done or nearly so.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import traceback
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="sd1-tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from train import make_images

    from dreambooth_lora.fixtures.checkpoints import fixture_path
    from dreambooth_lora.trainer.job import TrainJob
    from dreambooth_lora.trainer.loop import train

    work = Path(tempfile.mkdtemp())
    photos, classes = make_images(work / "p", 4, args.resolution, 0), make_images(work / "c", 4, args.resolution, 1)
    places: collections.Counter = collections.Counter()
    counting = {"on": False, "count": 0}
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if counting["on"] and "synchronizing" in str(message):
            counting["count"] += 1
            ours = [f for f in traceback.extract_stack()[:-1] if "dreambooth_lora" in f.filename or "/trainer/" in f.filename]
            where = ours[-1] if ours else traceback.extract_stack()[-2]
            places[f"{Path(where.filename).name}:{where.lineno} {where.line}"] += 1
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = record
    warnings.simplefilter("always")

    def poll() -> bool:  # called once per step, at its end
        poll.steps += 1
        if poll.steps == 3:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            counting["on"] = True
        if poll.steps == args.steps - 1:  # before the final step's save
            counting["on"] = False
            torch.cuda.set_sync_debug_mode("default")
        return False
    poll.steps = 0

    options = {"resolution": args.resolution, "steps": args.steps, "rank": 4, "alpha": 4, "save_every": 0,
               "prior_preservation": "class_images", "mixed_precision": "bf16", "seed": 0}
    job = TrainJob(base=str(fixture_path(args.fixture)), output=str(work / "o.safetensors"),
                   instance_dir=str(photos), class_dir=str(classes), options=options)
    train(job, should_stop=poll)
    counted_steps = args.steps - 1 - 3
    print(f"{counting['count']} synchronising CUDA calls in {counted_steps} steps "
          f"({counting['count'] / counted_steps:.2f} per step)")
    for place, count in places.most_common():
        print(f"  {count:>4}  {place}")


if __name__ == "__main__":
    main()

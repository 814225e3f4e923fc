"""`dreambooth-lora train`: the DreamBooth LoRA trainer; `dreambooth-lora plan`: its peak memory
predicted before it runs, and the fastest settings that fit (``planner``; registered here because it
takes the train command's own flags).

Runs as is on one device, and unchanged under `accelerate launch --num_processes N` (or
`torchrun --nproc_per_node N`): every process trains its share of each batch, only the main
process writes files.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..converters.options import SAVE_OPTIONS
from ..models.options import PREDICTION_TYPE
from ..options import OptionSet
from ..planner.options import MEMORY_OPTIONS, PLAN_OPTIONS
from .options import ALL_OPTIONS

# What `plan` chooses itself, so it takes no flags for them.
CHOSEN_BY_PLAN = {*(o.name for o in MEMORY_OPTIONS), "gradient_checkpointing"}

LOAD = OptionSet(PREDICTION_TYPE)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="Train a DreamBooth LoRA (prior preservation, SD1.x/SD2.x/SDXL); resumable.",
        description="Trains a LoRA that binds --identifier to the subject in --instance-dir and writes it as a "
                    "kohya/A1111 file to --output. Checkpoints, the loss log and previews go to "
                    "'<output stem>.state/'; --resume continues from there. Ctrl-C stops after the current "
                    "step and saves a checkpoint (a second Ctrl-C quits at once). --mode style --new-tokens N learns a style "
                    "with new tokens (pivotal tuning); --no-train-unet with --new-tokens is textual inversion alone.")
    parser.add_argument("--base", required=True, help="The base checkpoint (.safetensors/.ckpt or diffusers folder).")
    parser.add_argument("--instance-dir", required=True, help="Folder with 3-20 photos of the subject.")
    parser.add_argument("--class-dir", help="Class images: a folder of your own class photos, or a cache folder "
                                            "where the missing generated ones are made (see `dreambooth-lora priors`).")
    parser.add_argument("--output", required=True, help="The LoRA file to write (.safetensors, kohya/A1111 format).")
    parser.add_argument("--embedding-output", metavar="FILE", help="With --new-tokens: where the learned embedding "
                        "goes (A1111/ComfyUI embeddings format; its file name is the prompt name, embedding:NAME in "
                        "ComfyUI). Default '<output stem>_emb.safetensors'; textual inversion alone writes it to --output.")
    parser.add_argument("--resume", metavar="DIR|auto", help="Continue from '<output>.state' (its newest checkpoint) "
                        "or one step-N folder in it. 'auto': continue --output's own run if its settings match, do "
                        "nothing if that run is complete, else start afresh (its old state folder is replaced).")
    ALL_OPTIONS.add_to_parser(parser)
    LOAD.add_to_parser(parser)
    SAVE_OPTIONS["overwrite"].add_to_parser(parser)
    parser.set_defaults(run=run)

    plan = subparsers.add_parser(
        "plan", help="Predict a training run's peak memory and choose the fastest settings that fit --vram.",
        description="Predicts the peak memory of `train` with these options for each way of running it (base "
                    "precision: training precision or fp8; gradient checkpointing; offload, on CUDA), fastest first, "
                    "and names the fastest that fits --vram GiB. Reads the checkpoint's shapes only: nothing is "
                    "loaded, and a GPU can be planned for on a machine without one (--device cuda). Takes every "
                    "`train` option; `train --fit-to-vram GB` makes the same choice by itself. Exit status 1 when "
                    "nothing fits.")
    plan.add_argument("--base", required=True, help="The base checkpoint (.safetensors/.ckpt or diffusers folder).")
    plan.add_argument("--class-dir", help="As for train: whether class images are still to be generated there "
                                          "(a phase of its own) is read from it.")
    PLAN_OPTIONS.add_to_parser(plan)
    OptionSet(*(o for o in ALL_OPTIONS if o.name not in CHOSEN_BY_PLAN)).add_to_parser(plan)
    plan.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    import json

    from ..planner.core import Planner
    from ..planner.report import generates_class_images
    from ..runtime.memory import GIB, gigabytes
    from .job import TrainJob, resolve_settings

    settings = resolve_settings(ALL_OPTIONS.values(args))
    job = TrainJob(base=args.base, output="plan.safetensors", class_dir=args.class_dir)
    planner = Planner(args.base, settings, args.device, class_images=generates_class_images(job, settings))
    plan = planner.plan(int(args.vram * GIB))
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(plan.table())
        if plan.chosen is not None:
            changes = plan.chosen.candidate.changes()
            flags = [f"--base-precision {changes['base_precision']}"] + \
                [f"--{'' if changes[name] else 'no-'}{name.replace('_', '-')}" for name in ("gradient_checkpointing", "offload")]
            print(f"train with: {' '.join(flags)}   (or: --fit-to-vram {args.vram:g})")
    return 0 if plan.chosen is not None else 1


def run(args: argparse.Namespace) -> int:
    from .job import TrainJob, TrainingStopped
    from .loop import train

    stop_requested = []

    def on_sigint(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(True)
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    job = TrainJob(base=args.base, output=args.output, options=ALL_OPTIONS.values(args),
                   instance_dir=args.instance_dir, class_dir=args.class_dir, resume=args.resume,
                   overwrite=args.overwrite, load_options=LOAD.values(args), embedding_output=args.embedding_output)
    try:
        result = train(job, should_stop=lambda: bool(stop_requested))
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.already_done:
        print(f"{result.output}: already trained with these settings ({result.steps_done} steps); nothing to do "
              "(raise --steps to train on).")
    return 0

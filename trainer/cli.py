"""`dreambooth-lora train`: the DreamBooth LoRA trainer.

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
from .options import ALL_OPTIONS

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

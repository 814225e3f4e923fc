"""`dreambooth-lora inspect CKPT`: what a base model is, and proof that it loads."""

from __future__ import annotations

import argparse
import json

from .options import INSPECT_OPTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="Detect a checkpoint's family, prediction type, resolution and sizes, and load it.",
        description="Read a .safetensors/.ckpt checkpoint or a diffusers folder, report what it is "
                    "(SD1.x / SD2.x / SDXL, epsilon or v-prediction, native resolution, component sizes) "
                    "and, unless --quick, load it as diffusers components to prove it works offline.")
    parser.add_argument("checkpoint", help="Path to a .safetensors or .ckpt file, or a diffusers model folder.")
    INSPECT_OPTIONS.add_to_parser(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .inspect import describe, inspect
    from .load import load_base_model

    opts = INSPECT_OPTIONS.values(args)
    if opts["quick"]:
        info, load_seconds, dtype = inspect(args.checkpoint, opts["prediction_type"]), None, None
    else:
        model = load_base_model(args.checkpoint, opts["dtype"], opts["prediction_type"])
        info, load_seconds, dtype = model.info, model.load_seconds, model.dtype
    if opts["json"]:
        report = info.to_json()
        report["load_seconds"] = load_seconds
        print(json.dumps(report, indent=1, default=str))
    else:
        print(describe(info, load_seconds, dtype))
    return 0

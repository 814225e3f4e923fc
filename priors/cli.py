"""`dreambooth-lora priors`: make (or reuse) class-prior images with the frozen base model."""

from __future__ import annotations

import argparse

from ..models.options import LOAD_OPTIONS
from .options import PRIOR_OPTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "priors", help="Generate class-prior images, cached per model and prompt; only missing ones are made.",
        description="Generates --num-class-images images of --class-prompt with the frozen base model into a "
                    "cache under --out (one entry per model, prompt, size and sampler settings). Asking again "
                    "reuses what is there and generates only the missing ones; Ctrl-C keeps every finished image.")
    parser.add_argument("--base", required=True, help="The base checkpoint (.safetensors/.ckpt or diffusers folder).")
    parser.add_argument("--out", required=True, help="Cache root folder for class images.")
    parser.add_argument("--num", dest="num_class_images", type=PRIOR_OPTIONS["num_class_images"].argparse_type,
                        help="Alias of --num-class-images.")
    PRIOR_OPTIONS.add_to_parser(parser)
    LOAD_OPTIONS.add_to_parser(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.devices import default_device
    from ..models.load import load_base_model
    from .core import generate_priors

    opts = PRIOR_OPTIONS.values(args)
    device = default_device()
    base = load_base_model(args.base, **LOAD_OPTIONS.values(args), device=device)
    result = generate_priors(base, args.base, args.out, opts["num_class_images"], opts["class_prompt"],
                             opts["negative_prompt"], opts["steps"], opts["guidance"], opts["sampler"], opts["seed"],
                             opts["resolution"])
    rate = f", {result.images_per_second:.2f} images/s" if result.generated else ""
    print(f"{result.folder}: {len(result.paths)} class images ({result.reused} reused, {result.generated} generated"
          f"{rate})")
    return 0

"""`dreambooth-lora dataset DIR`: check the instance photos and show what will be done to each."""

from __future__ import annotations

import argparse

from .options import DATA_OPTIONS, PROMPT_OPTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dataset", help="Check instance photos and report per image what loading does to it.",
        description="Reads the folder as training would (EXIF rotation, transparency, grayscale/CMYK/16-bit, "
                    "scaling and cropping or buckets, captions) and reports per image; unusable files are "
                    "listed with the reason.")
    parser.add_argument("folder", help="Folder with the subject's photos (jpg, jpeg, png, webp, bmp).")
    (DATA_OPTIONS + PROMPT_OPTIONS).add_to_parser(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .core import load_folder

    prompts = PROMPT_OPTIONS.values(args)
    dataset = load_folder(args.folder, prompts["instance_prompt"], prompts["identifier"], prompts["class_word"],
                          **DATA_OPTIONS.values(args))
    print(dataset.report())
    return 0

"""The `dreambooth-lora` command. Each stage registers its own subcommands."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake gets one line that names the option and where help is, not the
    whole usage text (subcommands inherit this class)."""

    def error(self, message: str):
        self.exit(2, f"error: {message.rstrip('.')}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    from .converters import cli as converters_cli
    from .data import cli as data_cli
    from .identifiers import cli as identifiers_cli
    from .priors import cli as priors_cli
    from .sampling import cli as sampling_cli
    from .evaluation import cli as evaluation_cli
    from .trainer import cli as trainer_cli
    from .fixtures import cli as fixtures_cli
    from .models import cli as models_cli
    from .shapes import cli as shapes_cli

    parser = OneLineParser(
        prog="dreambooth-lora",
        description="DreamBooth LoRA for Stable Diffusion 1.x / 2.x / XL: the command-line side of the ComfyUI pack.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in (models_cli, data_cli, identifiers_cli, priors_cli, trainer_cli, converters_cli, sampling_cli,
                  evaluation_cli, shapes_cli, fixtures_cli):
        stage.register(subparsers)
    parser.set_defaults(subcommands=subparsers.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the subcommand, whose --help lists what it takes
        args.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args) or 0
    except UserError as err:
        # Bad input is the user's to fix: one sentence, no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into `head` and closed early: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every subcommand's --help renders (argparse formats help texts with %, so one stray % breaks it)."""

from __future__ import annotations

import pytest

from dreambooth_lora.cli import build_parser, main

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_all_stages_are_registered():
    assert {"inspect", "dataset", "identifiers", "priors", "train", "convert", "lora-info", "fixture", "sample", "grid",
            "eval", "best", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out

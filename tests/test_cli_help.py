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


@pytest.mark.parametrize("argv, named", [
    (["train", "--steps", "abc"], "--steps"),
    (["train", "--learning-rate", "nan"], "--learning-rate"),
    (["train", "--learning-rate", "inf"], "--learning-rate"),
    (["train", "--resolution", "65"], "--resolution"),
    (["sample", "--guidance", "-inf"], "--guidance"),
    (["train", "--base", "m.safetensors", "--instance-dir", "photos", "--output", "o.safetensors", "--no-such-option"],
     "--no-such-option"),
    (["train", "--base", "m.safetensors"], "--instance-dir"),
])
def test_a_bad_option_gets_one_line_naming_it_before_any_work(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # no usage dump
    assert named in err and f"see `dreambooth-lora {argv[0]} --help`" in err

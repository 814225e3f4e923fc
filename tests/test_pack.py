"""The repository as a ComfyUI pack and as an installed package; options defined once."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth_lora.errors import UserError
from dreambooth_lora.models.options import INSPECT_OPTIONS, LOAD_OPTIONS
from dreambooth_lora.options import Option, OptionSet

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "peft", "transformers", "accelerate", "safetensors", "comfy", "numpy")


def test_pack_import_is_light_and_fast():
    """Import the root the way ComfyUI does (path-derived module name): nothing heavy comes with it."""
    code = f"""
import importlib.util, sys, time, json
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("custom_nodes_x_DreamBooth", {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module; spec.loader.exec_module(module)
elapsed = time.perf_counter() - start
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
import inspect
print(json.dumps({{"seconds": elapsed, "heavy": heavy, "entry": inspect.iscoroutinefunction(module.comfy_entrypoint)}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["heavy"] == []
    assert out["entry"] is True
    assert out["seconds"] < 0.2


def test_installed_as_dreambooth_lora_with_console_script():
    import dreambooth_lora

    assert Path(dreambooth_lora.__file__).resolve() == ROOT / "__init__.py"
    script = shutil.which("dreambooth-lora", path=str(Path(sys.executable).parent))
    assert script, "pip install -e . must provide the dreambooth-lora command"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "inspect" in result.stdout and "fixture" in result.stdout


def test_requirements_match_pyproject_and_never_pin_torch():
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert requirements == project["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", r)[0].lower() for r in requirements}
    assert not names & {"torch", "torchvision", "torchaudio"}
    assert {"diffusers", "peft", "transformers", "accelerate", "safetensors", "pillow", "numpy"} <= names
    assert all(">=" in r for r in requirements)  # lower bounds only


def test_install_script_installs_only_what_is_missing(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\ntorch>=99\nsafetensors>=0.1\nnot-a-real-package-xyz>=1.0\ndiffusers>=999.0\n")
    result = subprocess.run([sys.executable, str(ROOT / "install.py"), "--dry-run", "--requirements", str(requirements)],
                            capture_output=True, text=True, check=True)
    # torch is never touched, present ones are skipped, missing and too-old ones are listed
    assert result.stdout.strip() == "dreambooth-lora: installing not-a-real-package-xyz>=1.0 diffusers>=999.0"
    real = subprocess.run([sys.executable, str(ROOT / "install.py"), "--dry-run"], capture_output=True, text=True, check=True)
    assert real.stdout.strip() == "dreambooth-lora: all requirements are installed"


# --- options: one definition, derived everywhere --------------------------------------


def test_option_checks_range_and_choices():
    rank = Option("rank", 16, "LoRA rank.", min=1, max=1024, metadata_key="ss_network_dim")
    assert rank.parse("32") == 32 and rank.flag == "--rank"
    with pytest.raises(UserError, match=r"--rank: 0 is below the minimum 1"):
        rank.parse(0)
    with pytest.raises(UserError, match=r"--rank: 'x' is not a valid int"):
        rank.parse("x")
    with pytest.raises(UserError, match=r"--dtype: 'fp8' is not one of auto, fp32, fp16, bf16"):
        LOAD_OPTIONS["dtype"].parse("fp8")
    assert OptionSet(rank).metadata({"rank": 8}) == {"ss_network_dim": "8"}
    with pytest.raises(ValueError, match="defined twice"):
        OptionSet(rank, rank)


def test_cli_flags_come_from_the_options():
    parser = argparse.ArgumentParser()
    INSPECT_OPTIONS.add_to_parser(parser)
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == {o.flag for o in INSPECT_OPTIONS}
    for option in INSPECT_OPTIONS:
        assert flags[option.flag].default == option.default
        assert flags[option.flag].help.startswith(option.help)
    assert parser.parse_args(["--dtype", "bf16", "--quick"]).dtype == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--prediction-type", "x0"])


def test_node_inputs_come_from_the_options():
    calls = []

    def recorder(kind):
        def make(name, **kwargs):
            calls.append((kind, name, kwargs))
            return (kind, name)
        return SimpleNamespace(Input=make)

    fake_io = SimpleNamespace(Combo=recorder("combo"), Boolean=recorder("bool"), Int=recorder("int"),
                              Float=recorder("float"), String=recorder("string"))
    inputs = (LOAD_OPTIONS + OptionSet(Option("steps", 800, "Training steps.", min=1, max=100000))).node_inputs(fake_io)
    assert [i[1] for i in inputs] == ["dtype", "prediction_type", "steps"]
    by_name = {name: (kind, kw) for kind, name, kw in calls}
    assert by_name["dtype"][0] == "combo" and by_name["dtype"][1]["options"] == ["auto", "fp32", "fp16", "bf16"]
    assert by_name["prediction_type"][1]["tooltip"] == LOAD_OPTIONS["prediction_type"].help
    assert by_name["steps"] == ("int", {"default": 800, "min": 1, "max": 100000, "step": 1, "tooltip": "Training steps."})
    # CLI-only presentation flags are not node inputs
    assert [i[1] for i in INSPECT_OPTIONS.node_inputs(fake_io)] == ["dtype", "prediction_type"]


def test_node_schema_builds_in_comfyui(comfy):
    from dreambooth_lora.nodes.models import InspectCheckpoint

    schema = InspectCheckpoint.GET_SCHEMA()
    assert schema.node_id.startswith("DBLoRA_") and schema.category == "DreamBooth LoRA"
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert inspect.signature(InspectCheckpoint.execute).parameters.keys() == {i.id for i in schema.inputs}

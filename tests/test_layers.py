"""The import graph reads like the pipeline: import-linter's contract (pyproject.toml) holds, and
it does catch an upward import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(package_parent: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), str(config), "--no-cache"], cwd=package_parent,
                          env={"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def copy_package(target: Path) -> Path:
    """The package's own source files under ``target/dreambooth_lora`` (no tests, bench, venv)."""
    package = target / "dreambooth_lora"
    ignore = shutil.ignore_patterns(".venv", ".git", "tests", "bench", "docs", "example_workflows", "*.safetensors",
                                    "__pycache__", "*.json", "*.txt", "*.png", "*.jpg")
    shutil.copytree(ROOT, package, ignore=ignore)
    return package


def test_layer_contract_holds_and_catches_an_upward_import(tmp_path):
    package = copy_package(tmp_path)
    config = ROOT / "pyproject.toml"
    kept = lint(tmp_path, config)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "Contracts: 2 kept, 0 broken" in kept.stdout
    # models (a low layer) reaching up into the trainer must break it
    (package / "models" / "upward.py").write_text("from ..trainer import checkpoint\n")
    broken = lint(tmp_path, config)
    assert broken.returncode == 1
    assert "dreambooth_lora.models is not allowed to import dreambooth_lora.trainer" in broken.stdout

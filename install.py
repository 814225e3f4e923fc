"""Installs what the pack needs, differently for each host.

ComfyUI (ComfyUI-Manager runs this after cloning the pack; you can too: `python install.py`, or
`--dry-run` to only list): installs only the requirements that are missing or too old. It never
installs or upgrades torch, torchvision or torchaudio: those belong to the user's ComfyUI, and
replacing a CUDA build with another one breaks it.

AUTOMATIC1111 / Forge (the webui runs this at every start, with its own Python, where
`import launch` works): installs nothing into the webui's Python, whose pins (transformers
4.30.2, numpy 1.26.2, gradio 3.41.2, ...) our requirements would break. It makes or updates the
separate training environment instead (webui/environment.py: a venv beside the extension that
reuses the webui's torch) and returns at once when that is up to date. A failure is printed and
never stops the webui; the tab offers to try again.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PROTECTED = {"torch", "torchvision", "torchaudio"}
REQUIREMENTS = Path(__file__).with_name("requirements.txt")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:4])


def parse(line: str) -> tuple[str, str | None] | None:
    """'diffusers>=0.35' → ('diffusers', '0.35'); comments and blank lines → None."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?", line)
    if not match:
        raise ValueError(f"{REQUIREMENTS.name}: cannot read requirement {line!r}; use 'name' or 'name>=version'.")
    return match[1], match[2]


def missing(requirements: Path = REQUIREMENTS) -> list[str]:
    todo = []
    for line in requirements.read_text().splitlines():
        parsed = parse(line)
        if parsed is None:
            continue
        name, minimum = parsed
        if name.lower() in PROTECTED:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            todo.append(line.split("#", 1)[0].strip())
            continue
        if minimum and _version_key(installed) < _version_key(minimum):
            todo.append(line.split("#", 1)[0].strip())
    return todo


def webui_launch():
    """A1111's (or Forge's) `launch` module when this runs under the webui, else None."""
    try:
        import launch
    except Exception:  # ImportError outside a webui; anything else: not a launch module we know
        return None
    return launch if hasattr(launch, "run_pip") and hasattr(launch, "args") else None


def load_environment_module():
    """webui/environment.py by path: nothing of the package is importable in the webui's Python."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dreambooth_lora_webui_environment",
                                                  Path(__file__).resolve().with_name("webui") / "environment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def install_for_webui(launch) -> int:
    if getattr(launch.args, "skip_install", False):
        return 0
    environment = load_environment_module()
    try:
        environment.ensure(Path(__file__).resolve().parent, index_url=getattr(launch, "index_url", "") or "")
    except Exception as problem:  # EnvironmentProblem (pip failed, no network), or a full disk: never stop the webui
        print(f"dreambooth-lora: the training environment could not be made; the tab will say so and offer to try "
              f"again.\n{problem}")
    return 0


def main(argv: list[str]) -> int:
    launch = webui_launch()
    if launch is not None:
        return install_for_webui(launch)
    requirements = Path(argv[argv.index("--requirements") + 1]) if "--requirements" in argv else REQUIREMENTS
    todo = missing(requirements)
    if not todo:
        print("dreambooth-lora: all requirements are installed")
        return 0
    print("dreambooth-lora: installing " + " ".join(todo))
    if "--dry-run" in argv:
        return 0
    return subprocess.call([sys.executable, "-m", "pip", "install", *todo])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

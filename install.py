"""Installs only the requirements that are missing or too old; ComfyUI-Manager runs this
after cloning the pack (you can too: `python install.py`, or `--dry-run` to only list).

It never installs or upgrades torch, torchvision or torchaudio: those belong to the
user's ComfyUI, and replacing a CUDA build with another one breaks it.
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


def main(argv: list[str]) -> int:
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

"""The training environment: a Python of its own beside the webui's, so that training can never
change a package the webui pins.

AUTOMATIC1111 v1.10.1 pins transformers 4.30.2, numpy 1.26.2, Pillow 9.5.0, gradio 3.41.2 and
pydantic 1.x, and runs torch 2.1.x; this pack needs transformers >= 4.50.3, diffusers >= 0.35,
peft and accelerate. One interpreter cannot hold both, so training runs in a child process whose
interpreter is a venv beside the extension (``<extension>/venv``, ignored by git):

- It is made with the webui's own Python (same version, same ABI), without the webui's
  site-packages: ``--system-site-packages`` would let every old pin (transformers 4.30.2, …)
  satisfy or shadow our requirements.
- It reuses the webui's torch without copying it (a CUDA build is 2-5 GB): torch and the
  distributions it depends on (nvidia-*, triton, sympy, …: its requirement closure with extras,
  read from the installed metadata) are linked into ``<extension>/.webui-torch/``, one link per top-level
  entry, and a ``.pth`` file puts that folder on the venv's path *after* its own site-packages.
  Nothing else of the webui is visible. The folder lies outside the venv on purpose: pip only
  modifies distributions under the venv's prefix, so when a requirement wants a newer
  typing-extensions (say), pip installs it into the venv, where it shadows the linked one, and
  never deletes the webui's files through a link ("Not uninstalling …, outside environment").
- pip installs ``requirements.txt`` into the venv with ``torch==<the webui's version>`` as a
  constraint (pip may not replace it) and ``numpy<2`` for torch builds before 2.3, which were
  compiled against NumPy 1.x.
- The extension itself is linked into the venv as the package ``dreambooth_lora`` (no install:
  an updated extension needs nothing), so ``python -m dreambooth_lora.cli`` is the CLI there.
- A smoke test then imports the stack in the venv (transformers must accept that torch). If the
  webui's torch is not compatible, the venv is made again with torch of the same version and
  build installed from the registry into it (the build's index is derived from its local
  version, e.g. ``+cu121``), and the reason is printed.
- A stamp records what the venv was made from (requirements, Python, torch); a webui launch whose
  inputs match it returns at once, so install.py stays fast at every start.

``DBLORA_TRAIN_PYTHON`` names an interpreter to use instead (one you manage yourself; tests use
their own). ``DBLORA_TRAIN_VENV`` and ``DBLORA_TRAIN_REQUIREMENTS`` move the venv and change its
requirements (tests).

Standard library only, and no imports of the package: install.py loads this file by path inside
the webui's Python, before anything of ours is importable there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STAMP_FORMAT = 2
VENV_DIR = "venv"
LINKS_DIR = ".webui-torch"  # outside the venv's prefix: pip never modifies what lies there
STAMP_FILE = "dreambooth-lora-environment.json"
PTH_FILE = "dreambooth_lora_webui_torch.pth"
PACKAGE = "dreambooth_lora"
ENV_PYTHON, ENV_VENV, ENV_REQUIREMENTS = "DBLORA_TRAIN_PYTHON", "DBLORA_TRAIN_VENV", "DBLORA_TRAIN_REQUIREMENTS"
NUMPY2_TORCH = (2, 3)  # torch wheels before 2.3 were built against NumPy 1.x and fail under NumPy 2
TORCH_INDEX = "https://download.pytorch.org/whl/"
# Import names of requirements whose distribution name differs.
IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml", "opencv-python": "cv2"}


class EnvironmentProblem(Exception):
    """The training environment could not be made; the message says why and what to do."""


@dataclass(frozen=True)
class TorchSource:
    """Where the venv's torch comes from: ``link`` (the webui's own, linked) or ``install``
    (the same version and build installed from ``index_url``, or the default index)."""
    mode: str
    version: str
    location: str = ""
    index_url: str = ""
    links: tuple[tuple[str, str], ...] = ()  # (entry name, target path) to link


@dataclass
class Plan:
    """What ``ensure`` makes: the venv, its requirements and constraints, its torch."""
    venv: Path
    links: Path
    package: Path  # the extension's root, linked into the venv as the package dreambooth_lora
    requirements: Path
    torch: TorchSource | None
    constraints: list[str] = field(default_factory=list)
    index_url: str = ""

    def stamp(self) -> dict:
        """What a venv made from this plan records; a later launch compares it with its own."""
        text = self.requirements.read_text() if self.requirements.is_file() else ""
        source = None if self.torch is None else {
            "mode": self.torch.mode, "version": self.torch.version, "location": self.torch.location,
            # the linked entries: a webui update that changes torch's dependencies relinks
            "links": hashlib.sha256(repr(self.torch.links).encode()).hexdigest()[:16]}
        return {"format": STAMP_FORMAT, "python": platform_tag(), "requirements":
                hashlib.sha256((text + "\n".join(self.constraints)).encode()).hexdigest()[:16], "torch": source}


def platform_tag() -> str:
    return f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}-{sysconfig.get_platform()}"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


# --- the webui's torch -----------------------------------------------------------------------


def _requirements(dist: metadata.Distribution, extras: frozenset) -> list[tuple[str, frozenset]]:
    """What ``dist`` with ``extras`` requires in this interpreter: (name, its extras) pairs, markers
    evaluated (torch 2.15 asks for ``cuda-toolkit[cublas,cudart,…]``: the extras carry the CUDA libraries)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging; every Python that runs pip has it
        from pip._vendor.packaging.requirements import Requirement
    found = []
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": extra})
                                                      for extra in extras | {""}):
            continue
        found.append((requirement.name, frozenset(requirement.extras)))
    return found


def _top_level_entries(dist: metadata.Distribution) -> list[str]:
    """The files and folders ``dist`` put directly into its site-packages folder."""
    entries = []
    for path in dist.files or []:
        first = path.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".data"):
            continue
        entries.append(first)
    if not entries:  # no RECORD (installed by another tool): fall back to top_level.txt
        entries = [line.strip() for line in (dist.read_text("top_level.txt") or "").splitlines() if line.strip()]
    return list(dict.fromkeys(entries))


def torch_closure(root: str = "torch") -> TorchSource | None:
    """The webui's torch and every distribution it needs, as links to make; None when this
    interpreter has no torch installed as a distribution."""
    try:
        torch = metadata.distribution(root)
    except metadata.PackageNotFoundError:
        return None
    seen, todo, links = set(), [(root, frozenset())], {}
    while todo:
        name, extras = todo.pop()
        key = (re.sub(r"[-_.]+", "-", name).lower(), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this build does without
        for entry in _top_level_entries(dist):
            target = Path(dist.locate_file(entry))
            if target.exists():
                links.setdefault(entry, str(target))
        todo.extend(_requirements(dist, extras))
    location = str(Path(torch.locate_file("torch")))
    return TorchSource("link", torch.version, location, links=tuple(sorted(links.items())))


def torch_index_url(version: str) -> str:
    """The PyTorch index that serves this build: ``2.1.2+cu121`` → …/whl/cu121; a plain version
    (PyPI's own build) → "" (the default index)."""
    local = version.partition("+")[2]
    return TORCH_INDEX + local if re.fullmatch(r"cu\d+|cpu|rocm[\d.]+|xpu", local) else ""


def constraints_for(torch: TorchSource | None) -> list[str]:
    if torch is None:
        return []
    pins = [f"torch=={torch.version}"]
    if version_tuple(torch.version) < NUMPY2_TORCH:
        pins.append("numpy<2")
    return pins


def make_plan(extension: Path, index_url: str = "", torch_mode: str = "link") -> Plan:
    """The venv to make for the extension in ``extension``, from this interpreter's torch."""
    venv = Path(os.environ.get(ENV_VENV) or extension / VENV_DIR)
    requirements = Path(os.environ.get(ENV_REQUIREMENTS) or extension / "requirements.txt")
    torch = torch_closure()
    if torch is not None and torch_mode == "install":
        torch = TorchSource("install", torch.version, index_url=torch_index_url(torch.version))
    return Plan(venv, venv.parent / LINKS_DIR if os.environ.get(ENV_VENV) else extension / LINKS_DIR,
                Path(extension).resolve(), requirements, torch, constraints_for(torch), index_url)


# --- making it -------------------------------------------------------------------------------


def _run(command: list, what: str) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-12:])
        raise EnvironmentProblem(f"{what} failed (exit {result.returncode}):\n{tail}")
    return result.stdout


def read_stamp(venv: Path) -> dict | None:
    try:
        return json.loads((venv / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def up_to_date(plan: Plan) -> bool:
    """Whether the venv exists and was made from exactly this plan (a fast check: no subprocess)."""
    stamp = read_stamp(plan.venv)
    if stamp is None or not venv_python(plan.venv).exists():
        return False
    wanted = plan.stamp()
    return {k: stamp.get(k) for k in wanted} == wanted


def _link(target: str, link: Path) -> None:
    try:
        os.symlink(target, link, target_is_directory=os.path.isdir(target))
    except OSError:
        if os.name != "nt":
            raise
        if os.path.isdir(target):  # no symlink privilege on Windows: a junction needs none
            import _winapi
            _winapi.CreateJunction(target, str(link))
        else:
            os.link(target, link)


def site_packages(venv: Path) -> Path:
    """The venv's site-packages (made by this very Python, so its layout is this Python's)."""
    names = sysconfig.get_scheme_names()  # "venv" from Python 3.11; before, the plain prefix layout
    scheme = "venv" if "venv" in names else "nt" if os.name == "nt" else "posix_prefix"
    return Path(sysconfig.get_path("purelib", scheme, vars={"base": str(venv), "platbase": str(venv)}))


def link_torch(plan: Plan) -> None:
    """The link folder: one link per top-level entry of torch's closure, and the venv's .pth."""
    if plan.links.exists():
        shutil.rmtree(plan.links)  # removes the links, never what they point to
    plan.links.mkdir(parents=True)
    for entry, target in plan.torch.links:
        _link(target, plan.links / entry)
    (site_packages(plan.venv) / PTH_FILE).write_text(str(plan.links.resolve()) + "\n")


def link_package(plan: Plan) -> None:
    """The extension as the package ``dreambooth_lora`` in the venv, so that ``python -m
    dreambooth_lora.cli`` is the CLI (a link, not an install: an updated extension needs nothing;
    a moved one is linked again at the next start)."""
    link = site_packages(plan.venv) / PACKAGE
    if link.exists() or link.is_symlink():
        if link.resolve() == plan.package.resolve():
            return
        link.unlink() if link.is_symlink() or link.is_file() else os.rmdir(link)  # a link or a junction
    _link(str(plan.package), link)


SMOKE = r"""
import importlib, json, sys
names = json.loads(sys.argv[1])
import torch
for name in names:
    importlib.import_module(name)
if "transformers" in names:
    from transformers.utils import is_torch_available
    assert is_torch_available(), "transformers does not accept torch " + torch.__version__
print(json.dumps({"torch": torch.__version__, "torch_file": torch.__file__}))
"""


def import_names(requirements: Path) -> list[str]:
    names = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name = re.split(r"[<>=!~;\[ ]", line, 1)[0].lower()
            names.append(IMPORT_NAMES.get(name, name.replace("-", "_")))
    return names


def smoke(plan: Plan) -> dict:
    """Import torch and every requirement in the venv; transformers must accept that torch."""
    names = import_names(plan.requirements) + [f"{PACKAGE}.cli"]
    out = _run([venv_python(plan.venv), "-c", SMOKE, json.dumps(names)],
               "importing the training stack in the venv")
    return json.loads(out.strip().splitlines()[-1])


def build(plan: Plan, say: Callable[[str], None]) -> dict:
    """Make the venv from scratch as ``plan`` says; returns the smoke test's findings."""
    if plan.venv.exists():
        shutil.rmtree(plan.venv)
    say(f"dreambooth-lora: making the training environment in {plan.venv} (once; the webui's own packages are "
        "not touched)")
    _run([sys.executable, "-m", "venv", plan.venv], "creating the venv")
    python = venv_python(plan.venv)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--prefer-binary", "-q"]
    index = ["--index-url", plan.index_url] if plan.index_url else []
    constraints = plan.venv / "constraints.txt"
    constraints.write_text("".join(c + "\n" for c in plan.constraints))
    if plan.torch is not None and plan.torch.mode == "link":
        link_torch(plan)
        say(f"dreambooth-lora: using the webui's torch {plan.torch.version} ({len(plan.torch.links)} linked entries)")
    elif plan.torch is not None:
        torch_index = ["--index-url", plan.torch.index_url] if plan.torch.index_url else index
        say(f"dreambooth-lora: installing torch {plan.torch.version} into the training environment")
        _run(pip + [f"torch=={plan.torch.version}"] + torch_index, "installing torch")
    _run(pip + ["-r", plan.requirements, "-c", constraints] + index, "installing the requirements")
    link_package(plan)
    found = smoke(plan)
    (plan.venv / STAMP_FILE).write_text(json.dumps(dict(plan.stamp(), smoke=found), indent=1))
    return found


def ensure(extension: Path, say: Callable[[str], None] = print, index_url: str = "") -> Path:
    """The training interpreter, made or updated when needed (fast when nothing changed)."""
    if os.environ.get(ENV_PYTHON):
        return Path(os.environ[ENV_PYTHON])
    plan = make_plan(extension, index_url)
    previous = (read_stamp(plan.venv) or {}).get("torch") or {}
    if previous.get("mode") == "install" and plan.torch is not None and previous.get("version") == plan.torch.version:
        # the webui's torch did not work here last time and has not changed since: keep the venv's own
        plan = make_plan(extension, index_url, torch_mode="install")
    if up_to_date(plan):
        link_package(plan)
        return venv_python(plan.venv)
    if plan.torch is None:
        say("dreambooth-lora: the webui's Python has no torch; the training environment installs its own")
    try:
        build(plan, say)
    except EnvironmentProblem as problem:
        if plan.torch is None or plan.torch.mode != "link":
            raise
        say(f"dreambooth-lora: the webui's torch {plan.torch.version} does not work with this pack's requirements "
            f"({str(problem).splitlines()[-1]}); installing torch {plan.torch.version} into the training environment")
        plan = make_plan(extension, index_url, torch_mode="install")
        build(plan, say)
    say(f"dreambooth-lora: training environment ready ({venv_python(plan.venv)})")
    return venv_python(plan.venv)


def training_python(extension: Path) -> Path | None:
    """The interpreter training runs with, or None while the venv is missing or half made."""
    if os.environ.get(ENV_PYTHON):
        return Path(os.environ[ENV_PYTHON])
    venv = Path(os.environ.get(ENV_VENV) or extension / VENV_DIR)
    return venv_python(venv) if read_stamp(venv) is not None and venv_python(venv).exists() else None


def freeze(python: str | Path) -> list[str]:
    """``pip freeze`` of an interpreter (what must not change in the webui's)."""
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(line for line in out.splitlines() if line.strip())

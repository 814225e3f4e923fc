"""install.py under a webui never changes the webui's Python; the training environment it makes
instead (webui/environment.py) reuses the webui's torch by links and nothing else of it.

The end-to-end test uses a throwaway "webui" venv with a few old pins (tqdm 4.59.0 below our
lower bound, typing-extensions 4.5.0, filelock 3.12.2) and a stub torch 2.1.2 distribution that
requires the last two, plus a stand-in ``launch`` module on PYTHONPATH as A1111 sets it; the
training requirements are swapped for three tiny ones (DBLORA_TRAIN_REQUIREMENTS), so it needs
only small downloads from the package index. The full stack was measured once by hand against
the real A1111 v1.10.1 (see the README's "In A1111 / Forge").
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_LAUNCH = '''"""Stand-in of A1111 v1.10.1's launch.py surface that extension installers use."""
import types
args = types.SimpleNamespace(skip_install=False)
index_url = ""
def is_installed(package):
    return False
def run_pip(command, desc=None, live=False):
    raise AssertionError("install.py must never pip-install into the webui's Python: " + command)
'''


def environment_module():
    spec = importlib.util.spec_from_file_location("environment_under_test", ROOT / "webui" / "environment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(*command, **kwargs):
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, check=True, timeout=600, **kwargs)


def make_stub_torch(site: Path, version: str = "2.1.2") -> None:
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(f'__version__ = "{version}"\n')
    info = site / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\nRequires-Dist: filelock\n"
                                   "Requires-Dist: typing-extensions\nRequires-Dist: sympy ; extra == 'opt'\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text(f"torch/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n"
                                 f"{info.name}/RECORD,,\n../../../bin/torchrun,,\n")


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def freeze(python: Path) -> list[str]:
    return environment_module().freeze(python)


def test_install_under_a_webui_changes_nothing_in_the_webuis_python(tmp_path):
    webui_venv = tmp_path / "webui-venv"
    run(sys.executable, "-m", "venv", webui_venv)
    webui_python = webui_venv / "bin" / "python"
    run(webui_python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "tqdm==4.59.0",
        "typing-extensions==4.5.0", "filelock==3.12.2")
    site = Path(run(webui_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    make_stub_torch(site)
    fake_webui = tmp_path / "webui"
    fake_webui.mkdir()
    (fake_webui / "launch.py").write_text(FAKE_LAUNCH)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tqdm>=4.60\ntyping-extensions>=4.7\nsix>=1.16\n")
    env = dict(os.environ, PYTHONPATH=str(fake_webui), DBLORA_TRAIN_VENV=str(tmp_path / "ext" / "venv"),
               DBLORA_TRAIN_REQUIREMENTS=str(requirements))
    env.pop("DBLORA_TRAIN_PYTHON", None)
    before = freeze(webui_python)
    assert "tqdm==4.59.0" in before and "torch==2.1.2" in before

    started = time.perf_counter()
    first = run(webui_python, ROOT / "install.py", env=env, cwd=fake_webui)  # as A1111 runs it
    first_seconds = time.perf_counter() - started
    assert "using the webui's torch 2.1.2" in first.stdout and "training environment ready" in first.stdout, first
    assert freeze(webui_python) == before, "install.py changed the webui's packages"

    venv_python = tmp_path / "ext" / "venv" / "bin" / "python"
    found = json.loads(run(venv_python, "-c", "import json, torch, tqdm, typing_extensions, filelock, six; "
                           "print(json.dumps({m.__name__: m.__file__ for m in (torch, tqdm, typing_extensions, "
                           "filelock, six)}))").stdout)
    links = tmp_path / "ext" / ".webui-torch"
    # torch and what it requires come from the webui, through the links …
    assert Path(found["torch"]).resolve() == (site / "torch" / "__init__.py").resolve()
    assert Path(found["filelock"]).is_relative_to(links)
    # … a requirement that wants newer than the webui's linked copy is installed into the venv,
    # and pip leaves the webui's copy alone (it lies outside the venv's prefix)
    assert Path(found["typing_extensions"]).is_relative_to(tmp_path / "ext" / "venv")
    assert (site / "typing_extensions.py").is_file()
    # nothing else of the webui is visible: its old tqdm is not, the venv has its own
    assert Path(found["tqdm"]).is_relative_to(tmp_path / "ext" / "venv")
    assert sorted(p.name for p in links.iterdir()) == sorted(
        ["torch", "torch-2.1.2.dist-info", "filelock", next(p.name for p in site.glob("filelock-*.dist-info")),
         "typing_extensions.py", next(p.name for p in site.glob("typing_extensions-*.dist-info"))])
    # the extension itself is the package dreambooth_lora there (a link: `python -m dreambooth_lora.cli`)
    package = run(venv_python, "-c", "import dreambooth_lora.cli; print(dreambooth_lora.__file__)").stdout.strip()
    assert Path(package).resolve() == ROOT / "__init__.py"
    # torch builds before 2.3 need NumPy 1.x; the webui's torch is pinned
    assert (tmp_path / "ext" / "venv" / "constraints.txt").read_text() == "torch==2.1.2\nnumpy<2\n"

    started = time.perf_counter()
    second = run(webui_python, ROOT / "install.py", env=env, cwd=fake_webui)
    second_seconds = time.perf_counter() - started
    assert second.stdout == "" and second_seconds < 2.0, (second.stdout, second_seconds)
    assert freeze(webui_python) == before
    print(f"first install.py {first_seconds:.1f} s, second {second_seconds:.2f} s")


def test_skip_install_is_respected(tmp_path):
    fake_webui = tmp_path / "webui"
    fake_webui.mkdir()
    (fake_webui / "launch.py").write_text(FAKE_LAUNCH.replace("skip_install=False", "skip_install=True"))
    env = dict(os.environ, PYTHONPATH=str(fake_webui), DBLORA_TRAIN_VENV=str(tmp_path / "venv"))
    env.pop("DBLORA_TRAIN_PYTHON", None)
    result = run(sys.executable, ROOT / "install.py", env=env)
    assert result.stdout == "" and not (tmp_path / "venv").exists()


def test_the_webuis_torch_is_linked_with_its_whole_closure():
    """This venv's real torch: every distribution it requires comes along, nothing else."""
    environment = environment_module()
    source = environment.torch_closure()
    entries = dict(source.links)
    assert source.mode == "link" and "torch" in entries and Path(entries["torch"]).is_dir()
    assert any(name.startswith("torch-") and name.endswith(".dist-info") for name in entries)
    assert "typing_extensions.py" in entries and "filelock" in entries  # torch's own requirements
    assert "diffusers" not in entries and "transformers" not in entries and "numpy" not in entries
    assert not any(name in ("..", "__pycache__", "bin") for name in entries)
    # torch 2.15 names its CUDA libraries as extras of cuda-toolkit: they are part of the closure
    cuda_runtime = [d for d in ("nvidia-cuda-runtime",) if _installed(d)]
    for dist in cuda_runtime:
        assert any(name.startswith(dist.replace("-", "_") + "-") for name in entries), dist


def test_decisions():
    environment = environment_module()
    link = environment.TorchSource("link", "2.1.2+cu121")
    assert environment.constraints_for(link) == ["torch==2.1.2+cu121", "numpy<2"]
    assert environment.constraints_for(environment.TorchSource("link", "2.4.1")) == ["torch==2.4.1"]
    assert environment.constraints_for(None) == []
    assert environment.torch_index_url("2.1.2+cu121") == "https://download.pytorch.org/whl/cu121"
    assert environment.torch_index_url("2.3.1+rocm6.0") == "https://download.pytorch.org/whl/rocm6.0"
    assert environment.torch_index_url("2.15.0") == ""
    assert environment.import_names(ROOT / "requirements.txt") == [
        "diffusers", "peft", "transformers", "accelerate", "safetensors", "PIL", "numpy", "tqdm"]


def test_a_webui_torch_that_does_not_fit_is_replaced_by_its_own_copy(tmp_path, monkeypatch):
    """The smoke test fails with the linked torch (say transformers wants a newer one): the venv
    is made again with the same torch version installed into it, from the build's index."""
    environment = environment_module()
    monkeypatch.delenv("DBLORA_TRAIN_PYTHON", raising=False)
    monkeypatch.setenv("DBLORA_TRAIN_VENV", str(tmp_path / "venv"))
    monkeypatch.setattr(environment, "torch_closure",
                        lambda: environment.TorchSource("link", "2.1.2+cu121", "/webui/torch", links=()))
    built = []

    def build(plan, say):
        built.append(plan.torch)
        if plan.torch.mode == "link":
            raise environment.EnvironmentProblem("importing failed:\nAssertionError: transformers does not accept "
                                                 "torch 2.1.2")
        environment.site_packages(plan.venv).mkdir(parents=True)
        (plan.venv / environment.STAMP_FILE).write_text(json.dumps(plan.stamp()))
        return {}

    monkeypatch.setattr(environment, "build", build)
    said = []
    environment.ensure(tmp_path / "ext", say=said.append)
    assert [t.mode for t in built] == ["link", "install"]
    assert built[1].index_url == "https://download.pytorch.org/whl/cu121" and built[1].version == "2.1.2+cu121"
    assert "does not work with this pack's requirements (AssertionError: transformers does not accept torch 2.1.2)" \
        in said[0]
    # the next launch keeps the venv's own torch while the webui's is unchanged: nothing is rebuilt
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").write_text("")
    built.clear()
    environment.ensure(tmp_path / "ext", say=said.append)
    assert built == []


@pytest.mark.parametrize("argv", [["--dry-run"]])
def test_comfyui_path_is_unchanged_without_a_webui(argv):
    """No `launch` module: today's ComfyUI behaviour (tests/test_pack.py holds its details)."""
    result = run(sys.executable, ROOT / "install.py", *argv)
    assert result.stdout.strip() == "dreambooth-lora: all requirements are installed"

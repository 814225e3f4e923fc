"""AUTOMATIC1111 / Forge entry point: the "DreamBooth LoRA" tab and the /dreambooth-lora API.

The webui executes every ``scripts/*.py`` of an extension at start-up and at "Reload UI" (it
ignores the repository's root ``__init__.py``, which is ComfyUI's entry). This file loads the
repository root as the package ``dreambooth_lora`` (the folder's own name does not matter, as in
tests/conftest.py) and registers two callbacks from ``dreambooth_lora.webui``; everything else
lives there. Nothing heavy is imported here: training runs in a separate process with its own
environment (webui/environment.py), so the webui's pinned packages are never touched.

A problem while loading is printed (one line, then its traceback) and the tab is left out; the webui
goes on.
"""

import importlib.util
import sys
import traceback
from pathlib import Path

EXTENSION = Path(__file__).resolve().parents[1]


def load_package():
    module = sys.modules.get("dreambooth_lora")
    if module is not None:
        if Path(module.__file__).resolve() != EXTENSION / "__init__.py":
            raise ImportError(f"another dreambooth_lora is already loaded from {module.__file__}")
        return module
    spec = importlib.util.spec_from_file_location("dreambooth_lora", EXTENSION / "__init__.py",
                                                  submodule_search_locations=[str(EXTENSION)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dreambooth_lora"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["dreambooth_lora"]
        raise
    return module


def register():
    from modules import script_callbacks

    load_package()
    from dreambooth_lora.webui import extension

    script_callbacks.on_ui_tabs(lambda: extension.get().ui_tabs())
    script_callbacks.on_app_started(lambda demo, app: extension.get().app_started(demo, app))


try:
    register()
except Exception as error:  # never take the webui down with us
    print(f"dreambooth-lora: the DreamBooth LoRA tab is disabled: {error}", file=sys.stderr)
    traceback.print_exc()

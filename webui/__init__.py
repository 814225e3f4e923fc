"""AUTOMATIC1111 / Forge adapter (as ``nodes/`` is ComfyUI's): the "DreamBooth LoRA" tab and the
``/dreambooth-lora`` API routes over the ``dreambooth-lora`` CLI. It only adapts: widgets come
from the option definitions, every action is one CLI command run in a child process.

    extension.py    the one object inside the webui: its runs, the tab and API callbacks
    environment.py  the training interpreter: a venv beside the extension that links the webui's
                    torch and nothing else of it (stdlib only; install.py loads it by path)
    runs.py         commands as child processes, their folders, status, cancel and resume
    child.py        runs inside the training interpreter: the CLI, then publishing its results
    progress.py     step, losses, ETA and previews from the CLI's console and state folder
    jobs.py         requests (tab or API) checked field by field → CLI commands
    widgets.py      Option → gradio widget, widget value → CLI flag
    host.py         what is read from the webui's ``modules`` (folders, checkpoints)
    tab.py, api.py  the gradio tab and the FastAPI routes

scripts/dreambooth_lora.py (A1111's entry) registers ``extension``'s callbacks. Nothing here
imports torch, gradio or the webui at import time.
"""

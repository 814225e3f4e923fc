"""Stand-in of A1111 v1.10.1 ``modules/script_callbacks.py``: registration (``on_ui_tabs``,
``on_app_started``, keyword-only ``name``) and the webui's side that runs them (``ui_tabs_callback``
collects the tabs, ``app_started_callback`` passes the gradio Blocks and the FastAPI app; a failing
callback is reported and skipped, as in A1111)."""

import dataclasses
import inspect
import os
import traceback


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: object
    name: str = "unnamed"


callback_map = {"callbacks_app_started": [], "callbacks_ui_tabs": [], "callbacks_script_unloaded": []}
errors = []  # what A1111's errors.report would print


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else "unknown file"
    callbacks.append(ScriptCallback(filename, fun, f"{os.path.basename(filename)}/{category}/{name or 'unnamed'}"))


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def report_exception(c, job):
    errors.append(f"Error executing callback {job} for {c.script}\n{traceback.format_exc()}")


def app_started_callback(demo, app):
    for c in callback_map["callbacks_app_started"]:
        try:
            c.callback(demo, app)
        except Exception:
            report_exception(c, "app_started_callback")


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, "ui_tabs_callback")
    return res


def on_app_started(callback, *, name=None):
    """register a function to be called when the webui started, the gradio `Block` component and
    fastapi `FastAPI` object are passed as the arguments"""
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_ui_tabs(callback, *, name=None):
    """register a function to be called when the UI is creating new tabs.
    The function must either return a None, which means no new tabs to be added, or a list, where
    each element is a tuple:
        (gradio_component, title, elem_id)
    """
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")

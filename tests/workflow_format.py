"""API-format ⇄ UI-format (LiteGraph) workflows, driven by a server's /object_info.

The example workflows in ``example_workflows/`` are the UI files the ComfyUI frontend opens;
``tests/workflows/*.api.json`` are the API-format copies the tests queue. This module makes
the UI file from the API copy and reads the widget values back out of a UI file, so a test
can check that both say the same thing.

    python tests/workflow_format.py http://127.0.0.1:8188   # rewrite example_workflows/ from the API copies
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "tests" / "workflows"
UI_DIR = ROOT / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The frontend gives these INT inputs an extra "control after generate" widget (fixed/randomize).
SEED_NAMES = ("seed", "noise_seed")
# Frontend-only nodes: shown on the canvas, never sent to the server.
NOTE_TYPES = ("Note", "MarkdownNote")


def _inputs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input in the order the frontend lays them out."""
    order = info.get("input_order") or {part: list(info["input"].get(part, {})) for part in ("required", "optional")}
    out = []
    for part in ("required", "optional"):
        for name in order.get(part, []):
            spec = info["input"][part][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            out.append((name, kind, spec[1] if len(spec) > 1 else {}))
    return out


def is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput") and not options.get("force_input")


def has_control(name: str, kind: str, options: dict) -> bool:
    return kind == "INT" and (options.get("control_after_generate") or name in SEED_NAMES)


def to_ui(api: dict, object_info: dict, note: str | None = None) -> dict:
    """``note``: the text of a Note node placed above the graph (``<name>.note.txt`` beside the API copy)."""
    ids = sorted(api, key=int)
    links, nodes, link_id = [], [], 0
    incoming: dict[tuple[str, str], int] = {}
    outgoing: dict[tuple[str, int], list[int]] = {}
    for target in ids:
        info = object_info[api[target]["class_type"]]
        for name, kind, options in _inputs(info):
            value = api[target]["inputs"].get(name)
            if isinstance(value, list):  # a link [source id, output slot]
                link_id += 1
                source, slot = value
                source_info = object_info[api[source]["class_type"]]
                slot_type = source_info["output"][slot]
                socket_index = [n for n, k, o in _inputs(info) if not is_widget(k, o) or isinstance(
                    api[target]["inputs"].get(n), list)].index(name)
                links.append([link_id, int(source), slot, int(target), socket_index, slot_type])
                incoming[(target, name)] = link_id
                outgoing.setdefault((source, slot), []).append(link_id)
    depth: dict[str, int] = {}

    def level(node_id: str) -> int:  # columns by distance from the sources
        if node_id not in depth:
            sources = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((level(s) for s in sources), default=-1)
        return depth[node_id]

    column_y: dict[int, int] = {}
    for order, node_id in enumerate(ids):
        node = api[node_id]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, options in _inputs(info):
            value = node["inputs"].get(name)
            if not is_widget(kind, options) or isinstance(value, list):
                entry = {"name": name, "type": kind, "link": incoming.get((node_id, name))}
                if is_widget(kind, options):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            if is_widget(kind, options):
                widgets.append(value if value is not None else options.get("default"))
                if has_control(name, kind, options):
                    widgets.append("fixed")
        outputs = [{"name": name, "type": kind, "links": outgoing.get((node_id, slot), []), "slot_index": slot}
                   for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        column = level(node_id)
        height = 46 + 24 * (len(widgets) + max(len(inputs), len(outputs)))
        y = column_y.get(column, 60)
        column_y[column] = y + height + 50
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [40 + 400 * column, y],
                      "size": [360, height], "flags": {}, "order": order, "mode": 0,
                      "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    if note:
        nodes.append({"id": max(int(i) for i in ids) + 1, "type": "Note", "pos": [40, column_y.get(0, 60)],
                      "size": [360, 420],
                      "flags": {}, "order": len(ids), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [note]})
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def from_ui(ui: dict, object_info: dict) -> dict:
    """The API-format prompt a UI file stands for (widget values by name, links as [id, slot])."""
    by_link = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: by_link[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, kind, options in _inputs(info):
            if is_widget(kind, options):
                value = values.pop(0)
                if has_control(name, kind, options):
                    values.pop(0)
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def main(url: str) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{url}/object_info", timeout=30) as response:
        object_info = json.loads(response.read())
    UI_DIR.mkdir(exist_ok=True)
    for path in sorted(API_DIR.glob("*.api.json")):
        note = path.with_name(path.name.replace(".api.json", ".note.txt"))
        ui = to_ui(json.loads(path.read_text()), object_info, note.read_text().strip() if note.is_file() else None)
        (UI_DIR / path.name.replace(".api.json", ".json")).write_text(json.dumps(ui, indent=1) + "\n")
        print(UI_DIR / path.name.replace(".api.json", ".json"))


if __name__ == "__main__":
    main(sys.argv[1])

"""One option definition → one gradio widget, and the widget's value → the CLI flag.

The tab's inputs come from the same ``Option`` objects as the ``dreambooth-lora`` flags and the
ComfyUI node inputs: default (the node's starting value, ``Option.node_start``), range, step,
choices, and the help text as the widget's ``info`` line (gradio 3.41 has no tooltips; ``info``
is its hint under the label). Values go back through ``Option.parse``, the same check as the
CLI's, and become ``--flag=value`` arguments (the ``=`` form, so a value that starts with '-',
like a negative prompt, is never read as a flag).

Works with gradio 3.41 (A1111 v1.10.1) and 4.x (Forge): only arguments both accept are used.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..options import Option, OptionSet

# A bounded number with at most this many positions is a slider; wider ranges (steps up to 10^6,
# seeds, learning rates with a 1e-5 step) are a number box.
SLIDER_POSITIONS = 1024
ELEM_PREFIX = "dblora_"


def label_of(option: Option) -> str:
    return option.name.replace("_", " ").capitalize()


def is_slider(option: Option) -> bool:
    if option.value_type not in (int, float) or option.min is None or option.max is None:
        return False
    step = option.step or (1 if option.value_type is int else None)
    return step is not None and (option.max - option.min) / step <= SLIDER_POSITIONS


def widget(option: Option, gr: Any, prefix: str = "", **extra: Any) -> Any:
    """The gradio component for ``option``; ``prefix`` keeps element ids unique when the same
    option appears in two sections (e.g. the class images' and the trainer's ``resolution``)."""
    kind, value = option.value_type, option.node_start
    common = {"label": label_of(option), "info": option.help, "elem_id": f"{ELEM_PREFIX}{prefix}{option.name}",
              **extra}
    if option.choices:
        return gr.Dropdown(choices=[str(c) for c in option.choices], value=str(value), **common)
    if kind is bool:
        return gr.Checkbox(value=bool(value), **common)
    if is_slider(option):
        step = option.step or 1
        return gr.Slider(minimum=option.min, maximum=option.max, step=step, value=value, **common)
    if kind in (int, float):
        return gr.Number(value=value, precision=0 if kind is int else None, minimum=option.min,
                         maximum=option.max, step=option.step or 1, **common)
    return gr.Textbox(value="" if value is None else str(value), lines=1, **common)


def widgets(options: OptionSet | Iterable[Option], gr: Any, prefix: str = "",
            only: Iterable[str] | None = None) -> dict[str, Any]:
    """name → widget for the CLI options of a set (in the set's order)."""
    wanted = None if only is None else set(only)
    return {o.name: widget(o, gr, prefix) for o in options if o.cli and (wanted is None or o.name in wanted)}


def parse_values(options: OptionSet | Iterable[Option], given: Mapping[str, Any], label_prefix: str = "") -> dict:
    """The checked values of the options present in ``given`` (a widget's or a request's); the
    error names the field as ``label_prefix + name``."""
    by_name = {o.name: o for o in options}
    values = {}
    for name, raw in given.items():
        option = by_name[name]
        if option.value_type is int and isinstance(raw, float) and raw.is_integer():
            raw = int(raw)  # gradio number boxes and sliders hand back floats
        values[name] = option.parse(raw, label=f"{label_prefix}{name}")
    return values


def cli_args(options: OptionSet | Iterable[Option], values: Mapping[str, Any]) -> list[str]:
    """``--flag=value`` arguments (``--flag`` / ``--no-flag`` for switches) for the given values."""
    args = []
    for option in options:
        if not option.cli or option.name not in values or values[option.name] is None:
            continue
        value = values[option.name]
        if option.value_type is bool:
            args.append(option.flag if value else "--no-" + option.flag[2:])
        else:
            args.append(f"{option.flag}={value}")
    return args

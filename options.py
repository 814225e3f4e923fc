"""One definition per option: name, default, range, help.

Every user-facing setting is declared once as an ``Option``. The CLI flag, the ComfyUI
node input (with its tooltip) and the LoRA metadata key are all derived from it, so a
default or a range can never drift between the command line and the node graph.

Each pipeline stage keeps its options in ``<stage>/options.py`` as an ``OptionSet``. Core code
reads them through a typed view, a frozen dataclass made from the set (``OptionSet.typed``), so
a misspelt name fails where it is written instead of at some later lookup.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import UserError


@dataclass(frozen=True)
class Option:
    name: str  # snake_case: the node input name; the CLI flag is --name-with-dashes
    default: Any
    help: str  # CLI help text and node tooltip
    type: type | None = None  # inferred from the default when omitted
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    step: float | None = None
    metadata_key: str | None = None  # kohya ``ss_*`` key this value is written under, if any
    cli: bool = True  # offered as a CLI flag
    node: bool = True  # offered as a node input
    # The node input's default where a graph should start elsewhere than the command line
    # (e.g. more steps); None = ``default``. Values are checked against the same range either way.
    node_default: Any = None

    @property
    def node_start(self) -> Any:
        """The node input's default."""
        return self.default if self.node_default is None else self.node_default

    @property
    def value_type(self) -> type:
        if self.type is not None:
            return self.type
        if self.default is None:
            return str
        return type(self.default)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: Any, label: str | None = None) -> Any:
        """Convert and check one value. The error names ``label`` (default: the CLI flag;
        nodes pass the input name) and says what is allowed."""
        value, problem = self._convert(raw)
        if problem:
            raise UserError(f"{label or self.flag}: {problem}")
        return value

    def _convert(self, raw: Any) -> tuple[Any, str | None]:
        kind = self.value_type
        try:
            if kind is bool and isinstance(raw, str):
                lowered = raw.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value = lowered in ("1", "true", "yes", "on")
            elif kind is Path:
                value = Path(raw).expanduser()
            elif raw is None:
                value = None
            else:
                value = kind(raw)
        except (TypeError, ValueError):
            return None, f"{raw!r} is not a valid {kind.__name__}."
        if kind is float and value is not None and not math.isfinite(value):
            return None, f"{raw!r} is not a finite number; give a number like {self.default!r}."
        if self.choices and value not in self.choices:
            return None, f"{value!r} is not one of {', '.join(map(str, self.choices))}."
        if self.min is not None and value is not None and value < self.min:
            return None, f"{value} is below the minimum {self.min}."
        if self.max is not None and value is not None and value > self.max:
            return None, f"{value} is above the maximum {self.max}."
        # An integer with a step (sizes: multiples of 8, the VAE's factor) takes only multiples of it,
        # as the node's widget does; a size the VAE cannot divide would fail or be cut later.
        if kind is int and value and self.step and self.step > 1 and value % self.step:
            lower = value - value % int(self.step)
            return None, f"{value} is not a multiple of {self.step:g}; use {lower} or {lower + int(self.step)}."
        return value, None

    def argparse_type(self, raw: str) -> Any:
        try:
            return self.parse(raw)
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    def add_to_parser(self, parser: argparse.ArgumentParser) -> None:
        help_text = self.help.replace("%", "%%")  # argparse expands %-formats in help
        if self.choices:
            help_text += f" Choices: {', '.join(map(str, self.choices))}."
        if self.min is not None or self.max is not None:
            help_text += f" Range: {self.min if self.min is not None else '-inf'}..{self.max if self.max is not None else 'inf'}."
        help_text += " Default: %(default)s."
        if self.value_type is bool:
            parser.add_argument(self.flag, dest=self.name, default=self.default,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(self.flag, dest=self.name, default=self.default,
                                type=self.argparse_type, metavar=self.name.upper(), help=help_text)

    def node_input(self, io: Any) -> Any:
        """The ComfyUI V3 input for this option (``io`` is ``comfy_api.latest.io``)."""
        kind, default = self.value_type, self.node_start
        if self.choices:
            return io.Combo.Input(self.name, options=[str(c) for c in self.choices],
                                  default=str(default), tooltip=self.help)
        if kind is bool:
            return io.Boolean.Input(self.name, default=default, tooltip=self.help)
        if kind is int:
            return io.Int.Input(self.name, default=default, min=self.min, max=self.max,
                                step=self.step or 1, tooltip=self.help)
        if kind is float:
            return io.Float.Input(self.name, default=default, min=self.min, max=self.max,
                                  step=self.step or 0.01, tooltip=self.help)
        return io.String.Input(self.name, default="" if default is None else str(default),
                               tooltip=self.help)


class OptionSet:
    """An ordered group of options (one per stage), with the derivations in one place."""

    def __init__(self, *options: Option):
        names = [o.name for o in options]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"option defined twice: {sorted(duplicates)}")
        self.options: tuple[Option, ...] = options

    def __iter__(self):
        return iter(self.options)

    def __add__(self, other: "OptionSet") -> "OptionSet":
        return OptionSet(*self.options, *other.options)

    def __getitem__(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def add_to_parser(self, parser: argparse.ArgumentParser) -> None:
        for option in self.options:
            if option.cli:
                option.add_to_parser(parser)

    def values(self, given: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
        """This set's options from ``given`` (checked), defaults for the missing ones.

        Keys that belong to other option sets or to the command line itself are ignored.
        """
        if isinstance(given, argparse.Namespace):
            given = vars(given)
        return {o.name: o.parse(given[o.name]) if o.name in given else o.default for o in self.options}

    def node_problem(self, given: Mapping[str, Any]) -> str | None:
        """The first invalid node input among ``given`` as an error text, or None.

        ComfyUI 0.3.75 does not check V3 combo values or ranges itself at queue time, so
        nodes call this from ``validate_inputs``.
        """
        for option in self.options:
            if option.name in given:
                _, problem = option._convert(given[option.name])
                if problem:
                    return f"{option.name}: {problem}"
        return None

    def node_inputs(self, io: Any, only: Iterable[str] | None = None) -> list:
        wanted = set(only) if only is not None else None
        return [o.node_input(io) for o in self.options if o.node and (wanted is None or o.name in wanted)]

    def metadata(self, values: Mapping[str, Any]) -> dict[str, str]:
        """kohya ``ss_*`` metadata for the options that declare a key (safetensors metadata is str→str)."""
        return {o.metadata_key: str(values.get(o.name, o.default)) for o in self.options if o.metadata_key}

    def typed(self, name: str) -> type:
        """A frozen dataclass type with one field per option (its default), for core code to read
        options as attributes. ``Type.of(given)`` builds one from a mapping or argparse namespace,
        checked like ``values``; ``view.as_dict()`` gives the mapping back (records, metadata)."""
        fields = [(o.name, o.value_type, dataclasses.field(default=o.default, metadata={"option": o}))
                  for o in self.options]
        option_set = self

        def of(cls, given: Mapping[str, Any] | argparse.Namespace):
            return cls(**option_set.values(given))

        def as_dict(view) -> dict[str, Any]:
            return {o.name: getattr(view, o.name) for o in option_set.options}

        def pick(view, subset: "OptionSet") -> dict[str, Any]:
            """The values of ``subset``'s options (e.g. the keyword arguments of a stage's function)."""
            return {o.name: getattr(view, o.name) for o in subset.options}

        def replace(view, **changes: Any):
            return dataclasses.replace(view, **changes)

        return dataclasses.make_dataclass(name, fields, frozen=True, namespace={
            "option_set": option_set, "of": classmethod(of), "as_dict": as_dict, "pick": pick, "replace": replace})

"""Comparison grids: one setting varied along x, another along y, each cell a PNG that re-makes itself."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..errors import Cancelled, UserError
from ..runtime.files import write_png
from ..runtime.pictures import render_grid
from ..trainer.checkpoint import lora_of_step
from .options import GRID_AXES
from .patch import LoraChoice, parse_number
from .session import SamplingSession, save_sample
from .settings import SampleSettings


def parse_axis(text: str) -> tuple[str, list[str]]:
    """'unet-scale=0,0.5,1' → ('unet-scale', ['0', '0.5', '1']); prompts are separated by '|'."""
    name, _, values = text.partition("=")
    name = name.strip()
    if name not in GRID_AXES or not values:
        raise UserError(f"axis {text!r}: write NAME=V1,V2,... with NAME one of {', '.join(GRID_AXES)} "
                        "(prompt values are separated by '|').")
    parts = values.split("|") if name == "prompt" else values.split(",")
    return name, [p.strip() for p in parts if p.strip()]


def with_axis(settings: SampleSettings, name: str, value: str) -> SampleSettings:
    number = parse_number(value)
    if name in ("unet-scale", "te-scale", "guidance", "seed", "steps", "step") and number is None:
        raise UserError(f"axis {name}: {value!r} is not a number.")
    if name in ("unet-scale", "te-scale") and not settings.loras:
        raise UserError(f"axis {name} needs a --lora.")
    if name == "unet-scale":
        return replace(settings, loras=[replace(c, unet_scale=number) for c in settings.loras])
    if name == "te-scale":
        return replace(settings, loras=[replace(c, te_scale=number) for c in settings.loras])
    if name == "guidance":
        return replace(settings, guidance=number)
    if name in ("seed", "steps"):
        return replace(settings, **{name: int(number)})
    if name == "prompt":
        return replace(settings, prompt=value)
    first = settings.loras[0] if settings.loras else LoraChoice("")
    if name == "lora":
        return replace(settings, loras=[replace(first, path=value)] + settings.loras[1:])
    if not settings.loras:
        raise UserError("axis step needs --lora (the final LoRA file or its .state folder).")
    return replace(settings, loras=[replace(first, path=str(lora_of_step(first.path, int(number))))] + settings.loras[1:])


def axis_label(name: str, value: str) -> str:
    if name == "lora":
        return Path(value).stem
    return f"{name} {value}"


@dataclass
class GridResult:
    path: Path
    cells: list[list[Path]]  # [row][column] PNG with parameters


def make_grid(session: SamplingSession, settings: SampleSettings, x_axis: tuple[str, list[str]],
              y_axis: tuple[str, list[str]], out: str | Path, overwrite: bool = False,
              on_cell: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> GridResult:
    """Sample every (y, x) combination (batch 1), save each cell's PNG in ``<out stem>_cells/``
    and the labelled grid at ``out``."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the grid is written as a .png file.")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; choose another --out or pass --overwrite.")
    (x_name, x_values), (y_name, y_values) = x_axis, y_axis
    if x_name == y_name:
        raise UserError(f"both axes are {x_name}; choose two different ones.")
    folder = out.with_name(out.stem + "_cells")
    images, paths = [], []
    total = len(x_values) * len(y_values)
    for row, y_value in enumerate(y_values):
        images.append([])
        paths.append([])
        for column, x_value in enumerate(x_values):
            if should_stop is not None and should_stop():
                raise Cancelled
            cell = with_axis(with_axis(replace(settings, batch=1), y_name, y_value), x_name, x_value)
            sample = session.sample(cell)[0]
            paths[-1].append(save_sample(sample, folder / f"r{row}_c{column}.png"))
            images[-1].append(sample.image)
            if on_cell is not None:
                on_cell(row * len(x_values) + column + 1, total)
    title = settings.prompt if "prompt" not in (x_name, y_name) else ""
    grid = render_grid(images, [axis_label(x_name, v) for v in x_values], [axis_label(y_name, v) for v in y_values],
                       title)
    write_png(grid, out)
    return GridResult(out, paths)

"""Pictures the pack draws: labelled grids (sampling grids, training previews, the demo sheet)
and the loss plot."""

from __future__ import annotations

from typing import Any


def font(size: int):
    """PIL's default font at ``size`` px (scalable with Pillow ≥ 10.1 and FreeType; else its bitmap font)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def wrap(draw, text: str, typeface, width: int) -> list[str]:
    """``text`` broken into lines of at most ``width`` px (a single long word stays whole)."""
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=typeface) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def render_grid(cells: list[list[Any]], x_labels: list[str], y_labels: list[str], title: str = ""):
    """Images in rows × columns with the x values above and the y values to the left."""
    from PIL import Image, ImageDraw

    width, height = cells[0][0].size
    size = max(14, min(40, width // 14))
    typeface = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(min(max(probe.textlength(l, font=typeface) for l in y_labels) + size, width * 0.8))
    top_lines = max(len(wrap(probe, l, typeface, width - 8)) for l in x_labels)
    title_lines = wrap(probe, title, typeface, left + width * len(x_labels) - 8) if title else []
    line = int(size * 1.25)
    top = (top_lines + len(title_lines)) * line + size // 2
    grid = Image.new("RGB", (left + width * len(x_labels), top + height * len(y_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(title_lines):
        draw.text((4, 2 + i * line), text, fill="black", font=typeface)
    for column, label in enumerate(x_labels):
        for i, text in enumerate(wrap(draw, label, typeface, width - 8)):
            draw.text((left + column * width + width / 2, (len(title_lines) + i) * line + 4), text, fill="black",
                      font=typeface, anchor="ma")
    for row, label in enumerate(y_labels):
        for i, text in enumerate(wrap(draw, label, typeface, left - 8)):
            draw.text((4, top + row * height + height / 2 + (i - 0.5) * line), text, fill="black", font=typeface)
        for column, image in enumerate(cells[row]):
            grid.paste(image, (left + column * width, top + row * height))
    return grid


def plot_losses(rows: list[dict], series_names: tuple[str, ...] = ("loss_instance", "loss_prior"),
                validation_name: str = "loss_validation"):
    """A loss plot against the step, or None for < 2 rows: ``series_names`` as exponential moving
    averages (0.9) of every row (a series whose last value is None is left out), and the
    validation loss as measured, at the rows that have one (it is already noise-free)."""
    from PIL import Image, ImageDraw

    if len(rows) < 2:
        return None
    width, height, pad = 800, 400, 50
    labels = {"loss_instance": "instance", "loss_prior": "prior"}
    smooth = {}
    for key in series_names:
        if rows[-1].get(key) is not None:
            average, out = rows[0].get(key) or 0.0, []
            for row in rows:
                average = 0.9 * average + 0.1 * (row.get(key) or 0.0)
                out.append((row["step"], average))
            smooth[labels.get(key, key)] = out
    measured = [(row["step"], row[validation_name]) for row in rows if row.get(validation_name) is not None]
    if measured:
        smooth["validation"] = measured
    if not smooth:
        return None
    top = max(max(v for _, v in points) for points in smooth.values()) or 1.0
    first, last = rows[0]["step"], rows[-1]["step"]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline="black")
    colours = {"instance": ((30, 90, 200), "blue"), "prior": ((220, 120, 20), "orange"),
               "validation": ((20, 150, 60), "green")}

    def at(step: int, value: float) -> tuple[float, float]:
        return (pad + (width - 1.5 * pad) * (step - first) / max(1, last - first),
                height - pad - (height - 1.5 * pad) * value / top)

    for name, points in smooth.items():
        colour = colours.get(name, ((0, 0, 0), "black"))[0]
        xy = [at(step, value) for step, value in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        if name == "validation":
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    legend = ", ".join(f"{name} ({colours.get(name, (None, 'black'))[1]})" for name in smooth)
    draw.text((pad, 5), f"loss (EMA 0.9; validation as measured): {legend}; max {top:.4f}", fill="black")
    draw.text((pad, height - pad + 5), f"step {first}", fill="black")
    draw.text((width - 2 * pad, height - pad + 5), f"step {last}", fill="black")
    return image

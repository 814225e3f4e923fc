"""DreamBooth in the shapes world: the demo, and the paper's quality protocol in miniature.

The demo runs every stage of the pack on the built-in base model:

    identifier → class priors → DreamBooth LoRA with prior preservation → kohya file
    → the subject in new contexts, the bare class before and after → metrics → report

Metrics (``measure``), computed with the shapes judge (``judge.py``) the way the paper computes
them with DINO and CLIP:
- SUBJ  subject fidelity: mean cosine between the judge's look embeddings of images made for
        ``a photo of a <id> <class> on a <background> background`` (backgrounds the photos never
        had) and of the real training photos (the paper's DINO);
- PROMPT prompt fidelity: the share of those images whose background is the one asked for
        (our CLIP-T; chance is 1/7);
- PRES  the share of images of the bare class prompt ``a photo of a <class>`` that look like the
        subject — cosine to the subject's mean look above the midpoint between real subject
        renders and real class images (language drift: lower is better);
- DIV   1 − mean pairwise look cosine among the bare-class images (higher is more diverse).
The "real" row uses renders instead of generations: held-out renders of the subject in the new
contexts, and real class images (solid objects of every colour).
"""

from __future__ import annotations

import html
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import UserError
from ..evaluation.core import mean_cosine_within, mean_pairwise_cosine
from ..identifiers.core import propose
from ..models.load import load_base_model
from ..priors.core import generate_priors
from ..runtime import pictures
from ..runtime.files import write_png, write_text
from ..sampling.patch import LoraChoice
from ..sampling.session import SamplingSession
from ..sampling.settings import SampleSettings
from ..trainer.job import TrainJob
from ..trainer.loop import train
from . import base_path, world
from .judge import Judge
from .options import DEMO_OPTIONS


def subject_prompt(identifier: str, subject: world.Subject, background: str) -> str:
    return f"a photo of a {identifier} {subject.look.shape} on a {background} background"


def class_prompt(subject: world.Subject) -> str:
    return f"a photo of a {subject.look.shape}"


def photo_caption(scene: world.Scene) -> str:
    """A training photo's caption; the dataset stage fills ``{id}`` and ``{class}`` in, as for a
    user's own captions."""
    return f"a photo of a {{id}} {{class}} on a {scene.background} background"


def write_photos(subject: world.Subject, folder: Path, count: int = 5, seed: int = 0) -> list[Path]:
    """The subject's training photos as PNGs, each with its ``photo_caption`` in a .txt beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, scene in enumerate(world.subject_photos(subject, count, seed)):
        path = folder / f"{subject.name}-{index}.png"
        world.render(scene).save(path)
        path.with_suffix(".txt").write_text(photo_caption(scene) + "\n")
        paths.append(path)
    return paths


# --- measuring --------------------------------------------------------------------------


@dataclass
class Measurement:
    subj: float
    prompt: float
    pres: float
    div: float
    subject_images: list = field(default_factory=list)  # (image, background asked for)
    class_images: list = field(default_factory=list)

    def row(self) -> dict[str, float]:
        return {"SUBJ": self.subj, "PROMPT": self.prompt, "PRES": self.pres, "DIV": self.div}


@dataclass
class Reference:
    """What real images of a subject and its class say: the judge's yardsticks."""

    photos: list  # the training photos
    photo_looks: torch.Tensor
    prototype: torch.Tensor  # mean look of the photos
    threshold: float  # cos to the prototype above this = "looks like the subject"
    real: Measurement | None = None


def score(judge: Judge, ref: Reference, subject_images: list, class_images: list) -> Measurement:
    """The four metrics of (image, background asked for) pairs and bare-class images."""

    backgrounds = judge.labels([i for i, _ in subject_images], "background")
    class_looks = judge.looks(class_images).double()
    return Measurement(
        subj=mean_pairwise_cosine(judge.looks([i for i, _ in subject_images]), ref.photo_looks),
        prompt=float(np.mean([seen == asked for seen, (_, asked) in zip(backgrounds, subject_images)])),
        pres=float(((class_looks @ ref.prototype) > ref.threshold).double().mean()),
        div=1.0 - mean_cosine_within(class_looks), subject_images=subject_images, class_images=class_images)


def reference(subject: world.Subject, judge: Judge, images_per_prompt: int, seed: int = 0,
              contexts: tuple[str, ...] = world.NEW_CONTEXTS) -> Reference:
    """The yardsticks, and the real-images row: held-out renders of the subject in the new
    contexts, and real images of the class (solid looks of every colour)."""
    photos = [world.render(s) for s in world.subject_photos(subject)]
    photo_looks = judge.looks(photos).double()
    prototype = torch.nn.functional.normalize(photo_looks.mean(0), dim=0)
    held_out = [(world.render(s), s.background) for bg in contexts
                for s in subject.scenes(images_per_prompt, seed + 1000, (bg,))]
    real_class = [world.render(s) for s in world.class_scenes(subject.look.shape, 4 * images_per_prompt, seed)]
    subject_similarity = (judge.looks([i for i, _ in held_out]).double() @ prototype).mean()
    class_similarity = (judge.looks(real_class).double() @ prototype).mean()
    ref = Reference(photos, photo_looks, prototype, float((subject_similarity + class_similarity) / 2))
    ref.real = score(judge, ref, held_out, real_class)
    return ref


def measure(session, subject: world.Subject, identifier: str, ref: Reference, judge: Judge, lora: str | None,
            images_per_prompt: int, guidance: float, steps: int, seed: int = 0,
            contexts: tuple[str, ...] = world.NEW_CONTEXTS) -> Measurement:
    """Generate the protocol's images with ``session`` (the base, plus ``lora`` if given) and score them."""

    loras = [LoraChoice(lora)] if lora else []

    def make(prompt: str, count: int) -> list:
        settings = SampleSettings(prompt=prompt, seed=seed, steps=steps, guidance=guidance, width=world.SIZE,
                                  height=world.SIZE, sampler="ddim", batch=count, loras=loras)
        return [s.image for s in session.sample(settings, together=True)]  # measured, not kept

    subject_images = [(image, bg) for bg in contexts
                      for image in make(subject_prompt(identifier, subject, bg), images_per_prompt)]
    return score(judge, ref, subject_images, make(class_prompt(subject), 4 * images_per_prompt))


# --- the demo ---------------------------------------------------------------------------


@dataclass
class DemoResult:
    out: Path
    lora: Path
    report_html: Path
    report_png: Path
    identifier: str
    rows: dict[str, dict[str, float]]  # "base" / "dreambooth" / "real" → metrics
    seconds: dict[str, float]


def prompt_following(session, judge: Judge, guidance: float = 4.0, steps: int = 20) -> tuple[dict, list]:
    """How well a base follows its prompts: every class × colour once (48 prompts, a random
    background each, seed = the prompt's index, DDIM), and the share of images in which the judge
    sees the class, colour and background asked for. Returns (rates by head, the images)."""
    rng, asked, images = random.Random(5), [], []
    for shape in world.CLASSES:
        for color in world.COLORS:
            background = rng.choice(list(world.BACKGROUNDS))
            settings = SampleSettings(prompt=f"a photo of a {color} {shape} on a {background} background",
                                      seed=len(images), steps=steps, guidance=guidance, width=world.SIZE,
                                      height=world.SIZE, sampler="ddim")
            images += [s.image for s in session.sample(settings)]
            asked.append({"shape": shape, "color": color, "background": background})
    rates = {head: float(np.mean([seen == a[head] for seen, a in zip(judge.labels(images, head), asked)]))
             for head in ("shape", "color", "background")}
    return rates, images


def make_priors(base, base_file: str | Path, subject: world.Subject, folder: Path, options: Mapping[str, Any]):
    """The class priors of the demo's settings (cached: only missing ones are made)."""
    return generate_priors(base, str(base_file), folder, options["num_class_images"], class_prompt(subject),
                           steps=options["sample_steps"], guidance=options["guidance"], seed=options["seed"],
                           resolution=world.SIZE)


def train_subject(base_file: str | Path, subject: world.Subject, identifier: str, out: Path,
                  options: Mapping[str, Any], class_dir: Path | None, lora_name: str, **more):
    """One DreamBooth LoRA on a subject's photos (the trainer, with the demo's settings; ``more``:
    further trainer options). The trainer loads its own copy of the base: training changes the
    model it is given. Photos already in ``out/photos`` are used as they are."""
    photos = out / "photos"
    if not photos.is_dir():
        write_photos(subject, photos)
    train_options = {
        "steps": options["steps"], "learning_rate": options["learning_rate"], "rank": options["rank"],
        # LoCon (convs too): stripes and dots are textures drawn at the 16×16 level, where this
        # base has no attention layers for an attention-only LoRA to change.
        "alpha": float(options["rank"]), "unet_targets": "all", "seed": options["seed"],
        "resolution": world.SIZE, "identifier": identifier, "class_word": subject.look.shape,
        "instance_prompt": "a photo of a {id} {class}", "class_prompt": class_prompt(subject),
        "num_class_images": options["num_class_images"], "prior_preservation": options["prior_preservation"],
        "save_every": 0, "keep_checkpoints": 1, "mixed_precision": "no",
        "flip": False,  # a mirrored split tile is another look
        **more,
    }
    job = TrainJob(base=str(base_file), output=str(out / "loras" / f"{lora_name}.safetensors"), options=train_options,
                   instance_dir=str(photos), class_dir=str(class_dir) if class_dir else None, overwrite=True,
                   load_options={"dtype": "fp32"})
    return train(job)


def run_demo(options: Mapping[str, Any], out: str | Path, base_file: str | Path | None = None,
             say: Callable[[str], None] = print) -> DemoResult:
    """``base_file``: another shapes-world base (one you pretrained); default the built-in one."""
    options = DEMO_OPTIONS.values(dict(options))
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; give --out a folder (it is created if missing).")
    subject = world.SUBJECTS[options["subject"]]
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    torch.manual_seed(options["seed"])
    base_file = Path(base_file or base_path()).expanduser()
    base = load_base_model(base_file, dtype="fp32")
    judge = Judge.load()
    say(f"base: {base_file.name} ({base.info.resolution} px, loaded in {base.load_seconds:.1f} s)")
    identifier = propose(1, subject.look.shape, base=base)[0].token
    say(f"identifier: {identifier!r} (rare single CLIP token with the least pull on '{subject.look.shape}')")
    write_photos(subject, out / "photos")
    lap("load")

    class_dir = None
    if options["prior_preservation"] == "class_images":
        priors = make_priors(base, base_file, subject, out / "class_images", options)
        class_dir = priors.folder
        say(f"class priors: {len(priors.paths)} images of {class_prompt(subject)!r} in {priors.folder}")
    lap("priors")

    result = train_subject(base_file, subject, identifier, out, options, class_dir, f"{subject.name}-{identifier}")
    say(f"LoRA: {result.output} ({result.steps_done} steps in {result.seconds:.0f} s)")
    lap("train")

    session = SamplingSession(base, base_file)
    ref = reference(subject, judge, options["images_per_prompt"], options["seed"])
    common = dict(images_per_prompt=options["images_per_prompt"], guidance=options["guidance"],
                  steps=options["sample_steps"], seed=options["seed"])
    before = measure(session, subject, identifier, ref, judge, None, **common)
    after = measure(session, subject, identifier, ref, judge, str(result.output), **common)
    lap("sample+measure")
    rows = {"base model": before.row(), "DreamBooth LoRA": after.row(), "real images": ref.real.row()}
    report_png = write_sheet(out / "report.png", subject, identifier, options, ref, before, after,
                             result.state_dir / "loss.png", rows)
    report_html = write_html(out / "report.html", subject, identifier, options, result, rows, seconds, report_png)
    lap("report")
    (out / "metrics.json").write_text(json.dumps({"subject": subject.name, "identifier": identifier, "rows": rows,
                                                  "seconds": seconds, "options": options}, indent=1))
    return DemoResult(out, result.output, report_html, report_png, identifier, rows, seconds)


# --- the report ---------------------------------------------------------------------------


def metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    names = list(next(iter(rows.values())))
    lines = [f"{'':<18}" + "".join(f"{n:>8}" for n in names)]
    lines += [f"{label:<18}" + "".join(f"{values[n]:>8.3f}" for n in names) for label, values in rows.items()]
    return "\n".join(lines)


def write_sheet(path: Path, subject: world.Subject, identifier: str, options: Mapping, ref: Reference,
                before: Measurement, after: Measurement, loss_png: Path, rows) -> Path:
    """One PNG: photos, the subject in new contexts (base vs LoRA), the bare class before and after,
    the loss curve and the metrics."""
    from PIL import Image, ImageDraw


    cell, pad = 96, 8
    per_row = max(len(after.subject_images), len(after.class_images) // 2, len(ref.photos))
    per_row = min(per_row, 16)
    width = 2 * pad + per_row * cell
    font, small = pictures.font(18), pictures.font(14)
    sections: list[tuple[str, list]] = [
        (f"training photos (captions 'a photo of a {identifier} {subject.look.shape} on a … background')", ref.photos),
        (f"DreamBooth LoRA: 'a photo of a {identifier} {subject.look.shape} on a <new> background' "
         f"({', '.join(world.NEW_CONTEXTS)})", [i for i, _ in after.subject_images]),
        ("base model, same prompts and seeds (it has never seen the subject)", [i for i, _ in before.subject_images]),
        (f"bare class '{class_prompt(subject)}' with the LoRA (prior preservation: {options['prior_preservation']})",
         after.class_images),
        (f"bare class '{class_prompt(subject)}', base model", before.class_images),
    ]
    rows_needed = sum(1 + (len(images) - 1) // per_row for _, images in sections)
    loss = Image.open(loss_png).convert("RGB") if loss_png.is_file() else None
    if loss is not None:
        side = min(width - 2 * pad, 800)
        loss = loss.resize((side, int(loss.height * side / loss.width)))
    table = metrics_table(rows).splitlines()
    height = pad + rows_needed * (cell + 4) + len(sections) * 26 + 40 + 24 * len(table) + 10 + \
        (loss.height if loss else 0) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for title, images in sections:
        draw.text((pad, y), title, fill="black", font=font)
        y += 26
        for start in range(0, len(images), per_row):
            for column, image in enumerate(images[start:start + per_row]):
                sheet.paste(image.resize((cell - 4, cell - 4), Image.NEAREST), (pad + column * cell, y))
            y += cell + 4
    y += 10
    draw.text((pad, y), f"metrics (judge: shapes/judge.py), subject {subject.name}, identifier {identifier!r}",
              fill="black", font=font)
    y += 30
    mono = _mono(16) or small
    for line in table:
        draw.text((pad, y), line, fill="black", font=mono)
        y += 24
    if loss is not None:
        sheet.paste(loss, (pad, y + 10))
    write_png(sheet, path, f"shapes-world DreamBooth demo: subject {subject.name}, identifier {identifier}")
    return path


def _mono(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSansMono.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return None


def write_html(path: Path, subject: world.Subject, identifier: str, options: Mapping, result, rows, seconds,
               sheet: Path) -> Path:
    """The report page: the sheet, the metrics as a table, what was run and how long it took."""

    head = "".join(f"<th>{html.escape(n)}</th>" for n in next(iter(rows.values())))
    body = "".join(f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{v:.3f}</td>" for v in values.values()) + "</tr>"
                   for label, values in rows.items())
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    text = f"""<!doctype html><meta charset="utf-8"><title>DreamBooth demo: {html.escape(subject.name)}</title>
<style>body{{font-family:sans-serif;max-width:1700px;margin:2em}} td,th{{padding:4px 10px;text-align:right}}</style>
<h1>DreamBooth LoRA in the shapes world: {html.escape(subject.name)}</h1>
<p>Identifier <code>{html.escape(identifier)}</code>, class <code>{html.escape(subject.look.shape)}</code>,
{options['steps']} steps, prior preservation <code>{html.escape(options['prior_preservation'])}</code>.
LoRA (kohya format, loads in ComfyUI's LoraLoader): <code>{html.escape(str(result.output))}</code>.</p>
<table><tr><th></th>{head}</tr>{body}</table>
<p>SUBJ: subject fidelity (look cosine to the photos, the paper's DINO). PROMPT: share of images with the
background the prompt asked for (CLIP-T). PRES: share of bare-class images that look like the subject
(lower is better). DIV: diversity of bare-class images.</p>
<p>Time: {html.escape(timing)}.</p>
<img src="{html.escape(sheet.name)}" style="max-width:100%">
"""
    write_text(path, text)
    return path

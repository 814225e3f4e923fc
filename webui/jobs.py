"""What the tab and the API ask for, checked and turned into ``dreambooth-lora`` commands.

A training request (the API's JSON body; the tab builds the same dict)::

    {"name": "sks_dog",                   # the LoRA: <lora dir>/sks_dog.safetensors, <lora:sks_dog:1>
     "instance_dir": "/photos/dog",       # 3-20 photos of the subject
     "checkpoint": "v1-5.safetensors",    # a webui checkpoint (title, name or hash); omitted: the selected one
     "class_dir": null,                   # own class photos; omitted: generated and cached in the work folder
     "options": {"steps": 800, "rank": 16, "identifier": "sks", "class_word": "dog", ...},
     "overwrite": false}

Every field is checked before anything starts; a problem is one sentence that starts with the
field's name (``options.steps: 0 is below the minimum 1.``). The option names, ranges and
choices are the trainer's own (trainer/options.py), so the API accepts exactly what the CLI does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from ..data.options import DATA_OPTIONS, PROMPT_OPTIONS
from ..errors import UserError
from ..identifiers.options import IDENTIFIER_OPTIONS
from ..models.options import PREDICTION_TYPE
from ..options import OptionSet
from ..priors.options import PRIOR_OPTIONS
from ..runtime.files import confined_name
from ..sampling.options import GRID_AXES, SAMPLE_OPTIONS
from ..trainer.options import ALL_OPTIONS
from .host import Places
from .runs import Command
from .widgets import cli_args, parse_values

TRAIN_OPTIONS = OptionSet(*(o for o in ALL_OPTIONS if o.cli), PREDICTION_TYPE)
TRAIN_FIELDS = ("name", "instance_dir", "checkpoint", "class_dir", "options", "overwrite")
# Plain names only: ':' would break the prompt syntax <lora:NAME:1>, '<>,' the prompt parser.
LORA_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,99}$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# The prior-image settings the trainer uses (it keeps PRIOR_OPTIONS' defaults for the rest), so
# class images made ahead in the tab are the very ones training reuses.
CLASS_PRIOR_OPTIONS = ("class_prompt", "num_class_images")


def _text(request: Mapping, field: str, required: bool = False) -> str | None:
    value = request.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise UserError(f"{field}: missing; it is required.")
        return None
    if not isinstance(value, str):
        raise UserError(f"{field}: {value!r} is not a text.")
    return value.strip()


def folder_of_images(value: str, field: str) -> Path:
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise UserError(f"{field}: {value!r} is not a folder.")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()):
        raise UserError(f"{field}: {value!r} has no images ({', '.join(IMAGE_SUFFIXES)}).")
    return folder.resolve()


def lora_name(request: Mapping, places: Places) -> str:
    name = _text(request, "name", required=True)
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not LORA_NAME.match(name):
        raise UserError(f"name: {name!r} is not a plain LoRA name; use letters, digits, '_', '-', '.' and spaces "
                        "(no folders, no ':'), at most 100 characters.")
    try:
        confined_name(places.lora, name + ".safetensors")
    except UserError as err:
        raise UserError(f"name: {err}") from None
    return name


def train_options(request: Mapping) -> dict:
    given = request.get("options") or {}
    if not isinstance(given, Mapping):
        raise UserError("options: must be an object of option name → value (see `dreambooth-lora train --help`).")
    names = {o.name for o in TRAIN_OPTIONS}
    for key in given:
        if key not in names:
            raise UserError(f"options.{key}: not a training option; the options are those of `dreambooth-lora train "
                            f"--help` with '_' for '-', e.g. {', '.join(sorted(names)[:6])}.")
    return parse_values(TRAIN_OPTIONS, given, label_prefix="options.")


def train_command(request: Mapping[str, Any], places: Places, checkpoint_file: Callable[[str | None], Path],
                  running_names: Callable[[], set[str]] = set) -> Command:
    """The checked training command; raises ``UserError`` naming the first bad field."""
    if not isinstance(request, Mapping):
        raise UserError("request: must be a JSON object with name, instance_dir and options.")
    for key in request:
        if key not in TRAIN_FIELDS:
            raise UserError(f"{key}: not a field of a training request (fields: {', '.join(TRAIN_FIELDS)}).")
    name = lora_name(request, places)
    instance_dir = folder_of_images(_text(request, "instance_dir", required=True), "instance_dir")
    base = checkpoint_file(_text(request, "checkpoint"))
    class_dir = _text(request, "class_dir")
    if class_dir is not None and Path(class_dir).expanduser().is_file():
        raise UserError(f"class_dir: {class_dir!r} is a file, not a folder.")
    values = train_options(request)
    overwrite = request.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise UserError(f"overwrite: {overwrite!r} is not true or false.")
    if name in running_names():
        raise UserError(f"name: a run that trains {name!r} is still running; cancel it or choose another name.")
    target = places.lora / f"{name}.safetensors"
    if target.exists() and not overwrite:
        raise UserError(f"name: {target} exists; choose another name or set overwrite.")
    output = places.training / f"{name}.safetensors"
    state_dir = places.training / f"{name}.state"
    if state_dir.exists() and not overwrite:
        raise UserError(f"name: an earlier run of {name!r} kept its state in {state_dir}; resume that run, choose "
                        "another name, or set overwrite to start again.")
    embedding = places.training / f"{name}_emb.safetensors"
    settings = {o.name: values.get(o.name, o.default) for o in TRAIN_OPTIONS}
    embedding_alone = settings["new_tokens"] and not settings["train_unet"] and not settings["train_text_encoder"]
    argv = ["train", "--base", str(base), "--instance-dir", str(instance_dir),
            "--class-dir", str(Path(class_dir).expanduser().resolve() if class_dir else places.class_images),
            "--output", str(output), "--embedding-output", str(embedding), *cli_args(TRAIN_OPTIONS, values)]
    if overwrite:
        argv.append("--overwrite")
    publish = ([{"source": str(output), "folder": str(places.embeddings), "name": f"{name}.safetensors"}]
               if embedding_alone else
               [{"source": str(output), "folder": str(places.lora), "name": f"{name}.safetensors"},
                {"source": str(embedding), "folder": str(places.embeddings), "name": f"{name}_emb.safetensors"}])
    activation = f"{settings['identifier']} {settings['class_word']}".strip()
    sidecar = {"description": f"DreamBooth LoRA of '{activation}' trained on {base.name} by dreambooth-lora.",
               "activation text": activation, "preferred weight": 1}
    return Command(
        kind="train", title=f"train {name} on {base.name}", argv=argv, output=str(output), state_dir=str(state_dir),
        publish=publish, clear=[str(output), str(state_dir), str(embedding)] if overwrite else [],
        sidecars=[] if embedding_alone else [{"folder": str(places.lora), "name": f"{name}.json",
                                              "text": json.dumps(sidecar, indent=1)}],
        preview=None if embedding_alone else {"folder": str(places.lora), "name": f"{name}.preview.png"})


# --- the other steps of the tab: each one CLI command ------------------------------------------


def dataset_command(instance_dir: str, values: Mapping[str, Any]) -> Command:
    folder = folder_of_images(instance_dir or "", "instance_dir")
    options = DATA_OPTIONS + PROMPT_OPTIONS
    return Command(kind="dataset", title=f"check photos in {folder.name}",
                   argv=["dataset", str(folder), *cli_args(options, parse_values(options, values))])


def identifiers_command(base: Path, values: Mapping[str, Any]) -> Command:
    return Command(kind="identifiers", title="suggest identifiers",
                   argv=["identifiers", "--base", str(base),
                         *cli_args(IDENTIFIER_OPTIONS, parse_values(IDENTIFIER_OPTIONS, values))])


def priors_command(base: Path, class_dir: str | None, values: Mapping[str, Any], resolution: int,
                   places: Places) -> Command:
    checked = parse_values(PRIOR_OPTIONS, {**{k: values[k] for k in CLASS_PRIOR_OPTIONS if k in values},
                                           "resolution": resolution})
    out = Path(class_dir).expanduser().resolve() if class_dir else places.class_images
    return Command(kind="priors", title=f"class images of '{checked['class_prompt']}'", output=str(out),
                   argv=["priors", "--base", str(base), "--out", str(out), *cli_args(PRIOR_OPTIONS, checked)])


def lora_in(places: Places, name: str | None) -> Path:
    """A LoRA file of the webui's LoRA folder, by file name."""
    if not name:
        raise UserError("lora: pick a LoRA from the webui's LoRA folder.")
    try:
        path = confined_name(places.lora, name)
    except UserError as err:
        raise UserError(f"lora: {err}") from None
    if not path.is_file():
        raise UserError(f"lora: {path} does not exist; press 'Refresh lists'.")
    return path


def grid_command(base: Path, lora: Path, x_axis: str, y_axis: str, values: Mapping[str, Any],
                 places: Places, stamp: str) -> Command:
    for field, axis in (("x", x_axis), ("y", y_axis)):
        if axis.split("=", 1)[0].strip() not in GRID_AXES or "=" not in axis:
            raise UserError(f"{field}: {axis!r} is not NAME=V1,V2,... with NAME one of {', '.join(GRID_AXES)}.")
    out = places.grids / f"{lora.stem}-{stamp}.png"
    return Command(kind="grid", title=f"grid of {lora.stem}", output=str(out),
                   argv=["grid", "--base", str(base), "--lora", str(lora), f"--x={x_axis}", f"--y={y_axis}",
                         "--out", str(out), *cli_args(SAMPLE_OPTIONS, parse_values(SAMPLE_OPTIONS, values))])

"""Sampling with a LoRA at separate UNet and text-encoder scales, scale grids, and the metrics."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..evaluation.options import EVAL_OPTIONS
from ..sampling.options import SAMPLE_OPTIONS
from . import common, paths


def _lora_inputs() -> list:
    return [io.Combo.Input("lora_name", options=["(none)"] + folder_paths.get_filename_list("loras"),
                           tooltip="A LoRA from ComfyUI's models/loras folder (any kohya/A1111, LyCORIS, PEFT or "
                                   "diffusers file)."),
            io.String.Input("lora_file", optional=True, default="", force_input=True,
                            tooltip="A LoRA name from Train DreamBooth LoRA; wins over lora_name when connected."),
            io.Float.Input("unet_scale", default=1.0, min=-4.0, max=4.0, step=0.05,
                           tooltip="Strength of the LoRA in the UNet (ComfyUI's strength_model)."),
            io.Float.Input("te_scale", default=1.0, min=-4.0, max=4.0, step=0.05,
                           tooltip="Strength of the LoRA in the text encoder(s) (ComfyUI's strength_clip)."),
            io.String.Input("embedding_name", optional=True, default="", force_input=True,
                            tooltip="An embedding from Train DreamBooth LoRA (models/embeddings): its learned tokens "
                                    "are usable in the prompt as embedding:NAME or <s1><s2>. Embeddings named "
                                    "embedding:NAME in the prompt are loaded from models/embeddings anyway.")]


def _embeddings(embedding_name: str, *prompts: str) -> list[str]:
    """Embedding files for the connected name and every embedding:NAME of the prompts, as ComfyUI's
    CLIPTextEncode finds them (models/embeddings, with or without the extension)."""
    import re

    names = [embedding_name.strip()] if (embedding_name or "").strip() else []
    for prompt in prompts:
        names += [m.rstrip(",") for m in re.findall(r"embedding:([^\s,|]+)", prompt or "")]
    found = []
    for name in dict.fromkeys(names):
        path = None
        for candidate in (name, f"{name}.safetensors", f"{name}.pt"):
            path = folder_paths.get_full_path("embeddings", candidate)
            if path:
                break
        if path is None:
            if name == (embedding_name or "").strip():
                from ..errors import UserError

                raise UserError(f"embedding_name: {name!r} is not in ComfyUI's models/embeddings folder.")
            continue  # like CLIPTextEncode: an unknown embedding:NAME is left as text
        found.append(path)
    return found


def _choice(lora_name: str, lora_file: str, unet_scale: float, te_scale: float) -> list:
    from ..sampling.patch import LoraChoice

    name = (lora_file or "").strip() or lora_name
    if not name or name == "(none)":
        return []
    return [LoraChoice(folder_paths.get_full_path_or_raise("loras", name), unet_scale, te_scale)]


def _check(given: dict) -> bool | str:
    name = given.get("lora_name")
    if name not in (None, "(none)") and name not in folder_paths.get_filename_list("loras"):
        return f"lora_name: {name!r} is not in ComfyUI's models/loras folder."
    return SAMPLE_OPTIONS.node_problem(given) or True


class LoRASampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_Sampler", display_name="LoRA Sampler (DreamBooth LoRA)", category=common.CATEGORY,
            description="Text to image with the base model and a LoRA at its own UNet and text-encoder scales "
                        "(changing them does not reload anything). Image i uses seed + i.",
            inputs=[io.Custom(common.BASE_TYPE).Input("base", tooltip="From Load Base Model."), *_lora_inputs(),
                    *SAMPLE_OPTIONS.node_inputs(io)],
            outputs=[io.Image.Output(display_name="images", tooltip="The images, in seed order."),
                     io.String.Output(display_name="parameters", tooltip="A1111-style settings of the first image.")])

    @classmethod
    def validate_inputs(cls, **given) -> bool | str:
        return _check(given)

    @classmethod
    def execute(cls, base, lora_name: str, unet_scale: float, te_scale: float, lora_file: str = "",
                embedding_name: str = "", **options) -> io.NodeOutput:
        from ..sampling.settings import SampleSettings

        values = SAMPLE_OPTIONS.values(options)
        settings = SampleSettings.from_options(values, _choice(lora_name, lora_file, unet_scale, te_scale),
                                               _embeddings(embedding_name, values["prompt"], values["negative"]))
        progress = common.Progress(settings.steps * settings.batch)
        with common.cancellable():
            samples = common.sampling_session(base).sample(settings, on_step=lambda done, total: progress.set(done),
                                                           should_stop=common.interrupted)
        images = common.images_to_tensor([s.pixels for s in samples])
        return io.NodeOutput(images, samples[0].parameters, ui=ui.PreviewImage(images, cls=cls))


class LoRAGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_Grid", display_name="LoRA Scale Grid (DreamBooth LoRA)", category=common.CATEGORY,
            description="One labelled image over two settings, e.g. UNet scale × text-encoder scale or UNet scale "
                        "× guidance, with the same seed in every cell.",
            inputs=[io.Custom(common.BASE_TYPE).Input("base", tooltip="From Load Base Model."), *_lora_inputs(),
                    io.String.Input("x", default="unet-scale=0,0.5,1", tooltip="Horizontal axis: NAME=V1,V2,... with "
                                    "NAME one of unet-scale, te-scale, guidance, seed, steps, lora, prompt (prompt "
                                    "values separated by |)."),
                    io.String.Input("y", default="te-scale=0,1", tooltip="Vertical axis, as x."),
                    *SAMPLE_OPTIONS.node_inputs(io)],
            outputs=[io.Image.Output(display_name="grid", tooltip="The labelled grid.")])

    @classmethod
    def validate_inputs(cls, **given) -> bool | str:
        from ..errors import UserError
        from ..sampling.grid import parse_axis

        try:
            for axis in ("x", "y"):
                if isinstance(given.get(axis), str):
                    parse_axis(given[axis])
        except UserError as err:
            return str(err)
        return _check(given)

    @classmethod
    def execute(cls, base, lora_name: str, unet_scale: float, te_scale: float, x: str, y: str, lora_file: str = "",
                embedding_name: str = "", **options) -> io.NodeOutput:
        from pathlib import Path

        from PIL import Image

        from ..sampling.settings import SampleSettings
        from ..sampling.grid import make_grid, parse_axis

        values = SAMPLE_OPTIONS.values(options)
        prompts = [values["prompt"], values["negative"]] + ([y[len("prompt="):]] if y.startswith("prompt=") else []) + \
            ([x[len("prompt="):]] if x.startswith("prompt=") else [])
        settings = SampleSettings.from_options(values, _choice(lora_name, lora_file, unet_scale, te_scale),
                                               _embeddings(embedding_name, *prompts))
        x_axis, y_axis = parse_axis(x), parse_axis(y)
        out = Path(folder_paths.get_output_directory()) / "dreambooth_lora" / "grids"
        out.mkdir(parents=True, exist_ok=True)
        index = len(list(out.glob("grid_*.png")))
        progress = common.Progress(len(x_axis[1]) * len(y_axis[1]))
        with common.cancellable():
            result = make_grid(common.sampling_session(base), settings, x_axis, y_axis, out / f"grid_{index:05d}.png",
                               on_cell=lambda done, total: progress.set(done), should_stop=common.interrupted)
        grid = common.images_to_tensor([Image.open(result.path).convert("RGB")])
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))


class Evaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_Evaluate", display_name="Evaluate DreamBooth LoRA", category=common.CATEGORY,
            description="The DreamBooth paper's metrics: DINO and CLIP-I (subject fidelity against the real "
                        "photos), CLIP-T (prompt fidelity), DIV. Evaluator models come from local paths only.",
            inputs=[io.Image.Input("generated", tooltip="Images made with the LoRA."),
                    io.Image.Input("real", tooltip="The subject's real photos."),
                    io.String.Input("prompt", default="", tooltip="The prompt the images were made with (for "
                                                                  "CLIP-T)."),
                    *EVAL_OPTIONS.node_inputs(io)],
            outputs=[io.String.Output(display_name="report", tooltip="The metrics table.")],
            is_output_node=True)

    @classmethod
    def validate_inputs(cls, **given) -> bool | str:
        return paths.problem(given.get("dino", ""), "dino") or paths.problem(given.get("clip", ""), "clip") or \
            EVAL_OPTIONS.node_problem(given) or True

    @classmethod
    def execute(cls, generated, real, prompt: str, **options) -> io.NodeOutput:
        from ..evaluation.core import evaluate, load_evaluators

        values = EVAL_OPTIONS.values(options)
        dino, clip = load_evaluators(*(str(paths.confined(values[name], name)) if values[name] else ""
                                       for name in ("dino", "clip")))
        pictures = common.tensor_to_images(generated)
        scores = evaluate([(p, prompt) for p in pictures], common.tensor_to_images(real), dino, clip,
                          values["identifier"])
        report = scores.table()
        return io.NodeOutput(report, ui=ui.PreviewText(report))

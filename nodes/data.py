"""Inputs of a training run: the base model, the subject's photos, the identifier, class images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from .. import shapes
from ..data.options import DATA_OPTIONS, PROMPT_OPTIONS
from ..identifiers.options import IDENTIFIER_OPTIONS
from ..models.options import LOAD_OPTIONS
from ..priors.options import PRIOR_OPTIONS
from . import common, paths

PRIOR_NODE_OPTIONS = ("class_prompt", "num_class_images", "negative_prompt", "steps", "guidance", "sampler", "seed",
                      "resolution")


# The pack's own miniature base, offered beside the user's checkpoints so the shapes-world
# workflow runs on a fresh install with nothing downloaded or copied.
BUILTIN_BASE = "(built-in) " + shapes.BASE_NAME


def checkpoint_choices() -> list[str]:
    return folder_paths.get_filename_list("checkpoints") + [BUILTIN_BASE]


def checkpoint_path(ckpt_name: str) -> str:
    if ckpt_name == BUILTIN_BASE:
        return str(shapes.base_path())
    return folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)


class LoadBaseModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_LoadBaseModel", display_name="Load Base Model (DreamBooth LoRA)", category=common.CATEGORY,
            description="Picks the Stable Diffusion checkpoint (SD1.x, SD2.x, SDXL) that the LoRA is trained on "
                        "and sampled with. Loaded lazily by the nodes that need it, offline.",
            inputs=[io.Combo.Input("ckpt_name", options=checkpoint_choices(),
                                   tooltip=f"A checkpoint from ComfyUI's models/checkpoints folder, or {BUILTIN_BASE}: "
                                           "the pack's 64 px shapes-world miniature (for the shapes example "
                                           "workflow and quick trials)."),
                    *LOAD_OPTIONS.node_inputs(io),
                    io.String.Input("diffusers_folder", default="", optional=True,
                                    tooltip="A diffusers model folder (with model_index.json) under ComfyUI's "
                                            "models or input folder, to use instead of ckpt_name; empty = use "
                                            "ckpt_name.")],
            outputs=[io.Custom(common.BASE_TYPE).Output(display_name="base", tooltip="The base model, for the "
                                                                                     "DreamBooth LoRA nodes.")])

    @classmethod
    def validate_inputs(cls, ckpt_name: str, dtype: str, prediction_type: str,
                        diffusers_folder: str = "") -> bool | str:
        if isinstance(diffusers_folder, str) and diffusers_folder.strip():
            outside = paths.problem(diffusers_folder, "diffusers_folder")
            if outside:
                return outside
            if not (paths.confined(diffusers_folder, "diffusers_folder") / "model_index.json").is_file():
                return f"diffusers_folder: {diffusers_folder!r} has no model_index.json; give a diffusers model folder."
        elif ckpt_name not in checkpoint_choices():
            return f"ckpt_name: {ckpt_name!r} is not in ComfyUI's models/checkpoints folder."
        return LOAD_OPTIONS.node_problem({"dtype": dtype, "prediction_type": prediction_type}) or True

    @classmethod
    def execute(cls, ckpt_name: str, dtype: str, prediction_type: str, diffusers_folder: str = "") -> io.NodeOutput:
        if diffusers_folder.strip():
            path = str(paths.confined(diffusers_folder, "diffusers_folder"))
        else:
            path = checkpoint_path(ckpt_name)
        return io.NodeOutput({"path": path, "dtype": dtype, "prediction_type": prediction_type})


class InstanceImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_InstanceImages", display_name="Subject Photos (DreamBooth LoRA)", category=common.CATEGORY,
            description="The 3-20 photos of the subject: a folder (captions from <name>.txt beside each photo) or "
                        "an IMAGE batch. Every image is checked now: EXIF rotation, transparency, grayscale/CMYK/"
                        "16-bit and small images are handled; unusable files are skipped with their reason.",
            inputs=[io.String.Input("folder", default="", tooltip="Folder with the subject's photos, under ComfyUI's "
                                                                  "input folder (e.g. 'my_dog' for input/my_dog); "
                                                                  "leave empty to use the images input."),
                    io.Image.Input("images", optional=True, tooltip="The subject's photos as an IMAGE batch "
                                                                   "(used when folder is empty)."),
                    io.String.Input("captions", default="", multiline=True, optional=True,
                                    tooltip="For an IMAGE batch: one caption per line, in image order ({id} and "
                                            "{class} are filled in); empty lines use instance_prompt."),
                    io.Mask.Input("masks", optional=True,
                                  tooltip="For an IMAGE batch: where the subject is, one MASK per image (or one "
                                          "for all), 1 = subject; the loss off the subject is weighted by the "
                                          "Train node's mask_floor. (LoadImage's mask is 1 where the image is "
                                          "transparent: paint the subject in the mask editor, or invert it.)"),
                    *PROMPT_OPTIONS.node_inputs(io), *DATA_OPTIONS.node_inputs(io)],
            outputs=[io.Custom(common.DATASET_TYPE).Output(display_name="dataset",
                                                           tooltip="The checked photos, with the identifier and "
                                                                   "class word they are captioned with."),
                     io.String.Output(display_name="report", tooltip="What was done to each photo.")],
            is_output_node=True)

    @classmethod
    def validate_inputs(cls, **given) -> bool | str:
        return paths.problem(given.get("folder", ""), "folder") or (PROMPT_OPTIONS + DATA_OPTIONS).node_problem(given) \
            or True

    @classmethod
    def fingerprint_inputs(cls, folder: str = "", **_) -> str:
        # Same folder path, changed photos: re-run (ComfyUI would otherwise reuse the old dataset).
        if not folder or paths.problem(folder, "folder") or not paths.confined(folder, "folder").is_dir():
            return ""
        digest = hashlib.sha256()
        for path in sorted(paths.confined(folder, "folder").rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    @classmethod
    def execute(cls, folder: str, images=None, captions: str = "", masks=None, **options) -> io.NodeOutput:
        from ..data.core import load_batch, load_folder
        from ..errors import UserError

        prompt = PROMPT_OPTIONS.values(options)
        data = DATA_OPTIONS.values(options)
        if folder.strip():
            dataset = load_folder(paths.confined(folder, "folder"), prompt["instance_prompt"], prompt["identifier"], prompt["class_word"],
                                  **data)
        elif images is not None:
            lines = captions.splitlines() if captions else None
            dataset = load_batch(images, lines, prompt["instance_prompt"], prompt["identifier"], prompt["class_word"],
                                 masks=masks, **data)
        else:
            raise UserError("no subject photos: give a folder or connect an IMAGE batch.")
        report = dataset.report()
        return io.NodeOutput({"dataset": dataset, **prompt}, report, ui=ui.PreviewText(report))


class SuggestIdentifier(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_SuggestIdentifier", display_name="Suggest Identifier (DreamBooth LoRA)",
            category=common.CATEGORY,
            description="Proposes rare single-token identifiers from CLIP's own vocabulary (not English words), "
                        "ranked by how little they change the model's reading of 'a photo of a <class>'.",
            inputs=[io.Custom(common.BASE_TYPE).Input("base", optional=True, tooltip="Rank by this model's text "
                                                                                     "encoder (else: rarest first)."),
                    *IDENTIFIER_OPTIONS.node_inputs(io, only=["count", "class_word", "min_token_id"])],
            outputs=[io.String.Output(display_name="identifier", tooltip="The best proposal."),
                     io.String.Output(display_name="report", tooltip="Every proposal with its token id and why "
                                                                     "it is rare.")],
            is_output_node=True)

    @classmethod
    def validate_inputs(cls, **given) -> bool | str:
        return IDENTIFIER_OPTIONS.node_problem(given) or True

    @classmethod
    def execute(cls, count: int, class_word: str, min_token_id: int, base=None) -> io.NodeOutput:
        from ..identifiers.core import propose

        # the bare model: a LoRA the session put on for an earlier sample must not sway the scores
        model = common.sampling_session(base).without_loras() if base is not None else None
        proposals = propose(count, class_word, min_token_id, model, score=model is not None)
        report = "\n".join(f"{c.token:<6} id {c.token_id}  {c.reason()}" for c in proposals)
        return io.NodeOutput(proposals[0].token if proposals else "", report, ui=ui.PreviewText(report))


class ClassPriors(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_ClassPriors", display_name="Class Prior Images (DreamBooth LoRA)", category=common.CATEGORY,
            description="Makes (or reuses) the base model's own images of the bare class for prior preservation. "
                        "Cached per model, prompt and settings in ComfyUI's output folder: asking again makes only "
                        "the missing ones. Cancel keeps every finished image.",
            inputs=[io.Custom(common.BASE_TYPE).Input("base", tooltip="The base model that makes them."),
                    *PRIOR_OPTIONS.node_inputs(io, only=PRIOR_NODE_OPTIONS),
                    io.Int.Input("preview_count", default=4, min=0, max=64,
                                 tooltip="How many of them to show as the IMAGE output.")],
            outputs=[io.Custom(common.CLASS_IMAGES_TYPE).Output(display_name="class_images",
                                                                tooltip="The folder of class images."),
                     io.Image.Output(display_name="preview", tooltip="The first preview_count class images.")])

    @classmethod
    def validate_inputs(cls, **given) -> bool | str:
        return PRIOR_OPTIONS.node_problem(given) or True

    @classmethod
    def execute(cls, base, preview_count: int, **options) -> io.NodeOutput:
        import torch
        from PIL import Image

        from ..priors.core import generate_priors

        values = PRIOR_OPTIONS.values(options)
        cache = Path(folder_paths.get_output_directory()) / "dreambooth_lora" / "class_images"
        bare = common.sampling_session(base).without_loras()
        progress = common.Progress(values["num_class_images"])
        with common.cancellable():  # finished images are kept
            result = generate_priors(bare, base["path"], cache, values["num_class_images"],
                                     values["class_prompt"], values["negative_prompt"], values["steps"],
                                     values["guidance"], values["sampler"], values["seed"],
                                     values["resolution"], on_progress=lambda done, total: progress.set(done),
                                     should_stop=common.interrupted)
        shown = [Image.open(p).convert("RGB") for p in result.paths[:preview_count]]
        preview = common.images_to_tensor(shown) if shown else torch.zeros(1, 64, 64, 3)
        return io.NodeOutput(str(result.folder), preview, ui=ui.PreviewImage(preview, cls=cls) if shown else None)

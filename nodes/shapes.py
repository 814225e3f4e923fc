"""The shapes world inside ComfyUI: a built-in subject's photos, for the shapes example workflow."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..shapes.options import PHOTO_OPTIONS
from . import common


class ShapesSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_ShapesSubject", display_name="Shapes World Subject (DreamBooth LoRA)", category=common.CATEGORY,
            description="Renders the training photos of one of the built-in shapes-world subjects (what "
                        "`dreambooth-lora demo` trains on): 64 px photos on a few backgrounds, their captions "
                        "and masks. Feed them to Subject Photos and train on the built-in base model.",
            inputs=PHOTO_OPTIONS.node_inputs(io),
            outputs=[io.Image.Output(display_name="images", tooltip="The photos (64 × 64)."),
                     io.String.Output(display_name="captions", tooltip="One caption per photo, with {id} and "
                                                                       "{class} for Subject Photos to fill in."),
                     io.Mask.Output(display_name="masks", tooltip="Where the subject is in each photo."),
                     io.String.Output(display_name="class_word", tooltip="The subject's class (circle, square, …).")],
            is_output_node=True)

    @classmethod
    def validate_inputs(cls, **given) -> bool | str:
        return PHOTO_OPTIONS.node_problem(given) or True

    @classmethod
    def execute(cls, subject: str, count: int, seed: int) -> io.NodeOutput:
        import torch

        from ..shapes import world
        from ..shapes.core import photo_caption

        chosen = world.SUBJECTS[subject]
        scenes = world.subject_photos(chosen, count, seed)
        images = common.images_to_tensor([world.render(s) for s in scenes])
        masks = torch.from_numpy(world.render_masks(scenes))
        captions = "\n".join(photo_caption(s) for s in scenes)
        return io.NodeOutput(images, captions, masks, chosen.look.shape, ui=ui.PreviewImage(images, cls=cls))

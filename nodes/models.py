"""Base-model nodes."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..models.options import LOAD_OPTIONS


class InspectCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_InspectCheckpoint",
            display_name="Inspect Base Checkpoint (DreamBooth LoRA)",
            category="DreamBooth LoRA",
            description="Tells what a checkpoint is (SD1.x / SD2.x / SDXL, epsilon or v-prediction, native "
                        "resolution, component sizes) and whether DreamBooth LoRA can train on it. Reads the "
                        "file header only; nothing is loaded onto the GPU.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="A checkpoint from ComfyUI's models/checkpoints folder."),
                *LOAD_OPTIONS.node_inputs(io, only=["prediction_type"]),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="The findings, one per line.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, ckpt_name: str, prediction_type: str) -> bool | str:
        # Runs when the prompt is queued, so a bad value is refused before anything executes.
        if ckpt_name not in folder_paths.get_filename_list("checkpoints"):
            return f"ckpt_name: {ckpt_name!r} is not in ComfyUI's models/checkpoints folder; put the file there or pick one from the list."
        return LOAD_OPTIONS.node_problem({"prediction_type": prediction_type}) or True

    @classmethod
    def execute(cls, ckpt_name: str, prediction_type: str) -> io.NodeOutput:
        # Imported on first use: torch-heavy modules must not slow ComfyUI's start-up.
        from ..models.inspect import describe, inspect

        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        report = describe(inspect(path, LOAD_OPTIONS["prediction_type"].parse(prediction_type, "prediction_type")))
        return io.NodeOutput(report, ui=ui.PreviewText(report))

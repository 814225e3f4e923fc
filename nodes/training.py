"""The training node: a DreamBooth LoRA into ComfyUI's loras folder.

The node maps its inputs to a ``TrainJob`` with ``resume="auto"`` (the trainer's policy:
queueing the same settings again continues a cancelled run, or answers at once when it is
complete; other settings start afresh) and copies the results into models/loras and
models/embeddings.
"""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..trainer.options import CLASS_OPTIONS, TRAIN_OPTIONS
from . import common


class TrainDreamBoothLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_Train", display_name="Train DreamBooth LoRA", category=common.CATEGORY,
            description="Trains a LoRA that binds the identifier to the subject, with prior preservation, and "
                        "saves it (kohya/A1111 format) into ComfyUI's loras folder, where the stock LoraLoader "
                        "lists it. With new_tokens it also learns new token embeddings (style mode: pivotal "
                        "tuning; train_unet off: textual inversion alone) and saves them into models/embeddings "
                        "as <lora_name>.safetensors: write embedding:<lora_name> in a prompt. Cancel stops within "
                        "one step and keeps a checkpoint; queueing again with the same settings continues from it.",
            inputs=[io.Custom(common.BASE_TYPE).Input("base", tooltip="From Load Base Model."),
                    io.Custom(common.DATASET_TYPE).Input("dataset", tooltip="From Subject Photos."),
                    io.Custom(common.CLASS_IMAGES_TYPE).Input("class_images", optional=True,
                                                              tooltip="From Class Prior Images (needed when "
                                                                      "prior_preservation is class_images)."),
                    io.String.Input("lora_name", default="dreambooth_lora",
                                    tooltip="File name in models/loras (without .safetensors)."),
                    CLASS_OPTIONS["class_prompt"].node_input(io),
                    *TRAIN_OPTIONS.node_inputs(io)],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The file written into models/loras "
                                                                         "(empty for textual inversion alone)."),
                     io.Image.Output(display_name="loss_curve", tooltip="Instance and prior loss over the steps."),
                     io.String.Output(display_name="embedding_name",
                                      tooltip="The embedding written into models/embeddings (with new_tokens; else "
                                              "empty): embedding:NAME in prompts, or connect it to a sampler.")],
            is_output_node=True)

    @classmethod
    def validate_inputs(cls, **given) -> bool | str:
        name = str(given.get("lora_name", "x"))
        if not name.strip() or "/" in name or "\\" in name or name.startswith("."):
            return "lora_name: give a plain file name (no folders), e.g. sks_dog."
        return (TRAIN_OPTIONS + CLASS_OPTIONS).node_problem(given) or True

    @classmethod
    def execute(cls, base, dataset, lora_name: str, class_prompt: str, class_images=None,
                **options) -> io.NodeOutput:
        from PIL import Image

        from ..errors import UserError
        from ..runtime.files import confined_name, copy_file
        from ..trainer.checkpoint import LOSS_PLOT, state_dir_for, step_of
        from ..trainer.job import RESUME_AUTO, TrainJob, TrainingStopped, resolve_settings
        from ..trainer.loop import train

        values = {**TRAIN_OPTIONS.values(options), "class_prompt": class_prompt,
                  **{k: dataset[k] for k in ("instance_prompt", "identifier", "class_word")},
                  "resolution": dataset["dataset"].resolution, "crop": dataset["dataset"].crop,
                  "flip": dataset["dataset"].flip}
        settings = resolve_settings(values)
        if settings.prior_preservation == "class_images" and not class_images:
            raise UserError("prior_preservation is class_images but no class images are connected: add a Class "
                            "Prior Images node, or set prior_preservation to base_model (no class images needed).")
        work = Path(folder_paths.get_output_directory()) / "dreambooth_lora"
        final = confined_name(folder_paths.get_folder_paths("loras")[0], f"{lora_name}.safetensors")
        staged = confined_name(work, f"{lora_name}.safetensors")
        tokens = settings.new_tokens > 0
        lora_due = settings.train_unet or settings.train_text_encoder
        # the embedding is named like the LoRA (embedding:<lora_name>); alone, it is the output itself
        staged_embedding = (confined_name(work / "embeddings", f"{lora_name}.safetensors") if lora_due else staged) \
            if tokens else None
        final_embedding = confined_name(folder_paths.get_folder_paths("embeddings")[0], f"{lora_name}.safetensors") \
            if tokens else None
        state = state_dir_for(staged)
        progress = common.Progress(settings.steps)
        cancel = common.CancelWatch()
        common.drop_sessions()
        common.free_comfyui_memory()
        result = None
        try:
            with common.training_mode():  # the model too: weights made under inference_mode cannot train
                job = TrainJob(base=base["path"], output=str(staged), options=settings,
                               instance_dataset=dataset["dataset"], class_dir=class_images, resume=RESUME_AUTO,
                               overwrite=True, base_model=common.load_base(base),
                               embedding_output=str(staged_embedding) if staged_embedding else None)
                result = train(job, should_stop=cancel,
                               on_step=lambda row: cancel.quietly(progress.set, row["step"]),
                               on_preview=lambda path: cancel.quietly(progress.set, step_of(path), Image.open(path)))
        except TrainingStopped:
            cancel.stop()  # ComfyUI's Cancel; the checkpoint is saved
        finally:
            common.release()
        if lora_due:
            copy_file(staged, final)
        if final_embedding is not None:
            copy_file(staged_embedding, final_embedding)
        curve_path = state / LOSS_PLOT
        curve = common.images_to_tensor([Image.open(curve_path).convert("RGB")]) if curve_path.exists() else \
            common.images_to_tensor([Image.new("RGB", (64, 64), "white")])
        steps = result.steps_done if result is not None else settings.steps
        written = ([f"models/loras/{final.name}"] if lora_due else []) + \
            ([f"models/embeddings/{final_embedding.name} (embedding:{final_embedding.stem})"] if tokens else [])
        text = f"{' and '.join(written)}: {steps} steps; state and checkpoints in {state}"
        return io.NodeOutput(final.name if lora_due else "", curve, final_embedding.name if tokens else "",
                             ui={**ui.PreviewImage(curve, cls=cls).as_dict(), "text": [text]})


class SaveLoRAStep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_SaveStep", display_name="Save LoRA of a Training Step (DreamBooth LoRA)",
            category=common.CATEGORY,
            description="Copies the LoRA of one saved checkpoint of a training run (e.g. the step Evaluate or "
                        "a grid liked best) into models/loras under a new name, for the stock LoraLoader.",
            inputs=[io.String.Input("lora_name", default="dreambooth_lora.safetensors", force_input=True,
                                    tooltip="The training's LoRA (Train DreamBooth LoRA's lora_name output)."),
                    io.Int.Input("step", default=0, min=0, max=1_000_000,
                                 tooltip="The checkpoint step to save (0 = the final LoRA)."),
                    io.String.Input("save_as", default="dreambooth_lora_step",
                                    tooltip="File name in models/loras (without .safetensors).")],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The file written into models/loras.")],
            is_output_node=True)

    @classmethod
    def execute(cls, lora_name: str, step: int, save_as: str) -> io.NodeOutput:
        from ..runtime.files import confined_name, copy_file
        from ..trainer.checkpoint import lora_of_step

        trained = Path(folder_paths.get_output_directory()) / "dreambooth_lora" / lora_name
        source = lora_of_step(trained, step) if step else Path(folder_paths.get_full_path_or_raise("loras", lora_name))
        final = confined_name(folder_paths.get_folder_paths("loras")[0], f"{save_as}.safetensors")
        copy_file(source, final)
        return io.NodeOutput(final.name, ui=ui.PreviewText(f"{final.name} ← {source}"))

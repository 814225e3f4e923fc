"""The training node: a DreamBooth LoRA into ComfyUI's loras folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..trainer.options import CLASS_OPTIONS, TRAIN_OPTIONS
from . import common

CATEGORY = "DreamBooth LoRA"
# Node defaults that differ from the CLI's: what the users start from.
NODE_DEFAULTS = {"steps": 1000}


def _inputs() -> list:
    inputs = []
    for option in TRAIN_OPTIONS:
        if option.node:
            item = option.node_input(io)
            if option.name in NODE_DEFAULTS:
                item.default = NODE_DEFAULTS[option.name]
            inputs.append(item)
    return inputs


class TrainDreamBoothLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DBLoRA_Train", display_name="Train DreamBooth LoRA", category=CATEGORY,
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
                    *_inputs()],
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

        from ..converters.core import output_path_in
        from ..errors import UserError
        from ..trainer.checkpoint import list_checkpoints
        from ..trainer.core import TrainingError, TrainingStopped, TrainJob, resolve_options, state_dir_for, train

        values = {**TRAIN_OPTIONS.values(options), "class_prompt": class_prompt,
                  **{k: dataset[k] for k in ("instance_prompt", "identifier", "class_word")},
                  "resolution": dataset["dataset"].resolution, "crop": dataset["dataset"].crop,
                  "flip": dataset["dataset"].flip}
        values = resolve_options(values)
        if values["prior_preservation"] == "class_images" and not class_images:
            raise UserError("prior_preservation is class_images but no class images are connected: add a Class "
                            "Prior Images node, or set prior_preservation to base_model (no class images needed).")
        work = Path(folder_paths.get_output_directory()) / "dreambooth_lora"
        final = output_path_in(folder_paths.get_folder_paths("loras")[0], f"{lora_name}.safetensors")
        staged = output_path_in(work, f"{lora_name}.safetensors")
        tokens = values["new_tokens"] > 0
        lora_due = values["train_unet"] or values["train_text_encoder"]
        # the embedding is named like the LoRA (embedding:<lora_name>); alone, it is the output itself
        staged_embedding = (output_path_in(work / "embeddings", f"{lora_name}.safetensors") if lora_due else staged) \
            if tokens else None
        final_embedding = output_path_in(folder_paths.get_folder_paths("embeddings")[0], f"{lora_name}.safetensors") \
            if tokens else None
        state = state_dir_for(staged)
        progress = common.Progress(values["steps"])
        cancel = common.CancelWatch()
        common.drop_sessions()
        common.free_comfyui_memory()

        def run(resume: str | None):
            with common.training_mode():  # the model too: weights made under inference_mode cannot train
                job = TrainJob(base=base["path"], output=str(staged), options=values,
                               instance_dataset=dataset["dataset"], class_dir=class_images, resume=resume,
                               overwrite=True, base_model=common.load_base(base),
                               embedding_output=str(staged_embedding) if staged_embedding else None)
                return train(job, should_stop=cancel,
                             on_step=lambda row: cancel.quietly(progress.set, row["step"]),
                             on_preview=lambda path: cancel.quietly(progress.set, progress_step(path),
                                                                    Image.open(path)))

        def progress_step(path: Path) -> int:
            return int(path.stem.split("-")[1])

        done = list_checkpoints(state)
        latest = int(done[-1].name.split("-")[1]) if done else 0
        try:
            if latest == values["steps"] and staged.is_file():
                result = None  # this very run already finished: its file is the answer
            else:
                if latest >= values["steps"]:
                    shutil.rmtree(state, ignore_errors=True)  # asked for fewer steps than were done: a new run
                try:
                    result = run(str(state) if 0 < latest < values["steps"] else None)
                except TrainingError as err:
                    if "was trained with other settings" not in str(err) and "another base model" not in str(err):
                        raise
                    shutil.rmtree(state, ignore_errors=True)  # a different run: start it from scratch
                    result = run(None)
        except TrainingStopped:
            cancel.stop()  # ComfyUI's Cancel; the checkpoint is saved
        finally:
            common.release()
        if lora_due:
            final.parent.mkdir(parents=True, exist_ok=True)
            common.copy_atomically(staged, final)
        if final_embedding is not None:
            final_embedding.parent.mkdir(parents=True, exist_ok=True)
            common.copy_atomically(staged_embedding, final_embedding)
        curve_path = state / "loss.png"
        curve = common.images_to_tensor([Image.open(curve_path).convert("RGB")]) if curve_path.exists() else \
            common.images_to_tensor([Image.new("RGB", (64, 64), "white")])
        steps = result.steps_done if result is not None else values["steps"]
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
            category=CATEGORY,
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
        from ..converters.core import output_path_in
        from ..sampling.core import step_lora

        trained = Path(folder_paths.get_output_directory()) / "dreambooth_lora" / lora_name
        source = Path(step_lora(str(trained), step)) if step else \
            Path(folder_paths.get_full_path_or_raise("loras", lora_name))
        final = output_path_in(folder_paths.get_folder_paths("loras")[0], f"{save_as}.safetensors")
        common.copy_atomically(source, final)
        return io.NodeOutput(final.name, ui=ui.PreviewText(f"{final.name} ← {source}"))

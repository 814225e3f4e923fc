"""The "DreamBooth LoRA" tab: the pack's stages in order (subject photos, identifier, class
priors, training, sample grid) above one run monitor (status, step, losses, ETA, previews,
console) that follows whichever command runs.

Every option widget is made from its Option definition (widgets.py). Every button starts one
``dreambooth-lora`` command as a run (runs.py) in the training environment and then follows it:
its handler is a generator that yields the monitor's state every second until the run ends (the
webui's gradio queue streams each yield to the page). Closing the page does not stop a run; pick
it under "Run" and press "Watch" to follow it again.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

from ..data.options import DATA_OPTIONS, PROMPT_OPTIONS
from ..errors import UserError
from ..identifiers.options import IDENTIFIER_OPTIONS
from ..sampling.options import SAMPLE_OPTIONS
from ..trainer.options import CLASS_OPTIONS
from . import host, jobs
from .widgets import widgets

POLL_SECONDS = 1.0
CONSOLE_LINES = 10  # the newest lines (a gradio 3.41 textbox does not scroll to its end)
# The trainer's options in folded groups (names not listed here land in "More").
TRAIN_GROUPS = {
    "Length and learning rate": ("steps", "learning_rate", "batch_size", "gradient_accumulation", "lr_scheduler",
                                 "warmup_steps", "optimizer", "weight_decay", "max_grad_norm"),
    "Adapter": ("adapter", "rank", "alpha", "dropout", "unet_targets", "train_unet"),
    "Text encoder": ("train_text_encoder", "text_encoder_lr", "text_encoder_steps"),
    "Prior preservation and loss": ("prior_preservation", "prior_weight", "loss", "huber_delta", "min_snr_gamma",
                                    "noise_offset", "prediction_type"),
    "Saving and previews": ("seed", "save_every", "keep_checkpoints", "validation_prompts", "validation_every",
                            "validation_scales", "validation_steps"),
    "Speed and memory": ("mixed_precision", "gradient_checkpointing", "cache_latents", "base_precision", "offload",
                         "fit_to_vram"),
    "Styles and new tokens": ("mode", "new_tokens", "token_init", "token_lr", "token_steps_fraction",
                              "caption_template", "bundle_embeddings"),
}
SHOWN_EARLIER = {o.name for o in (*DATA_OPTIONS, *PROMPT_OPTIONS, *CLASS_OPTIONS)}
SUGGESTION = re.compile(r"^(\S+)\s+id \d+")


def environment_text(extension) -> str:
    status = extension.environment_status()
    if status["ready"]:
        return f"Training runs in its own environment: `{status['python']}` (the webui's packages are never changed)."
    return ("**The training environment is not set up.** The webui's install.py makes it at start-up (a few "
            "minutes, once); press the button to make it now.")


def status_text(status: dict) -> str:
    p = status["progress"]
    parts = [f"**{status['title']}** ({status['id']}): {status['status']}"]
    if p["total"]:
        parts.append(f"{p['phase'] or 'step'} {p['step']}/{p['total']}")
    if p["eta"] and status["status"] == "running":
        parts.append(f"elapsed {p['elapsed']}, ETA {p['eta']}")
    losses = {k: v for k, v in p["losses"].items() if isinstance(v, (int, float))}
    if losses:
        parts.append(", ".join(f"{k.replace('loss_', '')} {v:.4g}" for k, v in losses.items()))
    text = " · ".join(parts)
    if status["error"]:
        text += f"\n\n**Error:** {status['error']}"
    if status["status"] == "stopping":
        text += "\n\nStopping after the current step (press Cancel again to quit at once, keeping the last checkpoint)."
    if status["status"] == "cancelled" and status["kind"] == "train":
        text += "\n\nStopped with a checkpoint kept: **Resume** continues it."
    if status["published"]:
        text += "\n\nWritten: " + ", ".join(f"`{Path(p).name}`" for p in status["published"])
    return text


def build_tab(extension) -> Any:
    import gradio as gr

    places, runs = extension.places, extension.runs
    fields: dict[str, Any] = {}  # request key → widget, in the order handlers receive their values

    with gr.Blocks(analytics_enabled=False) as tab:
        environment = gr.Markdown(environment_text(extension), elem_id="dblora_environment")
        setup = gr.Button("Set up training environment", elem_id="dblora_setup",
                          visible=extension.training_python() is None)
        with gr.Row():
            fields["checkpoint"] = gr.Dropdown(
                choices=host.checkpoint_titles(), value=host.selected_checkpoint(), label="Base checkpoint",
                info="The webui's checkpoint to start from (its current selection by default). The LoRA is listed "
                     "for this model's family.", elem_id="dblora_checkpoint", scale=4)
            refresh = gr.Button("Refresh lists", elem_id="dblora_refresh", scale=1)
        with gr.Tabs(elem_id="dblora_stages"):
            with gr.Tab("1. Subject photos", elem_id="dblora_tab_photos"):
                fields["instance_dir"] = gr.Textbox(
                    label="Subject photos folder", info="A folder with 3-20 photos of the subject (a <name>.txt "
                    "beside a photo is its caption).", placeholder="/path/to/photos", elem_id="dblora_instance_dir")
                data = widgets(DATA_OPTIONS, gr)
                check = gr.Button("Check photos", elem_id="dblora_check_photos")
            with gr.Tab("2. Identifier", elem_id="dblora_tab_identifier"):
                prompt = widgets(PROMPT_OPTIONS, gr)
                suggest_opts = widgets(IDENTIFIER_OPTIONS, gr, prefix="identifiers_",
                                       only=[o.name for o in IDENTIFIER_OPTIONS if o.name not in prompt])
                with gr.Row():
                    suggest = gr.Button("Suggest identifiers", elem_id="dblora_suggest")
                    suggestions = gr.Dropdown(choices=[], label="Suggestions", info="Pick one to use it as the "
                                              "identifier.", elem_id="dblora_suggestions")
            with gr.Tab("3. Class priors", elem_id="dblora_tab_priors"):
                classes = widgets(CLASS_OPTIONS, gr)
                fields["class_dir"] = gr.Textbox(
                    label="Class images folder", info="Empty: generated by the base model and cached in "
                    f"{places.class_images} (training makes the missing ones). A folder of your own class photos "
                    "is used as is.", elem_id="dblora_class_dir")
                make_priors = gr.Button("Make class images now", elem_id="dblora_make_priors")
            with gr.Tab("4. Training", elem_id="dblora_tab_training"):
                fields["name"] = gr.Textbox(label="LoRA name", info=f"Written as {places.lora}/<name>.safetensors; "
                                            "use it as <lora:name:1>.", elem_id="dblora_name")
                training: dict[str, Any] = {}
                rest = [o for o in jobs.TRAIN_OPTIONS if o.name not in SHOWN_EARLIER]
                grouped = {name for names in TRAIN_GROUPS.values() for name in names}
                groups = {**TRAIN_GROUPS, "More": tuple(o.name for o in rest if o.name not in grouped)}
                for index, (title, names) in enumerate(groups.items()):
                    members = [o for o in rest if o.name in names]
                    if members:
                        with gr.Accordion(title, open=index == 0):
                            training.update(widgets(members, gr))
                fields["overwrite"] = gr.Checkbox(value=False, label="Overwrite", info="Replace a LoRA of this name "
                                                  "and start its training again.", elem_id="dblora_overwrite")
                with gr.Row():
                    start = gr.Button("Train", variant="primary", elem_id="dblora_train")
                    cancel = gr.Button("Cancel (keeps a checkpoint)", elem_id="dblora_cancel")
                    resume = gr.Button("Resume", elem_id="dblora_resume")
            with gr.Tab("5. Sample grid", elem_id="dblora_tab_grid"):
                lora = gr.Dropdown(choices=lora_files(places), label="LoRA", info="A LoRA in the webui's LoRA folder.",
                                   elem_id="dblora_grid_lora")
                sampling = widgets(SAMPLE_OPTIONS, gr, prefix="sample_")
                with gr.Row():
                    x_axis = gr.Textbox(value="unet-scale=0,0.5,1", label="X axis", info="NAME=V1,V2,...: "
                                        "unet-scale, te-scale, guidance, seed, steps, step, prompt.",
                                        elem_id="dblora_grid_x")
                    y_axis = gr.Textbox(value="te-scale=0,1", label="Y axis", info="Same form as the X axis.",
                                        elem_id="dblora_grid_y")
                make_grid = gr.Button("Make grid", elem_id="dblora_make_grid")
        with gr.Row():
            run = gr.Dropdown(choices=run_choices(runs), label="Run", info="Every command of this tab is a run; pick "
                              "one to follow it again.", elem_id="dblora_run")
            watch = gr.Button("Watch", elem_id="dblora_watch")
        status = gr.Markdown("", elem_id="dblora_status")
        with gr.Row():
            previews = gr.Gallery(label="Previews", columns=4, elem_id="dblora_previews")
            result = gr.Image(label="Loss curve / grid", type="filepath", interactive=False, elem_id="dblora_result")
        console = gr.Textbox(label="Console", lines=10, max_lines=10, interactive=False, elem_id="dblora_console")

        option_widgets = {**data, **prompt, **classes, **training}
        monitor = [run, status, previews, result, console, suggestions]

        def view(run_status: dict) -> dict:
            p = run_status["progress"]
            picture = p["loss_plot"] if run_status["kind"] == "train" else run_status["output"]
            picture = picture if picture and Path(picture).is_file() else None
            update = {run: gr.update(choices=run_choices(runs), value=run_status["id"]),
                      status: status_text(run_status), previews: p["previews"][-8:], result: picture,
                      console: "\n".join(run_status["console"].splitlines()[-CONSOLE_LINES:])}
            if run_status["kind"] == "identifiers" and run_status["status"] == "done":
                found = [m[1] for m in map(SUGGESTION.match, run_status["console"].splitlines()) if m]
                update[suggestions] = gr.update(choices=found, value=found[0] if found else None)
            return update

        def follow(run_id: str):
            shown = None
            while True:
                current = runs.status(run_id)
                seen = (current["status"], current["progress"], current["console"])
                if seen != shown:  # the page redraws only what changed
                    shown = seen
                    yield view(current)
                if current["status"] not in ("running", "stopping"):
                    return
                time.sleep(POLL_SECONDS)

        def problem(text: str) -> dict:
            return {status: f"**Not started:** {text}"}

        def launch(make, extra: dict | None = None):
            """The click handler and its inputs: it starts the command ``make(values)`` builds from
            the shared fields, the option widgets and ``extra`` (keys prefixed, never an option's
            name), then follows the run."""
            extra = extra or {}
            keys = list(fields) + list(option_widgets) + list(extra)

            def handler(*given):
                values = dict(zip(keys, given))
                try:
                    started = runs.start(make(values))
                except UserError as err:
                    yield problem(str(err))
                    return
                yield from follow(started["id"])
            return handler, list(fields.values()) + list(option_widgets.values()) + list(extra.values())

        def picked(values: dict, names, prefix: str = "") -> dict:
            return {name: values[prefix + name] for name in names if prefix + name in values}

        def train_request(values: dict):
            return extension.train_command({
                "name": values["name"], "instance_dir": values["instance_dir"], "checkpoint": values["checkpoint"],
                "class_dir": values["class_dir"] or None, "overwrite": values["overwrite"],
                "options": picked(values, option_widgets)})

        def base(values: dict) -> Path:
            return host.checkpoint_file(values["checkpoint"])

        check.click(*launch(lambda v: jobs.dataset_command(v["instance_dir"], picked(v, {**data, **prompt}))),
                    monitor)
        suggest.click(*launch(lambda v: jobs.identifiers_command(base(v), {
            **picked(v, prompt), **picked(v, suggest_opts, "identifiers.")}),
            {f"identifiers.{k}": w for k, w in suggest_opts.items()}), monitor)
        make_priors.click(*launch(lambda v: jobs.priors_command(base(v), v["class_dir"], v, v["resolution"], places)),
                          monitor)
        start.click(*launch(train_request), monitor)
        grid_inputs = {"grid.lora": lora, "grid.x": x_axis, "grid.y": y_axis,
                       **{f"sample.{k}": w for k, w in sampling.items()}}
        make_grid.click(*launch(lambda v: jobs.grid_command(
            base(v), jobs.lora_in(places, v["grid.lora"]), v["grid.x"], v["grid.y"], picked(v, sampling, "sample."),
            places, time.strftime("%Y%m%d-%H%M%S")), grid_inputs), monitor)

        def resume_run(run_id: str):
            try:
                started = runs.start(runs.resume_command(run_id or ""))
            except (UserError, KeyError) as err:
                yield problem(str(err) if isinstance(err, UserError) else "pick a training run under 'Run' first.")
                return
            yield from follow(started["id"])

        def cancel_run(run_id: str) -> dict:
            try:  # a second press while the run is stopping quits at once
                return view(runs.cancel(run_id or "", now=runs.status(run_id or "")["status"] == "stopping"))
            except KeyError:
                return problem("pick a running run under 'Run' first.")

        def watch_run(run_id: str):
            try:
                yield from follow(run_id or "")
            except KeyError:
                yield problem("pick a run under 'Run' first.")

        def set_up():
            worker = threading.Thread(target=extension.set_up_environment, daemon=True)
            worker.start()
            while worker.is_alive():
                yield {console: "\n".join(extension.setup_log), environment: environment_text(extension)}
                time.sleep(POLL_SECONDS)
            yield {console: "\n".join(extension.setup_log), environment: environment_text(extension),
                   setup: gr.update(visible=extension.training_python() is None)}

        def refresh_lists() -> dict:
            return {fields["checkpoint"]: gr.update(choices=host.checkpoint_titles()),
                    lora: gr.update(choices=lora_files(places)), run: gr.update(choices=run_choices(runs))}

        resume.click(resume_run, [run], monitor)
        cancel.click(cancel_run, [run], monitor)
        watch.click(watch_run, [run], monitor)
        setup.click(set_up, [], [console, environment, setup])
        refresh.click(refresh_lists, [], [fields["checkpoint"], lora, run])
        suggestions.change(lambda chosen: gr.update(value=chosen) if chosen else gr.update(), [suggestions],
                           [prompt["identifier"]])
    return tab


def lora_files(places) -> list[str]:
    return sorted(p.name for p in places.lora.glob("*.safetensors")) if places.lora.is_dir() else []


def run_choices(runs) -> list[str]:
    return [r["id"] for r in runs.list()]

"""What a training run is asked to do, and every check that needs no model.

    job = TrainJob(base="model.safetensors", output="sks_dog.safetensors", instance_dir="photos/",
                   class_dir="class_cache/", options={"steps": 800})
    plan = plan_run(job)   # options resolved, files and resume checked: nothing loaded yet

``TrainJob.resume`` is the resume policy, the same for the CLI and the node: None starts a new
run; a path continues the run saved there and refuses other settings (``ResumeMismatch``);
``"auto"`` continues this output's own run when its settings match, answers at once when that
run is already complete, and starts afresh (replacing its state folder) when they differ.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..data.core import fill_caption
from ..errors import UserError
from ..planner.report import fit_job
from ..runtime.devices import default_device
from ..runtime.files import fingerprint
from ..runtime.locks import LOCK_FILE, OWNER_FILE
from ..runtime.tokens import token_names
from .checkpoint import jsonable, list_checkpoints, read_record, resolve_resume, state_dir_for, step_of
from .options import DEFAULT_TEMPLATES, TrainSettings

RESUME_AUTO = "auto"
# Options whose change would make a resumed run a different run (the rest may change on resume).
FREE_ON_RESUME = {"steps", "save_every", "keep_checkpoints", "validation_prompts", "validation_every", "validation_loss_every",
                  "validation_scales", "validation_steps"}


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, a checkpoint that does not fit)."""


class ResumeMismatch(TrainingError):
    """A checkpoint belongs to another run: another base model, or settings that may not change
    on resume. ``differences`` maps each differing name ('base_fingerprint' for the base) to
    (saved, given)."""

    def __init__(self, folder: Path, differences: Mapping[str, tuple[Any, Any]]):
        self.folder, self.differences = folder, dict(differences)
        if "base_fingerprint" in self.differences:
            saved, given = self.differences["base_fingerprint"]
            text = (f"{folder}: was trained on another base model (fingerprint {saved}, this one {given}); "
                    "resume with the same --base.")
        else:
            listing = ", ".join(f"{k}: {saved!r} → {given!r}" for k, (saved, given) in list(self.differences.items())[:4])
            text = (f"{folder}: was trained with other settings ({listing}); resume with the same options "
                    "(only --steps, --save-every and validation settings may change).")
        super().__init__(text)


class TrainingStopped(Exception):
    """Raised inside the loop when should_stop() asks for it; the checkpoint is already saved."""


@dataclass
class TrainJob:
    base: str  # checkpoint path (its fingerprint goes into the metadata)
    output: str  # the kohya LoRA file to write
    options: Mapping[str, Any] | Any = field(default_factory=dict)  # ALL_OPTIONS values or a TrainSettings
    instance_dir: str | None = None
    instance_dataset: Any = None  # a data.core.InstanceDataset instead of instance_dir (ComfyUI images)
    class_dir: str | None = None
    resume: str | None = None  # None, a state or step-N folder, or "auto" (see the module's docstring)
    overwrite: bool = False
    base_model: Any = None  # an already loaded base model (ComfyUI); loaded from ``base`` if None
    load_options: Mapping[str, Any] = field(default_factory=dict)
    # Where the learned token embeddings go (with --new-tokens): default '<output stem>_emb.safetensors';
    # textual inversion alone (no adapter) writes them to ``output`` itself.
    embedding_output: str | None = None


@dataclass
class TrainResult:
    output: Path | None  # None when stopped before the end
    state_dir: Path
    last_checkpoint: Path | None
    steps_done: int
    seconds: float
    log: list[dict]
    stopped: bool = False
    embedding: Path | None = None  # the embedding file (with new tokens)
    lora: Path | None = None  # the LoRA file (None for textual inversion alone)
    already_done: bool = False  # resume="auto" found this very run complete: nothing was trained


@dataclass(frozen=True)
class RunPlan:
    """A checked job: the settings it runs with, where everything goes, where it starts from."""
    settings: Any  # TrainSettings
    output: Path
    state_dir: Path
    embedding: Path | None
    base_fingerprint: str
    resume_from: Path | None = None  # the checkpoint to continue from
    restart: bool = False  # resume="auto" found another run in the state folder: replace it
    finished: bool = False  # resume="auto" found this very run complete

    @property
    def lora_due(self) -> bool:
        """Whether a LoRA file is written (not for textual inversion alone)."""
        return self.settings.train_unet or self.settings.train_text_encoder


# --- settings and captions ----------------------------------------------------------------


def resolve_settings(options: Mapping[str, Any] | Any) -> Any:
    """The run's TrainSettings: options checked, defaults filled in, and the values that depend on
    others made explicit (what the run and its record use)."""
    settings = options if isinstance(options, TrainSettings) else TrainSettings.of(dict(options))
    if settings.prior_preservation == "auto":
        settings = settings.replace(prior_preservation="off" if settings.mode == "style" else "class_images")
    return settings.replace(class_prompt=fill_caption(settings.class_prompt, "", settings.class_word))


def token_text(settings) -> str:
    """What ``{tokens}`` stands for: the new tokens ('<s1><s2>'), or the identifier without them."""
    return "".join(token_names(settings.new_tokens)) if settings.new_tokens else settings.identifier


def caption_maker(settings) -> Callable[[str], str]:
    """The instance caption as trained: the dataset's caption put through the caption template;
    in subject mode new tokens take the identifier's place."""
    template = settings.caption_template or DEFAULT_TEMPLATES[settings.mode]
    tokens = token_text(settings)
    identifier = settings.identifier.strip()
    swap = settings.new_tokens > 0 and settings.mode == "subject" and identifier
    pattern = re.compile(rf"(?<![\w<]){re.escape(identifier)}(?![\w>])") if swap else None

    def make(caption: str) -> str:
        text = template.replace("{caption}", caption).replace("{tokens}", tokens).strip()
        return pattern.sub(lambda _: tokens, text) if pattern is not None else text

    return make


def embedding_path(job: TrainJob, output: Path, settings) -> Path | None:
    """Where the learned embeddings go: None without new tokens; ``output`` itself for textual
    inversion alone; else ``job.embedding_output`` or '<output stem>_emb.safetensors'."""
    if not settings.new_tokens:
        return None
    if not settings.train_unet and not settings.train_text_encoder:
        return output
    if job.embedding_output:
        return Path(job.embedding_output).expanduser()
    return output.with_name(output.stem + "_emb.safetensors")


def check_captions(instances, settings) -> None:
    """New tokens must appear in the captions as trained, or they would learn nothing."""
    make_caption = caption_maker(settings)
    if settings.new_tokens and not any(token_text(settings) in make_caption(item.caption) for item in instances.images):
        raise UserError(f"no caption contains the new tokens {token_text(settings)}: put {{tokens}} into "
                        "--caption-template (e.g. '{caption}, in the style of {tokens}') or, in subject mode, "
                        "the identifier into the captions.")


# --- resuming ---------------------------------------------------------------------------


def resume_mismatch(record: Mapping[str, Any], settings, base_fingerprint: str,
                    folder: Path) -> ResumeMismatch | None:
    """Why the checkpoint with ``record`` cannot continue with these settings (None if it can)."""
    if record.get("base_fingerprint") != base_fingerprint:
        return ResumeMismatch(folder, {"base_fingerprint": (record.get("base_fingerprint"), base_fingerprint)})
    saved = record.get("options", {})
    given = settings.as_dict()
    changed = {k: (saved[k], v) for k, v in given.items()
               if k not in FREE_ON_RESUME and k in saved and saved[k] != jsonable(v)}
    return ResumeMismatch(folder, changed) if changed else None


def _resume_choice(job: TrainJob, settings, state_dir: Path, output: Path, base_fingerprint: str) -> dict:
    """``RunPlan``'s resume fields for the job's resume policy."""
    if not job.resume:
        return {}
    if job.resume != RESUME_AUTO:
        checkpoint = resolve_resume(job.resume)
        record = read_record(checkpoint)
        mismatch = resume_mismatch(record, settings, base_fingerprint, checkpoint)
        if mismatch is not None:
            raise mismatch
        if record["step"] >= settings.steps:
            raise UserError(f"{checkpoint}: is already at step {record['step']}; raise --steps above it to train more.")
        return {"resume_from": checkpoint}
    checkpoints = list_checkpoints(state_dir)
    if not checkpoints:
        return {}
    latest = checkpoints[-1]
    if resume_mismatch(read_record(latest), settings, base_fingerprint, latest) is not None:
        return {"restart": True}
    if step_of(latest) == settings.steps and output.is_file():
        return {"finished": True, "resume_from": latest}
    if step_of(latest) >= settings.steps:  # fewer steps asked for than were done: a new run
        return {"restart": True}
    return {"resume_from": latest}


def plan_run(job: TrainJob) -> RunPlan:
    """Resolve the options and check everything that needs no model, so a run fails at once,
    before any loading or training."""
    settings = resolve_settings(job.options)
    settings = fit_job(job, settings, default_device())  # --fit-to-vram: the fastest settings that fit
    if not (settings.train_unet or settings.train_text_encoder or settings.new_tokens):
        raise UserError("nothing to train: --no-train-unet without --train-text-encoder needs --new-tokens N "
                        "(textual inversion).")
    if settings.new_tokens and not settings.train_unet and not settings.train_text_encoder and \
            settings.token_steps_fraction < 1:
        raise UserError("--token-steps-fraction below 1 with textual inversion alone leaves nothing to train after "
                        "the stop; lower --steps instead.")
    output = Path(job.output).expanduser()
    if output.suffix != ".safetensors":
        raise UserError(f"{output}: the output must be a .safetensors file (the kohya/A1111 LoRA).")
    state_dir = state_dir_for(output)
    base_fingerprint = fingerprint(job.base) if Path(job.base).expanduser().exists() else "unknown"
    choice = _resume_choice(job, settings, state_dir, output, base_fingerprint)
    plan = RunPlan(settings, output, state_dir, embedding_path(job, output, settings), base_fingerprint, **choice)
    if plan.finished:
        return plan
    continuing = plan.resume_from is not None
    if output.exists() and not job.overwrite and not continuing:
        raise UserError(f"{output}: exists; choose another --output, pass --overwrite, or --resume {state_dir}.")
    if plan.embedding is not None and plan.embedding != output:
        if plan.embedding.suffix != ".safetensors":
            raise UserError(f"{plan.embedding}: the embedding must be a .safetensors file (A1111/ComfyUI embeddings).")
        if plan.embedding.exists() and not job.overwrite and not continuing:
            raise UserError(f"{plan.embedding}: exists; choose another --output or --embedding-output, or pass "
                            "--overwrite.")
    if settings.prior_preservation == "class_images" and not job.class_dir:
        raise UserError(f"prior preservation needs class images of '{settings.class_prompt}': pass --class-dir DIR "
                        "to generate them there with the base model (reused on later runs), make them first with "
                        "`dreambooth-lora priors --base CKPT --class-prompt '...' --out DIR`, use "
                        "--prior-preservation base_model (no class images: the frozen model is the target), or turn "
                        "it off with --prior-preservation off.")
    return plan


def clear_old_run(plan: RunPlan, say: Callable[[str], None]) -> None:
    """resume="auto" found another run in the state folder: remove it, so this run starts clean
    (the main process only)."""
    if plan.restart and plan.state_dir.exists():
        say(f"{plan.state_dir}: holds a run with other settings or more steps; starting afresh")
        for child in plan.state_dir.iterdir():
            if child.name in (LOCK_FILE, OWNER_FILE):  # this run's own lock stays
                continue
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)

"""From adapter states to files: checkpoints, the kohya LoRA with its ``ss_*`` metadata, the
embedding file of new tokens, and the final PEFT adapter with its record.

    PEFT tensors per component ──converters.from_peft──▶ Adapter ──save_kohya──▶ <output>.safetensors
    new token vectors ──write_embedding──▶ <output stem>_emb.safetensors (A1111/ComfyUI embedding)
"""

from __future__ import annotations

import errno
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from peft import inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

from ..converters.kohya import save_kohya
from ..converters.peft import from_peft
from ..converters.structure import unet_layout_of
from ..models.families import FAMILIES
from ..converters.embeddings import bundle_tensors, write_embedding
from ..data.options import DATA_OPTIONS
from ..runtime.files import StorageError, free_bytes, storage_error, write_safetensors, write_text
from ..runtime.peft import TEXT_TARGETS, UNET_TARGETS, config_dict, peft_state
from ..runtime.tokens import add_tokens, token_names
from .checkpoint import EMBEDDING_FILE, FINAL_DIR, TRAINER_JSON, step_dir_name, write_checkpoint
from .job import TrainingError, token_text
from .logs import write_log
from .model import settings_adapter_config
from .options import CLASS_OPTIONS, TRAIN_OPTIONS, TrainSettings

TRAINING_JSON = "training.json"  # the final adapter's record (a checkpoint's is trainer.json)
COMMENT = "ComfyUI-DreamBooth-LoRA"


def peft_config_dict(settings, targets: list[str]) -> dict:
    return config_dict(settings_adapter_config(settings, targets))


class ResultWriter:
    """The user-facing files of one step's adapter states: the kohya LoRA (with the embedding
    bundled if asked) and the embedding file."""

    def __init__(self, settings, family: str, unet, components: tuple[str, ...], record: Mapping[str, Any],
                 embedding_name: str, lora_due: bool):
        self.settings, self.family, self.unet, self.components = settings, family, unet, components
        self.record, self.embedding_name, self.lora_due = record, embedding_name, lora_due

    def write(self, states: Mapping[str, Mapping[str, torch.Tensor]], step: int, lora: Path | None,
              embedding: Path | None, overwrite: bool) -> None:
        vectors = [states["tokens"][c] for c in self.components[1:]] if "tokens" in states else None
        if lora is not None and self.lora_due:
            adapter = self.adapter({k: v for k, v in states.items() if k != "tokens"})
            bundle = bundle_tensors(self.family, self.embedding_name, vectors) \
                if vectors is not None and self.settings.bundle_embeddings else None
            self.write_lora(adapter, lora, step, overwrite, bundle)
        if embedding is not None and vectors is not None:
            write_embedding(embedding, self.family, vectors, token_text(self.settings), overwrite=overwrite, metadata={
                "ss_steps": step, "dreambooth_lora.base_fingerprint": self.record["base_fingerprint"],
                "ss_sd_model_name": Path(self.record["base"]).name, "ss_training_comment": COMMENT})

    def adapter(self, states: Mapping[str, Mapping[str, torch.Tensor]]):
        """The converters' Adapter of PEFT states (each component with its own PEFT config)."""
        s = self.settings
        configs = {"unet": peft_config_dict(s, UNET_TARGETS[s.unet_targets])}
        components = {name: (tensors, configs.get(name) or peft_config_dict(s, TEXT_TARGETS))
                      for name, tensors in states.items()}
        return from_peft(self.family, unet_layout_of(self.unet.config), components)

    def write_lora(self, adapter, path: Path, step: int, overwrite: bool,
                   bundle: Mapping[str, torch.Tensor] | None) -> Path:
        s, values = self.settings, self.settings.as_dict()
        metadata = {**TRAIN_OPTIONS.metadata(values), **DATA_OPTIONS.metadata(values), **CLASS_OPTIONS.metadata(values),
                    "ss_steps": str(step), "ss_training_comment": COMMENT,
                    "dreambooth_lora.base_fingerprint": self.record["base_fingerprint"],
                    "ss_sd_model_name": Path(self.record["base"]).name}
        if s.prior_preservation == "off":
            metadata["ss_prior_loss_weight"] = "0"
        for computed in ("ss_network_dim", "ss_network_alpha"):  # from the adapter itself (mixed ranks possible)
            metadata.pop(computed)
        size = s.resolution
        metadata.update({"ss_resolution": f"({size}, {size})", "modelspec.resolution": f"{size}x{size}"})
        trigger = f"{s.identifier} {s.class_word}".strip()
        if s.new_tokens:
            # the tokens are only known to a UI through the embedding file: its name is the trigger
            trigger = self.embedding_name
            metadata.update({"dreambooth_lora.tokens": token_text(s), "dreambooth_lora.embedding": self.embedding_name})
        elif s.mode == "style":
            trigger = token_text(s)
        return save_kohya(adapter, path, dtype="fp16", overwrite=overwrite,
                          prediction_type=self.record["prediction_type"], trigger_phrase=trigger,
                          hyperparameters=self.record["options"], extra=metadata, extra_tensors=bundle)

    def write_final(self, state_dir: Path, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """The PEFT adapter and every hyper-parameter, next to the kohya file."""
        folder = state_dir / FINAL_DIR
        for component, tensors in states.items():
            write_safetensors(folder / f"adapter_{component}.safetensors", tensors)
        targets = UNET_TARGETS[self.settings.unet_targets]
        config = {"targets": {"unet": targets, "text_encoder": TEXT_TARGETS},
                  "peft_config": peft_config_dict(self.settings, targets), **self.record}
        write_text(folder / TRAINING_JSON, json.dumps(config, indent=1, default=str))


class Checkpointer:
    """Resumable checkpoints of the running training (written by the main process only)."""

    def __init__(self, accelerator, unet_run, te_runs: list, components: tuple[str, ...], trainables, optimizer,
                 lr_scheduler, state_dir: Path, writer: ResultWriter, keep: int, last: Path | None):
        self.accelerator, self.unet_run, self.te_runs, self.components = accelerator, unet_run, te_runs, components
        self.trainables, self.optimizer, self.lr_scheduler = trainables, optimizer, lr_scheduler
        self.state_dir, self.writer, self.keep = state_dir, writer, keep
        self.last = last  # the newest checkpoint written (or resumed from)

    def states(self) -> dict[str, dict[str, torch.Tensor]]:
        """{component: PEFT tensors} of what trains; new token vectors as {"tokens": {component: [N, dim]}}."""
        t, unwrap = self.trainables, self.accelerator.unwrap_model
        states = {self.components[0]: peft_state(unwrap(self.unet_run))} if t.train_unet else {}
        if t.train_te:
            for component, encoder in zip(self.components[1:], self.te_runs):
                states[component] = peft_state(unwrap(encoder))
        if t.token_params:
            states["tokens"] = {c: p.detach().float().cpu().clone() for c, p in zip(self.components[1:], t.token_params)}
        return states

    def save(self, step: int, log_rows: list[dict]) -> Path:
        """Write checkpoint ``step``; its record carries the validation loss measured at that step."""
        states = self.states()
        if self.accelerator.is_main_process:
            record = dict(self.writer.record)
            measured = [r["loss_validation"] for r in log_rows if r["step"] == step and "loss_validation" in r]
            if measured:
                record["validation_loss"] = measured[-1]
            optimizer_state = self.optimizer.state_dict()
            with self.keeping_last():
                self.check_room(states, optimizer_state)
                self.last = write_checkpoint(
                    self.state_dir, step, states, optimizer_state, self.lr_scheduler.state_dict(), record,
                    lora_writer=lambda path: self.writer.write(states, step, path, path.with_name(EMBEDDING_FILE),
                                                               True),
                    keep=self.keep)
                write_log(self.state_dir, log_rows)
        self.accelerator.wait_for_everyone()
        return self.state_dir / step_dir_name(step)

    def check_room(self, states, optimizer_state) -> None:
        """Refuse before writing when the disk cannot hold a checkpoint: its tensors (adapter,
        optimizer moments, the LoRA in fp16) with a margin for the JSON and file systems."""
        tensors = [t for component in states.values() for t in component.values()]
        tensors += [v for slot in optimizer_state["state"].values() for v in slot.values() if torch.is_tensor(v)]
        needed = int(sum(t.numel() * t.element_size() for t in tensors) * 1.2) + (64 << 10)
        free = free_bytes(self.state_dir)
        if free is not None and free < needed:
            raise storage_error(self.state_dir, OSError(errno.ENOSPC, "no space"), needed)

    @contextmanager
    def keeping_last(self) -> Iterator[None]:
        """A failed write (disk full, read-only, no permission) says which checkpoint is still good."""
        try:
            yield
        except StorageError as err:
            kept = f"the last good checkpoint {self.last} is kept; free space, then continue with --resume " \
                   f"{self.state_dir}" if self.last else "no checkpoint was written yet"
            raise StorageError(f"{str(err).rstrip('.')}; {kept}.") from None


def load_token_rows(saved: Mapping[str, torch.Tensor], components, token_params, folder: Path) -> None:
    """Put a checkpoint's new-token vectors into the token parameters."""
    for component, param in zip(components[1:], token_params):
        if component not in saved or saved[component].shape != param.shape:
            raise TrainingError(f"{folder}: holds no new-token vectors of shape {tuple(param.shape)} for {component}; "
                                "resume with the same --new-tokens.")
        with torch.no_grad():
            param.copy_(saved[component].to(param.device, param.dtype))


def load_trained(base, adapter_dir: str | Path) -> dict:
    """Inject a trained adapter (the ``adapter/`` folder or a ``step-N/`` checkpoint of a state
    folder) into a loaded base model, in place; returns its training record."""
    folder = Path(adapter_dir).expanduser()
    record_path = folder / TRAINING_JSON if (folder / TRAINING_JSON).exists() else folder / TRAINER_JSON
    record = json.loads(record_path.read_text())
    settings = TrainSettings.of(record["options"])
    components = FAMILIES[base.family].components
    modules = dict(zip(components, [base.unet, *base.text_encoders]))
    for path in sorted(folder.glob("adapter_*.safetensors")):
        component = path.stem.removeprefix("adapter_")
        if component == "tokens":  # the new tokens' vectors, per text encoder
            rows = load_file(str(path))
            for name, tokenizer, encoder in zip(components[1:], base.tokenizers, base.text_encoders):
                add_tokens(tokenizer, encoder, token_names(settings.new_tokens), rows[name])
            continue
        targets = UNET_TARGETS[settings.unet_targets] if component == "unet" else TEXT_TARGETS
        inject_adapter_in_model(settings_adapter_config(settings, targets), modules[component])
        set_peft_model_state_dict(modules[component], load_file(str(path)))
    return record

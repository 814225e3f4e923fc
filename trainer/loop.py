"""DreamBooth LoRA training: one readable loop over a joint instance + prior batch.

    result = train(TrainJob(base="model.safetensors", output="sks_dog.safetensors",
                            instance_dir="photos/", class_dir="class_cache/", options={...}))

The same function serves the CLI (also under ``accelerate launch``/``torchrun``, where every
process runs it and only the main one writes files) and the ComfyUI node (which passes a
loaded model, an in-memory image batch and a ``should_stop`` callback). It reads like
diffusers' train_dreambooth_lora.py: setup, resume, the loop, the result.
"""

from __future__ import annotations

import random
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from diffusers.optimization import get_scheduler
from peft import set_peft_model_state_dict

from ..models.families import FAMILIES
from ..models.load import load_base_model
from ..planner.report import memory_report
from ..runtime.locks import exclusive
from ..runtime.peft import adapter_digest
from .batches import LatentSource, load_class_images, load_instances, micro_batch_rows, step_seed
from .checkpoint import jsonable, read_checkpoint
from .export import Checkpointer, ResultWriter, load_token_rows
from .job import (TrainJob, TrainResult, TrainingStopped, caption_maker, check_captions, clear_old_run, plan_run,
                  token_text)
from .logs import LossLog, read_log, write_loss_plot
from .model import WEIGHT_DTYPES, TextSchedule, attach_adapters, make_accelerator, offload_frozen, place_frozen
from .preview import Previewer
from .step import CaptionEncoder, JointForward, make_optimizer
from .validation import ValidationLoss, split_holdout


def train(job: TrainJob, should_stop: Callable[[], bool] | None = None,
          on_step: Callable[[dict], None] | None = None, on_preview: Callable[[Path], None] | None = None) -> TrainResult:
    """Train a DreamBooth LoRA. ``should_stop()`` is polled every step (a stop saves a
    checkpoint, then raises ``TrainingStopped``); ``on_step(log_row)`` after every step;
    ``on_preview(path)`` after every preview grid."""
    started = time.perf_counter()
    plan = plan_run(job)  # every check that needs no model
    s, state_dir = plan.settings, plan.state_dir
    if plan.finished:  # resume="auto": this very run is complete
        return TrainResult(plan.output, state_dir, plan.resume_from, s.steps, 0.0, read_log(state_dir, s.steps),
                           embedding=plan.embedding, lora=plan.output if plan.lora_due else None, already_done=True)
    accelerator = make_accelerator(s)
    with ExitStack() as held:
        if accelerator.is_main_process:  # one run per output: a second one is refused now, naming this one
            held.enter_context(exclusive(state_dir, "a training run", "wait for it to finish, or choose another "
                                         "--output (in ComfyUI: another lora_name)"))
        held.enter_context(memory_report(job, plan.settings, accelerator.device, accelerator.print))
        return _run(job, plan, accelerator, started, should_stop, on_step, on_preview)


def _run(job: TrainJob, plan, accelerator, started: float, should_stop, on_step, on_preview) -> TrainResult:
    """``train`` once its run holds the state folder."""
    s, state_dir = plan.settings, plan.state_dir
    device, rank, world, say = accelerator.device, accelerator.process_index, accelerator.num_processes, accelerator.print
    instances = load_instances(job, s, say)
    instances, validation_photos = split_holdout(instances, s, say)
    check_captions(instances, s)
    if accelerator.is_main_process:
        clear_old_run(plan, say)
    accelerator.wait_for_everyone()

    # --- the model: frozen base, class images, adapters, optimizer
    base = job.base_model or load_base_model(job.base, device=str(device), **dict(job.load_options))
    family, prediction_type = base.family, base.noise_scheduler.config.prediction_type
    components = FAMILIES[family].components
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    place_frozen(base, s, device, weight_dtype)
    classes = load_class_images(job, s, base, accelerator) if s.prior_preservation == "class_images" else None
    trainables = attach_adapters(base, s)
    optimizer = make_optimizer(s, trainables.param_groups(s), device)
    lr_scheduler = get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=s.warmup_steps,
                                 num_training_steps=s.steps)
    prepared = accelerator.prepare(*trainables.modules, optimizer)
    optimizer = prepared[-1]
    unet_run = prepared[0] if trainables.train_unet else base.unet
    te_runs = list(prepared[1 if trainables.train_unet else 0:-1])

    # --- resume
    start_step, log_rows = 0, []
    if plan.resume_from is not None:
        record, adapters, optimizer_state = read_checkpoint(plan.resume_from)
        for component, module in zip(components, [base.unet, *base.text_encoders]):
            if component in adapters:
                set_peft_model_state_dict(module, {k: v.to(device) for k, v in adapters[component].items()})
        if trainables.token_params:
            load_token_rows(adapters.get("tokens", {}), components, trainables.token_params, plan.resume_from)
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(record["scheduler"])
        start_step = record["step"]
        log_rows = read_log(state_dir, start_step)
        say(f"resumed from {plan.resume_from} at step {start_step}")

    # --- everything that does not change between steps, computed now
    make_caption = caption_maker(s)
    photos = instances.images + (validation_photos.images if validation_photos is not None else [])
    captions = sorted({make_caption(item.caption) for item in photos} |
                      ({item.caption for item in classes.images} if classes else set()) |
                      ({s.class_prompt} if s.prior_preservation == "base_model" else set()))
    tokenizer = base.tokenizers[0]
    for caption in captions:
        if len(tokenizer.tokenize(caption)) > tokenizer.model_max_length - 2:
            say(f"warning: caption longer than {tokenizer.model_max_length - 2} tokens is cut: {caption[:60]!r}…")
    encoders = list(base.text_encoders)
    embed = CaptionEncoder(family, list(base.tokenizers), encoders,
                           te_runs if trainables.text_trained else encoders, device)
    if not trainables.text_trained:
        embed(captions, False)
    if s.prior_preservation == "base_model":
        embed([s.class_prompt], False, base_only=True)
    latents = LatentSource(base.vae, device, s.cache_latents)
    vae_done = latents.encode_all(instances, classes, say)
    forward = JointForward(family, prediction_type, unet_run, base.unet, encoders, base.noise_scheduler,
                           base.noise_scheduler.alphas_cumprod.to(device), device, weight_dtype)
    validation = ValidationLoss(validation_photos, latents, forward, s, make_caption) \
        if validation_photos is not None else None
    offload_frozen(base, trainables, vae_done, device)

    # --- where results go
    run_record = {"options": jsonable(s.as_dict()), "base": str(job.base), "base_fingerprint": plan.base_fingerprint,
              "family": family, "prediction_type": prediction_type, "components": list(components),
              "seed": s.seed, "world_size": world}
    writer = ResultWriter(s, family, base.unet, components, run_record,
                          plan.embedding.stem if plan.embedding is not None else "", plan.lora_due)
    saver = Checkpointer(accelerator, unet_run, te_runs, components, trainables, optimizer, lr_scheduler, state_dir,
                         writer, s.keep_checkpoints, plan.resume_from)
    preview = Previewer(base, s, state_dir, Path(job.base).stem, plan.base_fingerprint, on_preview) \
        if s.validation_prompts and accelerator.is_main_process else None
    log = LossLog(log_rows, start_step, s.steps, s.prior_preservation != "off", accelerator.is_main_process, say,
                  on_step)
    schedule = TextSchedule(trainables, s, say)
    batch, accumulation = s.batch_size, s.gradient_accumulation

    # --- the loop
    step = start_step
    try:
        for step in range(start_step, s.steps):
            te_active, tokens_active = schedule.at(step)
            text_active = te_active or tokens_active
            if schedule.text_just_stopped(text_active):
                embed.refresh(captions)
            sums = torch.zeros(3, device=device)
            for micro in range(accumulation):
                seed = step_seed(s.seed, step * accumulation + micro, rank)
                torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
                rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
                position = ((step * accumulation + micro) * world + rank) * batch
                rows = micro_batch_rows(instances, classes, s, position, batch, rng, latents)
                for row in rows:
                    if not row["prior"]:
                        row["caption"] = make_caption(row["caption"])
                training = ([unet_run] if trainables.train_unet else []) + (te_runs if text_active else [])
                with accelerator.accumulate(*training):
                    parts = forward.loss(rows, s, embed, text_active, generator)
                    accelerator.backward(parts.total)
                    if accelerator.sync_gradients and s.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainables.unet_params + (trainables.te_params if te_active else []) +
                                                    (trainables.token_params if tokens_active else []), s.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                prior = parts.prior.detach() if parts.prior is not None else torch.zeros((), device=device)
                sums += torch.stack([parts.total.detach(), parts.instance.detach(), prior])
            lr_scheduler.step()
            losses = sums / accumulation
            if world > 1:
                losses = accelerator.reduce(losses, reduction="mean")
            log.settle(saver.last)  # the previous step's losses: reading them now lets this step's work run on
            log.add(step + 1, losses, lr_scheduler.get_last_lr()[0], time.perf_counter() - started)
            done = step + 1
            save_due = bool(s.save_every) and done % s.save_every == 0 and done < s.steps
            preview_due = bool(s.validation_prompts) and bool(s.validation_every) and \
                done % s.validation_every == 0 and done < s.steps
            stop = bool(should_stop and should_stop())
            if world > 1:  # every rank stops at the same step
                stop = accelerator.reduce(torch.tensor(float(stop), device=device), reduction="sum").item() > 0
            stop = stop and done < s.steps
            validation_due = validation is not None and validation.due(done, save_due, done == s.steps)
            if save_due or preview_due or validation_due or stop or done == s.steps:
                log.settle(saver.last)  # nothing is saved or shown before its loss is known to be finite
            if validation_due:
                log.validation(done, validation(embed, text_active))
            if save_due:
                saver.save(done, log.rows)
            if preview_due and preview is not None:
                preview(done)
            if stop:
                log.close()
                path = saver.save(done, log.rows)
                raise TrainingStopped(f"stopped at step {done}; checkpoint {path}. Continue with --resume {state_dir}")
    except KeyboardInterrupt:
        # A hard interrupt can land between optimizer.step() and the end of a step, so the
        # weights no longer match any step number: keep the last checkpoint rather than save.
        log.close()
        kept = f"the last checkpoint {saver.last} is kept" if saver.last else "no checkpoint was written"
        say(f"interrupted during step {step + 1}; {kept}. Continue with --resume {state_dir}")
        raise
    except Exception:
        log.close()  # the error then starts on a line of its own, not after the progress bar
        raise
    log.close()

    # --- the result
    final = saver.save(s.steps, log.rows)
    states = saver.states()
    print(f"[rank {rank}] adapter sha256 {adapter_digest(states)}", flush=True)
    lora_path = plan.output if plan.lora_due else None
    if accelerator.is_main_process:
        writer.write(states, s.steps, lora_path, plan.embedding, job.overwrite or plan.resume_from is not None)
        writer.write_final(state_dir, states)
        write_loss_plot(state_dir, log.rows)
        if preview is not None:
            preview(s.steps)
        written = " and ".join(str(p) for p in dict.fromkeys(p for p in (lora_path, plan.embedding) if p is not None))
        say(f"wrote {written} ({s.steps} steps, {time.perf_counter() - started:.1f} s); state in {state_dir}")
        if plan.embedding is not None:
            say(f"prompts: {token_text(s)} here (dreambooth-lora sample --embedding {plan.embedding}), "
                f"embedding:{plan.embedding.stem} in ComfyUI (file in models/embeddings), {plan.embedding.stem} in A1111")
    accelerator.wait_for_everyone()
    return TrainResult(plan.output, state_dir, final, s.steps, time.perf_counter() - started, log.rows,
                       embedding=plan.embedding, lora=lora_path)

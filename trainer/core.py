"""DreamBooth LoRA training: one readable loop over a joint instance + prior batch.

    job = TrainJob(base="model.safetensors", output="sks_dog.safetensors", instance_dir="photos/",
                   class_dir="class_cache/", options={...})
    result = train(job)

The same function serves the CLI (also under ``accelerate launch``/``torchrun``, where every
process runs it and only the main one writes files) and the ComfyUI node (which passes a
loaded model, an in-memory image batch and a ``should_stop`` callback).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..data.options import DATA_OPTIONS, PROMPT_OPTIONS
from ..errors import UserError
from .checkpoint import read_checkpoint, resolve_resume, step_dir_name, write_checkpoint
from .loss import dreambooth_loss, target_for
from .options import CLASS_OPTIONS, DEFAULT_TEMPLATES, TRAIN_OPTIONS

ALL_OPTIONS = TRAIN_OPTIONS + DATA_OPTIONS + PROMPT_OPTIONS + CLASS_OPTIONS

UNET_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
            "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"],
}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# The three ways to learn a style, as option sets to merge into TrainJob.options (same data, steps,
# seed and everything else): a LoRA bound to the identifier, textual inversion alone, pivotal
# tuning (new tokens + LoRA). E.g. {**common, **STYLE_METHODS["pivotal"]}.
STYLE_METHODS = {
    "lora": {"mode": "style", "new_tokens": 0, "train_unet": True},
    "textual_inversion": {"mode": "style", "new_tokens": 2, "train_unet": False, "train_text_encoder": False},
    "pivotal": {"mode": "style", "new_tokens": 2, "train_unet": True},
}
# Options whose change would make a resumed run a different run (the rest may change on resume).
_FREE_ON_RESUME = {"steps", "save_every", "keep_checkpoints", "validation_prompts", "validation_every",
                   "validation_scales", "validation_steps"}


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, a checkpoint that does not fit)."""


class TrainingStopped(Exception):
    """Raised inside the loop when should_stop() asks for it; the checkpoint is already saved."""


@dataclass
class TrainJob:
    base: str  # checkpoint path (its fingerprint goes into the metadata)
    output: str  # the kohya LoRA file to write
    options: Mapping[str, Any] = field(default_factory=dict)  # any of ALL_OPTIONS; missing → defaults
    instance_dir: str | None = None
    instance_dataset: Any = None  # a data.core.InstanceDataset instead of instance_dir (ComfyUI images)
    class_dir: str | None = None
    resume: str | None = None
    overwrite: bool = False
    base_model: Any = None  # an already loaded models.core.BaseModel (ComfyUI); loaded from ``base`` if None
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


# --- small helpers ------------------------------------------------------------------


def state_dir_for(output: Path) -> Path:
    return output.with_name(output.stem + ".state")


def step_seed(seed: int, step: int, rank: int) -> int:
    """A per-(step, rank) seed: every random draw of a step follows from it, so a resumed run
    draws exactly what the uninterrupted one drew."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def epoch_order(seed: int, kind: str, epoch: int, size: int) -> list[int]:
    order = list(range(size))
    random.Random(f"{seed}:{kind}:{epoch}").shuffle(order)
    return order


def pick(seed: int, kind: str, position: int, size: int) -> int:
    """Item at global ``position`` of an endless sequence of shuffled epochs."""
    return epoch_order(seed, kind, position // size, size)[position % size]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``. On CUDA from pinned memory and asynchronously: a plain
    copy from pageable memory waits for the GPU to finish all queued work, which would stall
    the loop once per step."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextmanager
def modules_on(device: torch.device, *modules: torch.nn.Module) -> Iterator[None]:
    """Bring offloaded modules to ``device`` for a while (previews), then back where they were."""
    homes = [next(module.parameters()).device for module in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    if device.type != "cuda":
        if name in ("fp16", "bf16"):
            warnings.warn(f"mixed precision {name} needs a CUDA GPU; training in fp32 on {device.type}.")
        return "no"
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def adapter_config(options: Mapping[str, Any], targets: list[str]):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kind, rank, alpha, dropout = options["adapter"], options["rank"], options["alpha"], options["dropout"]
    if kind in ("lora", "dora"):
        # gaussian A, zero B (diffusers' choice): the adapter starts as an exact no-op
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          target_modules=targets, use_dora=kind == "dora")
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets)
    return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets)


def tuner_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(*modules: torch.nn.Module) -> Iterator[None]:
    """The frozen base model: every adapter layer bypassed (not merely scaled to 0, which
    would still rescale DoRA outputs)."""
    layers = [layer for module in modules for layer in tuner_layers(module)]
    saved = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer._disable_adapters = value


@contextmanager
def adapter_scale(module: torch.nn.Module, scale: float) -> Iterator[None]:
    """Multiply every adapter's scaling by ``scale`` (the LoRA strength of a loader)."""
    layers = [layer for layer in tuner_layers(module) if hasattr(layer, "scaling")]
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in layer.scaling:
            layer.scaling[name] = layer.scaling[name] * scale
    try:
        yield
    finally:
        for layer, values in zip(layers, saved):
            layer.scaling.update(values)


def peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}


def adapter_digest(states: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """sha256 over every adapter tensor's bytes, in key order: equal digests = equal weights."""
    digest = hashlib.sha256()
    for component in sorted(states):
        for key in sorted(states[component]):
            digest.update(f"{component}.{key}".encode())
            digest.update(states[component][key].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- text ---------------------------------------------------------------------------


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_ids(family: str, encoders: list, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder hidden states, SDXL pooled embedding or None) of token ids (one tensor per encoder),
    as the family's pipeline builds them: SD1/SD2 the last hidden state; SDXL both encoders'
    penultimate hidden states side by side and the second encoder's projected pooled output."""
    if family != "sdxl":
        return encoders[0](ids[0])[0], None
    hidden, pooled = [], None
    for encoder, encoder_ids in zip(encoders, ids):
        out = encoder(encoder_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(hidden, dim=-1), pooled


def encode_text(family: str, tokenizers: list, encoders: list, captions: list[str],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``encode_ids`` of captions padded (or cut) to the tokenizers' 77 tokens, as in training."""
    return encode_ids(family, encoders, [tokenize(tokenizer, captions).to(device) for tokenizer in tokenizers])


def sdxl_time_ids(original_hw, crop_top_left, target_hw) -> list[float]:
    return [*original_hw, *crop_top_left, *target_hw]


# --- the job ------------------------------------------------------------------------


def resolve_options(options: Mapping[str, Any]) -> dict:
    """Options whose default depends on the mode, made explicit (what the run and its record use)."""
    options = dict(options)
    if options["prior_preservation"] == "auto":
        options["prior_preservation"] = "off" if options["mode"] == "style" else "class_images"
    return options


def token_text(options: Mapping[str, Any]) -> str:
    """What ``{tokens}`` stands for: the new tokens ('<s1><s2>'), or the identifier without them."""
    from .tokens import token_names

    return "".join(token_names(options["new_tokens"])) if options["new_tokens"] else options["identifier"]


def caption_maker(options: Mapping[str, Any]) -> Callable[[str], str]:
    """The instance caption as trained: the dataset's caption put through the caption template;
    in subject mode new tokens take the identifier's place."""
    import re

    template = options["caption_template"] or DEFAULT_TEMPLATES[options["mode"]]
    tokens = token_text(options)
    identifier = options["identifier"].strip()
    swap = options["new_tokens"] > 0 and options["mode"] == "subject" and identifier
    pattern = re.compile(rf"(?<![\w<]){re.escape(identifier)}(?![\w>])") if swap else None

    def make(caption: str) -> str:
        text = template.replace("{caption}", caption).replace("{tokens}", tokens).strip()
        return pattern.sub(lambda _: tokens, text) if pattern is not None else text

    return make


def embedding_path(job: TrainJob, output: Path, options: Mapping[str, Any]) -> Path | None:
    """Where the learned embeddings go: None without new tokens; ``output`` itself for textual
    inversion alone; else ``job.embedding_output`` or '<output stem>_emb.safetensors'."""
    if not options["new_tokens"]:
        return None
    if not options["train_unet"] and not options["train_text_encoder"]:
        return output
    if job.embedding_output:
        return Path(job.embedding_output).expanduser()
    return output.with_name(output.stem + "_emb.safetensors")


def _prepare_class_data(job: TrainJob, options: Mapping[str, Any], base, accelerator, fingerprint_path: str):
    """Class images for the class_images mode: a folder of the user's own images, or cached
    priors generated (only the missing ones) into ``class_dir``."""
    from ..data.core import IMAGE_SUFFIXES, load_files
    from ..priors.core import generate_priors

    folder = Path(job.class_dir).expanduser()
    own = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder.is_dir() else []
    data_options = {k: options[k] for k in DATA_OPTIONS.defaults()}
    data_options.update(repeats=1, flip=options["flip"], recursive=False)
    if own:
        accelerator.print(f"class images: {len(own)} of your own in {folder} (none generated)")
        paths = own
    else:
        if accelerator.is_main_process:
            result = generate_priors(base, fingerprint_path, folder, options["num_class_images"],
                                     options["class_prompt"], resolution=options["resolution"])
            accelerator.print(f"class images: {result.reused} reused, {result.generated} generated in {result.folder}")
        accelerator.wait_for_everyone()
        result = generate_priors(base, fingerprint_path, folder, options["num_class_images"], options["class_prompt"],
                                 resolution=options["resolution"])  # all present now: only resolves paths
        paths = result.paths
    return load_files(paths, options["class_prompt"], str(folder), **data_options)


class LatentSource:
    """VAE latents of dataset images, encoded once per (image, crop window, flip) and kept
    when caching is on (always the mean of the VAE's distribution, never a sample). The images
    of one micro-batch that are not cached are encoded together, in one VAE call."""

    def __init__(self, vae, device: torch.device, cache: bool):
        self.vae, self.device, self.cache = vae, device, cache
        self.store: dict[tuple, torch.Tensor] = {}
        self.scaling = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        first = next(self.vae.parameters())
        latents = self.vae.encode(pixels.to(first.device, first.dtype)).latent_dist.mode()
        return ((latents - self.shift) * self.scaling).float().to(self.device)

    @staticmethod
    def window(dataset, index: int, rng: random.Random | None) -> tuple[int, int, int, int]:
        """The crop box of this use of the image (random crops draw it from ``rng``)."""
        return dataset.images[index].crop_box(rng if dataset.crop == "random" else None)

    def get(self, dataset, index: int, rng: random.Random | None, flip: bool) -> tuple[torch.Tensor, dict]:
        return self.get_many([(dataset, index, self.window(dataset, index, rng), flip)])[0]

    def get_many(self, wanted: list[tuple]) -> list[tuple[torch.Tensor, dict]]:
        """[(dataset, index, crop box, flip)] → [(latents on the device, size conditioning and caption)]."""
        import numpy as np
        from PIL import ImageOps

        found: list[list] = []
        missing: list[tuple[int, tuple, torch.Tensor, bool]] = []
        for dataset, index, box, flip in wanted:
            item = dataset.images[index]
            key = (id(dataset), index, box, flip)
            meta = {"original_size": item.image.size[::-1], "crop_top_left": (box[1], box[0]),
                    "target_size": item.target_size[::-1], "caption": item.caption}
            found.append([self.store.get(key), meta])
            if found[-1][0] is None:
                picture = item.image.crop(box)
                if flip:
                    picture = ImageOps.mirror(picture)
                pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
                missing.append((len(found) - 1, key, pixels, self.cache and dataset.crop != "random"))
        if missing:
            encoded = self.encode(torch.stack([pixels for _, _, pixels, _ in missing]))  # kept on the device
            for (position, key, _, keep), latents in zip(missing, encoded):
                found[position][0] = latents
                if keep:
                    self.store[key] = latents
        return [(latents, meta) for latents, meta in found]


def _check_resume_record(record: Mapping[str, Any], options: Mapping[str, Any], fingerprint: str, folder: Path) -> None:
    if record.get("base_fingerprint") != fingerprint:
        raise TrainingError(f"{folder}: was trained on another base model (fingerprint {record.get('base_fingerprint')}, "
                            f"this one {fingerprint}); resume with the same --base.")
    saved = record.get("options", {})
    changed = [k for k, v in options.items() if k not in _FREE_ON_RESUME and k in saved and saved[k] != _jsonish(v)]
    if changed:
        listing = ", ".join(f"{k}: {saved[k]!r} → {options[k]!r}" for k in changed[:4])
        raise TrainingError(f"{folder}: was trained with other settings ({listing}); resume with the same options "
                            "(only --steps, --save-every and validation settings may change).")


def _jsonish(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def train(job: TrainJob, should_stop: Callable[[], bool] | None = None,
          on_step: Callable[[dict], None] | None = None, on_preview: Callable[[Path], None] | None = None) -> TrainResult:
    """Train a DreamBooth LoRA. ``should_stop()`` is polled every step (a stop saves a
    checkpoint, then raises ``TrainingStopped``); ``on_step(log_row)`` after every step;
    ``on_preview(path)`` after every preview grid."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from tqdm.auto import tqdm

    from ..converters import core as converters
    from ..data.core import load_folder
    from ..models.core import load_base_model
    from ..priors.core import model_fingerprint

    options = resolve_options(ALL_OPTIONS.values(dict(job.options)))
    from ..data.core import fill_caption

    options["class_prompt"] = fill_caption(options["class_prompt"], "", options["class_word"])
    n_tokens, train_unet, train_tokens = options["new_tokens"], options["train_unet"], options["new_tokens"] > 0
    if not (train_unet or options["train_text_encoder"] or train_tokens):
        raise UserError("nothing to train: --no-train-unet without --train-text-encoder needs --new-tokens N "
                        "(textual inversion).")
    if train_tokens and not train_unet and not options["train_text_encoder"] and options["token_steps_fraction"] < 1:
        raise UserError("--token-steps-fraction below 1 with textual inversion alone leaves nothing to train after "
                        "the stop; lower --steps instead.")
    make_caption = caption_maker(options)
    started = time.perf_counter()
    output = Path(job.output).expanduser()
    if output.suffix != ".safetensors":
        raise UserError(f"{output}: the output must be a .safetensors file (the kohya/A1111 LoRA).")
    state_dir = state_dir_for(output)
    resume_from = resolve_resume(job.resume) if job.resume else None
    if output.exists() and not job.overwrite and resume_from is None:
        raise UserError(f"{output}: exists; choose another --output, pass --overwrite, or --resume {state_dir}.")
    emb_path = embedding_path(job, output, options)
    if emb_path is not None and emb_path != output:
        if emb_path.suffix != ".safetensors":
            raise UserError(f"{emb_path}: the embedding must be a .safetensors file (A1111/ComfyUI embeddings).")
        if emb_path.exists() and not job.overwrite and resume_from is None:
            raise UserError(f"{emb_path}: exists; choose another --output or --embedding-output, or pass --overwrite.")

    use_cuda = torch.cuda.is_available()
    probe = torch.device("cuda" if use_cuda else "cpu")
    accelerator = Accelerator(gradient_accumulation_steps=options["gradient_accumulation"],
                              mixed_precision=resolve_mixed_precision(options["mixed_precision"], probe),
                              cpu=not use_cuda)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    say = accelerator.print

    # --- data (checked now, so no file can fail mid-training)
    data_options = {k: options[k] for k in DATA_OPTIONS.defaults()}
    if job.instance_dataset is not None:
        instances = job.instance_dataset
    elif job.instance_dir:
        instances = load_folder(job.instance_dir, options["instance_prompt"], options["identifier"],
                                options["class_word"], **data_options)
    else:
        raise UserError("no instance images: pass --instance-dir DIR with 3-20 photos of the subject.")
    for source, why in instances.skipped:
        say(f"warning: skipped {source}: {why}")
    if train_tokens and not any(token_text(options) in make_caption(item.caption) for item in instances.images):
        raise UserError(f"no caption contains the new tokens {token_text(options)}: put {{tokens}} into "
                        "--caption-template (e.g. '{caption}, in the style of {tokens}') or, in subject mode, "
                        "the identifier into the captions.")

    prior_mode = options["prior_preservation"]
    if prior_mode == "class_images" and not job.class_dir:  # before the slow part
        raise UserError(f"prior preservation needs class images of '{options['class_prompt']}': pass --class-dir DIR "
                        "to generate them there with the base model (reused on later runs), make them first with "
                        "`dreambooth-lora priors --base CKPT --class-prompt '...' --out DIR`, use "
                        "--prior-preservation base_model (no class images: the frozen model is the target), or turn "
                        "it off with --prior-preservation off.")

    # --- the model
    base = job.base_model or load_base_model(job.base, device=str(device), **dict(job.load_options))
    fingerprint = model_fingerprint(job.base) if Path(job.base).expanduser().exists() else "unknown"
    family, prediction_type = base.family, base.noise_scheduler.config.prediction_type
    unet, vae, encoders, tokenizers = base.unet, base.vae, list(base.text_encoders), list(base.tokenizers)
    noise_scheduler = base.noise_scheduler
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    components = converters.COMPONENTS[family]  # ("unet", "te") or ("unet", "te1", "te2")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[accelerator.mixed_precision]
    # Latents encoded once are encoded in fp32. A VAE that runs every step (no cache, or random
    # crops) runs in bf16 when training in bf16: twice as fast, and safe (fp16 overflows SDXL's VAE).
    vae_every_step = not options["cache_latents"] or options["crop"] == "random"
    vae_dtype = torch.bfloat16 if vae_every_step and weight_dtype == torch.bfloat16 else torch.float32
    for module in [unet, vae, *encoders]:
        module.requires_grad_(False)
        wanted = vae_dtype if module is vae else weight_dtype
        if next(module.parameters()).dtype != wanted:  # diffusers warns on every .to(dtype), even a no-op
            module.to(dtype=wanted)
        module.to(device)

    classes = _prepare_class_data(job, options, base, accelerator, job.base) if prior_mode == "class_images" else None

    torch.manual_seed(options["seed"])  # adapter initialisation: identical on every rank
    if train_unet:
        inject_adapter_in_model(adapter_config(options, UNET_TARGETS[options["unet_targets"]]), unet)
    train_te = options["train_text_encoder"]
    if train_te:
        for encoder in encoders:
            inject_adapter_in_model(adapter_config(options, TEXT_TARGETS), encoder)
    te_params = [p for e in encoders for p in e.parameters() if p.requires_grad] if train_te else []
    # New tokens: rows past the vocabulary, in a parameter of their own (nothing else changes).
    token_ids: list[list[int]] = []
    token_params: list[torch.nn.Parameter] = []
    if train_tokens:
        from .tokens import add_tokens, initial_vectors, token_embedding, token_names

        init_generator = torch.Generator().manual_seed(options["seed"])
        for tokenizer, encoder in zip(tokenizers, encoders):
            vectors = initial_vectors(tokenizer, encoder, n_tokens, options["token_init"], init_generator)
            token_ids.append(add_tokens(tokenizer, encoder, token_names(n_tokens), vectors))
            wrapper = token_embedding(encoder)
            wrapper.extra.requires_grad_(True)
            token_params.append(wrapper.extra)
    text_trained = train_te or train_tokens
    trained = ([unet] if train_unet else []) + (encoders if text_trained else [])
    for module in trained:
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.data = param.data.float()  # the adapter trains in fp32 whatever the base dtype
    if options["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        if train_te:
            for encoder in encoders:
                # transformers 5 renamed it (the old name warns); older versions have only the old one
                enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
                enable()

    unet_params = [p for p in unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": options["learning_rate"]}] if unet_params else []
    if te_params:
        groups.append({"params": te_params, "lr": options["text_encoder_lr"]})
    if token_params:
        groups.append({"params": token_params, "lr": options["token_lr"], "weight_decay": 0.0})
    optimizer = _make_optimizer(options, groups, device)
    lr_scheduler = get_scheduler(options["lr_scheduler"], optimizer, num_warmup_steps=options["warmup_steps"],
                                 num_training_steps=options["steps"])
    prepared = accelerator.prepare(*trained, optimizer)
    optimizer = prepared[-1]
    unet_run = prepared[0] if train_unet else unet
    te_runs = list(prepared[1 if train_unet else 0:-1])
    text_runs = te_runs if text_trained else encoders

    # --- resume
    start_step, log_rows = 0, []
    if resume_from is not None:
        record, adapters, optimizer_state = read_checkpoint(resume_from)
        _check_resume_record(record, options, fingerprint, resume_from)
        for component, module in zip(components, [unet, *encoders]):
            if component in adapters:
                set_peft_model_state_dict(module, {k: v.to(device) for k, v in adapters[component].items()})
        if token_params:
            _load_token_rows(adapters.get("tokens", {}), components, token_params, resume_from)
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(record["scheduler"])
        start_step = record["step"]
        log_rows = _read_log(state_dir, start_step)
        say(f"resumed from {resume_from} at step {start_step}")
    if start_step >= options["steps"]:
        raise UserError(f"{resume_from}: is already at step {start_step}; raise --steps above it to train more.")

    # --- text: cache the embeddings of every caption while the text encoder is frozen
    captions = sorted({make_caption(item.caption) for item in instances.images} |
                      ({item.caption for item in classes.images} if classes else set()) |
                      ({options["class_prompt"]} if prior_mode == "base_model" else set()))
    for caption in captions:
        if len(tokenizers[0].tokenize(caption)) > tokenizers[0].model_max_length - 2:
            say(f"warning: caption longer than {tokenizers[0].model_max_length - 2} tokens is cut: {caption[:60]!r}…")
    embedding_cache: dict[tuple[str, bool], tuple] = {}

    def embed(texts: list[str], te_training: bool, base_only: bool = False):
        if te_training and not base_only:
            return encode_text(family, tokenizers, text_runs, texts, device)
        key_missing = sorted({t for t in texts if (t, base_only) not in embedding_cache})
        if key_missing:
            home = next(encoders[0].parameters()).device  # the device they are on (offloaded or not)
            with torch.no_grad(), (adapters_disabled(*encoders) if base_only else nullcontext()):
                hidden, pooled = encode_text(family, tokenizers, encoders, key_missing, home)
            for i, text in enumerate(key_missing):
                embedding_cache[(text, base_only)] = (hidden[i].to(device), None if pooled is None else pooled[i].to(device))
        hidden = torch.stack([embedding_cache[(t, base_only)][0] for t in texts])
        pooled = None if family != "sdxl" else torch.stack([embedding_cache[(t, base_only)][1] for t in texts])
        return hidden, pooled

    # Everything that does not change between steps is computed now, before the loop.
    if not text_trained:
        embed(captions, False)
    if prior_mode == "base_model":
        embed([options["class_prompt"]], False, base_only=True)
    latents_source = LatentSource(vae, device, options["cache_latents"])
    vae_done = False  # every latent the loop can ask for is cached
    if options["cache_latents"] and instances.crop != "random":
        for index in range(len(instances.images)):  # encode every instance image once
            for flip in ([False, True] if instances.flip else [False]):
                latents_source.get(instances, index, None, flip)
        sizes = {item.target_size for item in instances.images}
        vae_done = classes is None
        if classes is not None and classes.crop != "random" and \
                all(item.target_size in sizes for item in classes.images) and len(sizes) == 1:
            for index in range(len(classes.images)):  # and every class image (bucketed ones are cut on demand)
                for flip in ([False, True] if classes.flip else [False]):
                    latents_source.get(classes, index, None, flip)
            vae_done = True
    elif options["cache_latents"]:
        say("note: random crops change every step, so instance latents are encoded each step (no cache).")
    if device.type == "cuda":
        # Frozen parts the loop no longer needs wait in CPU memory (previews bring them back):
        # on SDXL the two text encoders alone hold 1.6 GB of VRAM.
        offload = ([] if text_trained else encoders) + ([vae] if vae_done else [])
        for module in offload:
            module.to("cpu")
        if offload:
            torch.cuda.empty_cache()

    # --- the loop
    record_base = {"options": _jsonish(options), "base": str(job.base), "base_fingerprint": fingerprint,
                   "family": family, "prediction_type": prediction_type, "components": list(components),
                   "seed": options["seed"], "world_size": world}
    batch = options["batch_size"]
    accumulation = options["gradient_accumulation"]
    te_stop = options["text_encoder_steps"] if train_te and options["text_encoder_steps"] > 0 else None
    token_stop = round(options["token_steps_fraction"] * options["steps"]) \
        if train_tokens and options["token_steps_fraction"] < 1 else None
    emb_name = emb_path.stem if emb_path is not None else ""
    lora_due = train_unet or train_te

    def write_results(states, step: int, lora: Path | None, embedding: Path | None, overwrite: bool) -> None:
        """The kohya LoRA (with the embedding bundled if asked) and the embedding file."""
        vectors = [states["tokens"][c] for c in components[1:]] if "tokens" in states else None
        if lora is not None and lora_due:
            adapter = _to_adapter(converters, family, unet, {k: v for k, v in states.items() if k != "tokens"}, options)
            bundle = None
            if vectors is not None and options["bundle_embeddings"]:
                from ..converters.embeddings import bundle_tensors

                bundle = bundle_tensors(family, emb_name, vectors)
            _write_lora(converters, adapter, lora, options, record_base, step, overwrite, bundle, emb_name)
        if embedding is not None and vectors is not None:
            from ..converters.embeddings import write_embedding

            write_embedding(embedding, family, vectors, token_text(options), overwrite=overwrite, metadata={
                "ss_steps": step, "dreambooth_lora.base_fingerprint": record_base["base_fingerprint"],
                "ss_sd_model_name": Path(record_base["base"]).name, "ss_training_comment": "ComfyUI-DreamBooth-LoRA"})

    last_checkpoint = resume_from
    warned = set()
    window: list[tuple[float, float]] = []
    progress = tqdm(total=options["steps"], initial=start_step, desc="training", unit="step", disable=not main)

    def save(step: int) -> Path:
        nonlocal last_checkpoint
        states = _adapter_states(accelerator, unet_run, te_runs, components, train_unet, train_te, token_params)
        if main:
            last_checkpoint = write_checkpoint(
                state_dir, step, states, optimizer.state_dict(), lr_scheduler.state_dict(), record_base,
                lora_writer=lambda path: write_results(states, step, path, path.with_name("embedding.safetensors"),
                                                       True),
                keep=options["keep_checkpoints"])
            _write_log(state_dir, log_rows)
        accelerator.wait_for_everyone()
        return state_dir / step_dir_name(step)

    # A step's losses stay on the device until the end of the next step: reading a value from
    # the GPU waits for all queued work, and doing that every step would leave the GPU idle
    # while Python prepares the next one.
    pending: list[tuple[int, torch.Tensor, float, float]] = []

    def settle() -> None:
        """Read the pending step's losses: stop on a non-finite one, else log and report it."""
        if not pending:
            return
        done, losses, lr, seconds = pending.pop()
        values = losses.tolist()
        if not all(math.isfinite(v) for v in values):
            kept = f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else \
                "no checkpoint was written yet"
            raise TrainingError(f"step {done}: the loss became {values[0]} (not finite); {kept}. Lower the "
                                "learning rate, use --mixed-precision bf16 or no instead of fp16, or set "
                                "--max-grad-norm 1.")
        row = {"step": done, "loss": values[0], "loss_instance": values[1],
               "loss_prior": values[2] if prior_mode != "off" else None, "lr": lr, "seconds": round(seconds, 3)}
        log_rows.append(row)
        _warn_if_dominating(row, window, warned, say)
        progress.set_postfix(loss=f"{row['loss']:.4f}", inst=f"{row['loss_instance']:.4f}",
                             prior="-" if row["loss_prior"] is None else f"{row['loss_prior']:.4f}",
                             lr=f"{row['lr']:.2e}", refresh=False)
        progress.update(1)
        if on_step is not None:
            on_step(row)

    step = start_step
    try:
        for step in range(start_step, options["steps"]):
            te_active = train_te and (te_stop is None or step < te_stop)
            if train_te and not te_active and "te_stopped" not in warned:
                warned.add("te_stopped")
                for param in te_params:
                    param.requires_grad_(False)
                say(f"step {step}: text encoder frozen from here on (--text-encoder-steps {te_stop})")
            tokens_active = train_tokens and (token_stop is None or step < token_stop)
            if train_tokens and not tokens_active and "tokens_stopped" not in warned:
                warned.add("tokens_stopped")
                for param in token_params:
                    param.requires_grad_(False)
                say(f"step {step}: new token embeddings frozen from here on (--token-steps-fraction "
                    f"{options['token_steps_fraction']})")
            text_active = te_active or tokens_active
            if text_trained and not text_active and "text_frozen" not in warned:
                # From here the text side is fixed: encode every caption once, in one call (the
                # same call whether or not the run was resumed, so the numbers are the same).
                warned.add("text_frozen")
                for key in [k for k in embedding_cache if not k[1]]:
                    del embedding_cache[key]
                embed(captions, False)
            sums = torch.zeros(3, device=device)
            for micro in range(accumulation):
                seed = step_seed(options["seed"], step * accumulation + micro, rank)
                torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
                rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
                position = ((step * accumulation + micro) * world + rank) * batch
                rows = _rows(instances, classes, prior_mode, options, position, batch, rng, latents_source)
                for row in rows:
                    if not row["prior"]:
                        row["caption"] = make_caption(row["caption"])
                with accelerator.accumulate(*(([unet_run] if train_unet else []) + (te_runs if text_active else []))):
                    parts = _forward(rows, options, family, prediction_type, unet_run, unet, encoders, embed,
                                     text_active, generator, noise_scheduler, alphas_cumprod, device, weight_dtype)
                    accelerator.backward(parts.total)
                    if accelerator.sync_gradients and options["max_grad_norm"] > 0:
                        accelerator.clip_grad_norm_(unet_params + (te_params if te_active else []) +
                                                    (token_params if tokens_active else []), options["max_grad_norm"])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sums += torch.stack([parts.total.detach(), parts.instance.detach(),
                                     parts.prior.detach() if parts.prior is not None else torch.zeros((), device=device)])
            lr_scheduler.step()
            losses = sums / accumulation
            if world > 1:
                losses = accelerator.reduce(losses, reduction="mean")
            settle()  # the previous step's losses: reading them now lets this step's work run on
            pending.append((step + 1, losses, lr_scheduler.get_last_lr()[0], time.perf_counter() - started))
            done = step + 1
            save_due = bool(options["save_every"]) and done % options["save_every"] == 0 and done < options["steps"]
            preview_due = bool(options["validation_prompts"]) and bool(options["validation_every"]) and \
                done % options["validation_every"] == 0 and done < options["steps"]
            stop = bool(should_stop and should_stop())
            if world > 1:  # every rank stops at the same step
                stop = accelerator.reduce(torch.tensor(float(stop), device=device), reduction="sum").item() > 0
            stop = stop and done < options["steps"]
            if save_due or preview_due or stop or done == options["steps"]:
                settle()  # nothing is saved or shown before its loss is known to be finite
            if save_due:
                save(done)
            if preview_due:
                _preview(accelerator, base, unet, encoders, vae, options, state_dir, done, on_preview)
            if stop:
                progress.close()
                path = save(done)
                raise TrainingStopped(f"stopped at step {done}; checkpoint {path}. Continue with --resume {state_dir}")
    except KeyboardInterrupt:
        # A hard interrupt can land between optimizer.step() and the end of a step, so the
        # weights no longer match any step number: keep the last checkpoint rather than save.
        progress.close()
        kept = f"the last checkpoint {last_checkpoint} is kept" if last_checkpoint else "no checkpoint was written"
        say(f"interrupted during step {step + 1}; {kept}. Continue with --resume {state_dir}")
        raise
    progress.close()

    # --- the result
    final = save(options["steps"])
    states = _adapter_states(accelerator, unet_run, te_runs, components, train_unet, train_te, token_params)
    print(f"[rank {rank}] adapter sha256 {adapter_digest(states)}", flush=True)
    lora_path = output if lora_due else None
    if main:
        write_results(states, options["steps"], lora_path, emb_path, job.overwrite or resume_from is not None)
        _write_final(state_dir, states, record_base, options)
        _plot_losses(state_dir, log_rows)
        if options["validation_prompts"]:
            _preview(accelerator, base, unet, encoders, vae, options, state_dir, options["steps"], on_preview)
        written = " and ".join(str(p) for p in dict.fromkeys(p for p in (lora_path, emb_path) if p is not None))
        say(f"wrote {written} ({options['steps']} steps, {time.perf_counter() - started:.1f} s); state in {state_dir}")
        if emb_path is not None:
            say(f"prompts: {token_text(options)} here (dreambooth-lora sample --embedding {emb_path}), "
                f"embedding:{emb_path.stem} in ComfyUI (file in models/embeddings), {emb_path.stem} in A1111")
    accelerator.wait_for_everyone()
    return TrainResult(output, state_dir, final, options["steps"], time.perf_counter() - started, log_rows,
                       embedding=emb_path, lora=lora_path)


def _make_optimizer(options: Mapping[str, Any], groups: list[dict], device: torch.device):
    name = options["optimizer"]
    if name == "adamw":
        # One fused kernel for all adapter tensors on CUDA; the CPU keeps the default (foreach) path.
        return torch.optim.AdamW(groups, weight_decay=options["weight_decay"], fused=device.type == "cuda")
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes` (CUDA only), "
                            "or use --optimizer adamw.") from None
        if device.type != "cuda":
            raise UserError("--optimizer adamw8bit runs on CUDA GPUs only; use --optimizer adamw on this machine.")
        return bnb.optim.AdamW8bit(groups, weight_decay=options["weight_decay"])
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("--optimizer prodigy needs `pip install prodigyopt`, or use --optimizer adamw.") from None
    return Prodigy(groups, weight_decay=options["weight_decay"])


def _rows(instances, classes, prior_mode: str, options, position: int, batch: int, rng: random.Random,
          latents_source: LatentSource) -> list[dict]:
    """The examples of one micro-batch: ``batch`` instance rows, then ``batch`` prior rows.

    With buckets, every row takes the size of the first instance image drawn, so the batch
    stacks: further instance images come from the same bucket, class images are cut to it."""
    seed = options["seed"]
    wanted, priors = [], []  # (dataset, index, crop box, flip) per row, drawn in row order
    first_size = None
    for b in range(batch):
        index = pick(seed, "instance", position + b, len(instances.images))
        if first_size is not None and instances.images[index].target_size != first_size:
            same = [i for i, item in enumerate(instances.images) if item.target_size == first_size]
            index = same[rng.randrange(len(same))]
        first_size = first_size or instances.images[index].target_size
        flip = instances.flip and rng.random() < 0.5
        wanted.append((instances, index, latents_source.window(instances, index, rng), flip))
        priors.append(False)
    if prior_mode == "class_images":
        for b in range(batch):
            index = pick(seed, "class", position + b, len(classes.images))
            item = classes.images[index]
            if item.target_size != first_size:
                _refit(item, first_size)
            flip = classes.flip and rng.random() < 0.5
            wanted.append((classes, index, latents_source.window(classes, index, rng), flip))
            priors.append(True)
    rows = [{"latents": latents, **meta, "prior": prior}
            for (latents, meta), prior in zip(latents_source.get_many(wanted), priors)]
    if prior_mode == "base_model":
        for row in rows[:batch]:
            rows.append({**row, "caption": options["class_prompt"], "prior": True})
    return rows


def _refit(item, size: tuple[int, int]) -> None:
    """Fit a (square) class image to an instance bucket, always from the image as loaded."""
    from ..data.core import fit

    source = item.__dict__.setdefault("loaded_image", item.image)
    item.image, _ = fit(source, size)
    item.target_size = size


def _forward(rows, options, family, prediction_type, unet_run, unet, encoders, embed, te_active, generator,
             noise_scheduler, alphas_cumprod, device, weight_dtype):
    """One joint forward pass over instance and prior rows; returns the loss parts."""
    latents = torch.stack([row["latents"] for row in rows]).to(device)
    # Drawn on the CPU from the step's own generator (the same numbers on any device, and after
    # a resume), then copied without waiting for the GPU.
    noise = torch.randn(latents.shape, generator=generator)
    if options["noise_offset"] > 0:
        noise = noise + options["noise_offset"] * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
    noise = to_device(noise, device)
    timesteps = to_device(torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(rows),),
                                        generator=generator), device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    hidden, pooled = embed([row["caption"] for row in rows], te_active)
    added = None
    if family == "sdxl":
        time_ids = to_device(torch.tensor([sdxl_time_ids(r["original_size"], r["crop_top_left"], r["target_size"])
                                           for r in rows], dtype=weight_dtype), device)
        added = {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids}
    prediction = unet_run(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype), added_cond_kwargs=added).sample
    target = target_for(prediction_type, latents, noise, timesteps, alphas_cumprod)
    n_instance = sum(not row["prior"] for row in rows)
    if options["prior_preservation"] == "base_model":
        # The frozen model's own prediction for the class prompt is the prior target.
        with torch.no_grad(), adapters_disabled(unet, *encoders):
            base_hidden, base_pooled = embed([row["caption"] for row in rows[n_instance:]], False, base_only=True)
            base_added = None if added is None else {"text_embeds": base_pooled.to(weight_dtype),
                                                     "time_ids": added["time_ids"][n_instance:]}
            frozen = unet(noisy[n_instance:].to(weight_dtype), timesteps[n_instance:], base_hidden.to(weight_dtype),
                          added_cond_kwargs=base_added).sample
        target = torch.cat([target[:n_instance], frozen.float()])
    return dreambooth_loss(prediction, target, timesteps, n_instance, alphas_cumprod, prediction_type,
                           options["prior_weight"], options["loss"], options["huber_delta"], options["min_snr_gamma"])


def _adapter_states(accelerator, unet_run, te_runs, components, train_unet, train_te,
                    token_params=()) -> dict[str, dict[str, torch.Tensor]]:
    """{component: PEFT tensors} of what trains; new token vectors as {"tokens": {component: [N, dim]}}."""
    states = {components[0]: peft_state(accelerator.unwrap_model(unet_run))} if train_unet else {}
    if train_te:
        for component, encoder in zip(components[1:], te_runs):
            states[component] = peft_state(accelerator.unwrap_model(encoder))
    if token_params:
        states["tokens"] = {c: p.detach().float().cpu().clone() for c, p in zip(components[1:], token_params)}
    return states


def _load_token_rows(saved: Mapping[str, torch.Tensor], components, token_params, folder: Path) -> None:
    for component, param in zip(components[1:], token_params):
        if component not in saved or saved[component].shape != param.shape:
            raise TrainingError(f"{folder}: holds no new-token vectors of shape {tuple(param.shape)} for {component}; "
                                "resume with the same --new-tokens.")
        with torch.no_grad():
            param.copy_(saved[component].to(param.device, param.dtype))


def _peft_config_dict(options: Mapping[str, Any], targets: list[str]) -> dict:
    config = adapter_config(options, targets).to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def _to_adapter(converters, family: str, unet, states, options):
    configs = {"unet": _peft_config_dict(options, UNET_TARGETS[options["unet_targets"]])}
    components = {name: (tensors, configs.get(name) or _peft_config_dict(options, TEXT_TARGETS))
                  for name, tensors in states.items()}
    return converters.from_peft(family, converters.unet_layout_of(unet.config), components)


def _write_lora(converters, adapter, path: Path, options, record, step: int, overwrite: bool,
                bundle: Mapping[str, torch.Tensor] | None = None, embedding_name: str = "") -> Path:
    metadata = {**TRAIN_OPTIONS.metadata(options), **DATA_OPTIONS.metadata(options), **CLASS_OPTIONS.metadata(options),
                "ss_steps": str(step), "ss_training_comment": "ComfyUI-DreamBooth-LoRA",
                "dreambooth_lora.base_fingerprint": record["base_fingerprint"],
                "ss_sd_model_name": Path(record["base"]).name}
    if options["prior_preservation"] == "off":
        metadata["ss_prior_loss_weight"] = "0"
    for computed in ("ss_network_dim", "ss_network_alpha"):  # from the adapter itself (mixed ranks possible)
        metadata.pop(computed)
    size = options["resolution"]
    metadata.update({"ss_resolution": f"({size}, {size})", "modelspec.resolution": f"{size}x{size}"})
    trigger = f"{options['identifier']} {options['class_word']}".strip()
    if options["new_tokens"]:
        # the tokens are only known to a UI through the embedding file: its name is the trigger
        trigger = embedding_name
        metadata.update({"dreambooth_lora.tokens": token_text(options), "dreambooth_lora.embedding": embedding_name})
    elif options["mode"] == "style":
        trigger = token_text(options)
    return converters.save_kohya(adapter, path, dtype="fp16", overwrite=overwrite,
                                 prediction_type=record["prediction_type"], trigger_phrase=trigger,
                                 hyperparameters=record["options"], extra=metadata, extra_tensors=bundle)


def load_trained(base, adapter_dir: str | Path) -> dict:
    """Inject a trained adapter (the ``adapter/`` folder or a ``step-N/`` checkpoint of a state
    folder) into a loaded base model, in place; returns its training record."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..converters.core import COMPONENTS

    folder = Path(adapter_dir).expanduser()
    record_path = folder / "training.json" if (folder / "training.json").exists() else folder / "trainer.json"
    record = json.loads(record_path.read_text())
    options = ALL_OPTIONS.values(record["options"])
    modules = dict(zip(COMPONENTS[base.family], [base.unet, *base.text_encoders]))
    for path in sorted(folder.glob("adapter_*.safetensors")):
        component = path.stem.removeprefix("adapter_")
        if component == "tokens":  # the new tokens' vectors, per text encoder
            from .tokens import add_tokens, token_names

            rows = load_file(str(path))
            for name, tokenizer, encoder in zip(COMPONENTS[base.family][1:], base.tokenizers, base.text_encoders):
                add_tokens(tokenizer, encoder, token_names(options["new_tokens"]), rows[name])
            continue
        targets = UNET_TARGETS[options["unet_targets"]] if component == "unet" else TEXT_TARGETS
        inject_adapter_in_model(adapter_config(options, targets), modules[component])
        set_peft_model_state_dict(modules[component], load_file(str(path)))
    return record


def _write_final(state_dir: Path, states, record, options) -> None:
    """The PEFT adapter and every hyper-parameter, next to the kohya file."""
    from safetensors.torch import save_file

    from ..priors.core import _write_atomically

    folder = state_dir / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    for component, tensors in states.items():
        tmp = folder / f".adapter_{component}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(folder / f"adapter_{component}.safetensors")
    config = {"targets": {"unet": UNET_TARGETS[options["unet_targets"]], "text_encoder": TEXT_TARGETS},
              "peft_config": _peft_config_dict(options, UNET_TARGETS[options["unet_targets"]]), **record}
    _write_atomically(folder / "training.json", json.dumps(config, indent=1, default=str).encode())


def _warn_if_dominating(row: dict, window: list, warned: set, say) -> None:
    if row["loss_prior"] is None:
        return
    window.append((row["loss_instance"], row["loss_prior"]))
    if len(window) < 50:
        return
    instance = sum(w[0] for w in window) / len(window)
    prior = sum(w[1] for w in window) / len(window)
    window.clear()
    if prior > 10 * instance and "prior" not in warned:
        warned.add("prior")
        say(f"warning: step {row['step']}: prior loss {prior:.4f} is {prior / instance:.0f}× the instance loss "
            f"{instance:.4f} over the last 50 steps; the subject learns slowly. Lower --prior-weight.")
    elif instance > 10 * prior and "instance" not in warned:
        warned.add("instance")
        say(f"warning: step {row['step']}: instance loss {instance:.4f} is {instance / prior:.0f}× the prior loss "
            f"{prior:.4f} over the last 50 steps; the prior barely constrains the model.")


# --- logs and previews ----------------------------------------------------------------


def _write_log(state_dir: Path, rows: list[dict]) -> None:
    from ..priors.core import _write_atomically

    _write_atomically(state_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


def _read_log(state_dir: Path, up_to: int) -> list[dict]:
    path = state_dir / "log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= up_to]


def _plot_losses(state_dir: Path, rows: list[dict]) -> Path | None:
    """loss.png: instance and prior loss (exponential moving average) against the step."""
    from PIL import Image, ImageDraw

    from ..priors.core import _write_atomically

    if len(rows) < 2:
        return None
    width, height, pad = 800, 400, 50
    series = {"instance": [r["loss_instance"] for r in rows]}
    if rows[-1]["loss_prior"] is not None:
        series["prior"] = [r["loss_prior"] or 0.0 for r in rows]
    smooth = {}
    for name, values in series.items():
        average, out = values[0], []
        for value in values:
            average = 0.9 * average + 0.1 * value
            out.append(average)
        smooth[name] = out
    top = max(max(v) for v in smooth.values()) or 1.0
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline="black")
    colours = {"instance": (30, 90, 200), "prior": (220, 120, 20)}
    for name, values in smooth.items():
        points = [(pad + (width - 1.5 * pad) * i / (len(values) - 1), height - pad - (height - 1.5 * pad) * v / top)
                  for i, v in enumerate(values)]
        draw.line(points, fill=colours[name], width=2)
    draw.text((pad, 5), f"loss (EMA 0.9): instance (blue)" + (", prior (orange)" if "prior" in smooth else "") +
              f"; max {top:.4f}", fill="black")
    draw.text((pad, height - pad + 5), f"step {rows[0]['step']}", fill="black")
    draw.text((width - 2 * pad, height - pad + 5), f"step {rows[-1]['step']}", fill="black")
    from io import BytesIO

    buffer = BytesIO()
    image.save(buffer, format="PNG")
    _write_atomically(state_dir / "loss.png", buffer.getvalue())
    return state_dir / "loss.png"


def parse_scales(text: str) -> tuple[list[float], list[float]]:
    """'1.0' → ([1.0], [1.0]); 'unet=0.5,1 te=0,1' → ([0.5, 1.0], [0.0, 1.0])."""
    text = text.strip() or "1.0"
    if "=" not in text:
        value = float(text)
        return [value], [value]
    found = {"unet": [1.0], "te": [1.0]}
    for part in text.split():
        name, _, values = part.partition("=")
        if name not in found:
            raise UserError(f"--validation-scales: unknown part {name!r}; write e.g. 'unet=0.5,1.0 te=0,1'.")
        found[name] = [float(v) for v in values.split(",") if v]
    return found["unet"], found["te"]


@torch.no_grad()
def _preview(accelerator, base, unet, encoders, vae, options, state_dir: Path, step: int, on_preview) -> Path | None:
    """samples/step-NNNNNN.png: each prompt at each (UNet scale, text-encoder scale), fixed seeds."""
    if not accelerator.is_main_process:
        return None
    from PIL import Image, ImageDraw

    from ..data.core import fill_caption
    from ..priors.core import _write_atomically, make_pipeline

    prompts = [fill_caption(p, options["identifier"], options["class_word"]).replace("{tokens}", token_text(options))
               for p in options["validation_prompts"].split("|") if p.strip()]
    unet_scales, te_scales = parse_scales(options["validation_scales"])
    pipe = make_pipeline(base, "ddim")
    size = options["resolution"]
    cells = []
    was_training = unet.training
    unet.eval()
    with modules_on(next(unet.parameters()).device, vae, *encoders):  # offloaded while training
        for prompt_index, prompt in enumerate(prompts):
            for te_scale in te_scales:
                for unet_scale in unet_scales:
                    with ExitStack() as stack:
                        stack.enter_context(adapter_scale(unet, unet_scale))
                        for encoder in encoders:
                            stack.enter_context(adapter_scale(encoder, te_scale))
                        generator = torch.Generator(device="cpu").manual_seed(options["seed"] + prompt_index)
                        image = pipe(prompt=prompt, num_inference_steps=options["validation_steps"], height=size,
                                     width=size, generator=generator).images[0]
                    cells.append((prompt, unet_scale, te_scale, image))
    unet.train(was_training)
    columns = len(unet_scales)
    rows = len(cells) // columns
    label = 14
    grid = Image.new("RGB", (columns * size, rows * (size + label)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (prompt, unet_scale, te_scale, image) in enumerate(cells):
        x, y = (i % columns) * size, (i // columns) * (size + label)
        grid.paste(image, (x, y + label))
        draw.text((x + 2, y + 1), f"unet {unet_scale:g} te {te_scale:g}: {prompt[:40]}", fill="black")
    from io import BytesIO

    buffer = BytesIO()
    grid.save(buffer, format="PNG")
    path = state_dir / "samples" / f"{step_dir_name(step)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, buffer.getvalue())
    if on_preview is not None:
        on_preview(path)
    return path

"""The model as it trains: the frozen base on the device in its dtypes, adapters injected, new
token rows added, the parameter groups the optimizer trains, and when the text side stops.

The adapter trains in fp32 whatever the base's dtype; with mixed precision only the frozen
weights and the activations are bf16/fp16.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from peft import inject_adapter_in_model

from ..runtime.peft import TEXT_TARGETS, UNET_TARGETS, adapter_config
from ..runtime.precision import offload_weights, store_weights
from ..runtime.tokens import add_tokens, initial_vectors, token_embedding, token_names

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    if device.type != "cuda":
        if name in ("fp16", "bf16"):
            warnings.warn(f"mixed precision {name} needs a CUDA GPU; training in fp32 on {device.type}.")
        return "no"
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def make_accelerator(settings) -> Accelerator:
    """One process per device (CPU when there is no CUDA GPU), with the run's precision."""
    use_cuda = torch.cuda.is_available()
    probe = torch.device("cuda" if use_cuda else "cpu")
    return Accelerator(gradient_accumulation_steps=settings.gradient_accumulation,
                       mixed_precision=resolve_mixed_precision(settings.mixed_precision, probe), cpu=not use_cuda)


def settings_adapter_config(settings, targets: list[str]):
    """peft's config of the run's adapter (type, rank, alpha, dropout) on ``targets``."""
    return adapter_config(settings.adapter, settings.rank, settings.alpha, settings.dropout, targets)


def place_frozen(base, settings, device: torch.device, weight_dtype: torch.dtype) -> None:
    """Freeze every base component and move it to ``device`` in its training dtype.

    Latents encoded once are encoded in fp32. A VAE that runs every step (no cache, or random
    crops) runs in bf16 when training in bf16: twice as fast, and safe (fp16 overflows SDXL's VAE).
    --base-precision stores the UNet's and text encoders' Linear/Conv2d weights narrower than they
    compute (fp8: e4m3 + a per-tensor scale); --offload keeps the UNet's in CPU memory (CUDA)."""
    vae_every_step = not settings.cache_latents or settings.crop == "random"
    vae_dtype = torch.bfloat16 if vae_every_step and weight_dtype == torch.bfloat16 else torch.float32
    for module in [base.unet, base.vae, *base.text_encoders]:
        module.requires_grad_(False)
        wanted = vae_dtype if module is base.vae else weight_dtype
        if next(module.parameters()).dtype != wanted:  # diffusers warns on every .to(dtype), even a no-op
            module.to(dtype=wanted)
        module.to(device)
    offload = settings.offload and device.type == "cuda"
    if settings.offload and not offload:
        warnings.warn(f"--offload needs a CUDA GPU; on {device.type} the weights are in CPU memory already, "
                      "so nothing is offloaded.")
    stored = settings.base_precision if settings.base_precision != "auto" else None
    # Offload streams stored layers: with the training precision they are stored as they compute.
    for module in [base.unet, *base.text_encoders]:
        if stored is not None or (offload and module is base.unet):
            store_weights(module, stored or PRECISION_NAMES[weight_dtype], weight_dtype)
    if offload:
        offload_weights(base.unet)


@dataclass
class Trainables:
    """What trains: flags, the modules accelerate prepares, and the parameters of each group."""
    train_unet: bool
    train_te: bool
    train_tokens: bool
    modules: list = field(default_factory=list)  # the UNet and/or text encoders, in that order
    unet_params: list = field(default_factory=list)
    te_params: list = field(default_factory=list)
    token_params: list = field(default_factory=list)  # one [N, dim] parameter per text encoder

    @property
    def text_trained(self) -> bool:
        return self.train_te or self.train_tokens

    def param_groups(self, settings) -> list[dict]:
        groups = [{"params": self.unet_params, "lr": settings.learning_rate}] if self.unet_params else []
        if self.te_params:
            groups.append({"params": self.te_params, "lr": settings.text_encoder_lr})
        if self.token_params:
            groups.append({"params": self.token_params, "lr": settings.token_lr, "weight_decay": 0.0})
        return groups


def attach_adapters(base, settings) -> Trainables:
    """Inject the adapters and the new tokens' rows; every draw follows from the seed, so every
    rank starts from the same weights."""
    unet, encoders = base.unet, list(base.text_encoders)
    found = Trainables(settings.train_unet, settings.train_text_encoder, settings.new_tokens > 0)
    torch.manual_seed(settings.seed)  # adapter initialisation: identical on every rank
    if found.train_unet:
        inject_adapter_in_model(settings_adapter_config(settings, UNET_TARGETS[settings.unet_targets]), unet)
    if found.train_te:
        for encoder in encoders:
            inject_adapter_in_model(settings_adapter_config(settings, TEXT_TARGETS), encoder)
        found.te_params = [p for e in encoders for p in e.parameters() if p.requires_grad]
    if found.train_tokens:  # rows past the vocabulary, in a parameter of their own (nothing else changes)
        init_generator = torch.Generator().manual_seed(settings.seed)
        for tokenizer, encoder in zip(base.tokenizers, encoders):
            vectors = initial_vectors(tokenizer, encoder, settings.new_tokens, settings.token_init, init_generator)
            add_tokens(tokenizer, encoder, token_names(settings.new_tokens), vectors)
            wrapper = token_embedding(encoder)
            wrapper.extra.requires_grad_(True)
            found.token_params.append(wrapper.extra)
    found.modules = ([unet] if found.train_unet else []) + (encoders if found.text_trained else [])
    for module in found.modules:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # the adapter trains in fp32 whatever the base dtype
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if found.train_te:
            for encoder in encoders:
                # transformers 5 renamed it (the old name warns); older versions have only the old one
                enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
                enable()
    found.unet_params = [p for p in unet.parameters() if p.requires_grad]
    return found


class TextSchedule:
    """When the text side stops training: the text-encoder adapter after --text-encoder-steps,
    the new tokens after --token-steps-fraction of the steps. ``at(step)`` freezes what is due
    (once, saying so) and returns (text encoder active, tokens active)."""

    def __init__(self, trainables: Trainables, settings, say: Callable[[str], None]):
        self.trainables, self.settings, self.say = trainables, settings, say
        self.te_stop = settings.text_encoder_steps if trainables.train_te and settings.text_encoder_steps > 0 else None
        self.token_stop = round(settings.token_steps_fraction * settings.steps) \
            if trainables.train_tokens and settings.token_steps_fraction < 1 else None
        self.frozen: set[str] = set()

    def at(self, step: int) -> tuple[bool, bool]:
        t = self.trainables
        te_active = t.train_te and (self.te_stop is None or step < self.te_stop)
        if t.train_te and not te_active and "te" not in self.frozen:
            self.frozen.add("te")
            for param in t.te_params:
                param.requires_grad_(False)
            self.say(f"step {step}: text encoder frozen from here on (--text-encoder-steps {self.te_stop})")
        tokens_active = t.train_tokens and (self.token_stop is None or step < self.token_stop)
        if t.train_tokens and not tokens_active and "tokens" not in self.frozen:
            self.frozen.add("tokens")
            for param in t.token_params:
                param.requires_grad_(False)
            self.say(f"step {step}: new token embeddings frozen from here on (--token-steps-fraction "
                     f"{self.settings.token_steps_fraction})")
        return te_active, tokens_active

    def text_just_stopped(self, text_active: bool) -> bool:
        """True once, at the first step without any text training (its captions are then encoded once)."""
        if self.trainables.text_trained and not text_active and "text" not in self.frozen:
            self.frozen.add("text")
            return True
        return False


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


def offload_frozen(base, trainables: Trainables, vae_done: bool, device: torch.device) -> None:
    """On a GPU, frozen parts the loop no longer needs wait in CPU memory (previews bring them
    back): on SDXL the two text encoders alone hold 1.6 GB of VRAM."""
    if device.type != "cuda":
        return
    offload = ([] if trainables.text_trained else list(base.text_encoders)) + ([base.vae] if vae_done else [])
    for module in offload:
        module.to("cpu")
    if offload:
        torch.cuda.empty_cache()

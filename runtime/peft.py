"""The PEFT side of an adapter: which layers get one, its config, switching it off or scaling it
(for the frozen-model prior and previews), and its state for checkpoints and export.

peft's ``inject_adapter_in_model`` is used directly (transformers 5 refuses ``add_adapter``
with the peft releases available).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

UNET_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
            "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"],
}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def adapter_config(kind: str, rank: int, alpha: float, dropout: float, targets: list[str]):
    """peft's config for ``kind`` (lora, dora, loha, lokr) on the layers named ``targets``."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind in ("lora", "dora"):
        # gaussian A, zero B (diffusers' choice): the adapter starts as an exact no-op
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          target_modules=targets, use_dora=kind == "dora")
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets)
    return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets)


def config_dict(config) -> dict:
    """A peft config as JSON-able data (sets sorted), for records and the converters."""
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def tuner_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(*modules: torch.nn.Module) -> Iterator[None]:
    """The frozen base model: every adapter layer bypassed (not merely scaled to 0, which
    would still rescale DoRA outputs). peft's public ``enable_adapters`` also flips the
    adapters' ``requires_grad``, which would unfreeze parts the trainer froze on purpose, so
    this sets the flag that public method sets, and nothing else."""
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
    """The adapter tensors of ``module`` as fp32 CPU copies."""
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

"""The computations the planner traces on the meta device, built as the trainer builds them: the
frozen base in its compute dtype, the adapters injected with the run's config and trained in
fp32, gradient checkpointing switched on the same way; a step runs text encoding (when the text
side trains), the UNet over instance and prior rows, the frozen-model prior, the loss and the
backward pass. Each function returns its ``trace.Trace``: the most bytes alive at once, and the
convolution kernels it used.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from peft import inject_adapter_in_model
from torch.utils.checkpoint import checkpoint

from ..models.families import FAMILIES
from ..models.load import empty_modules
from ..runtime.peft import TEXT_TARGETS, UNET_TARGETS, adapter_config, adapters_disabled
from ..runtime.text import encode_ids
from .trace import Trace, autocast_like, traced_peak

TOKENS = 77  # one caption window


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` without diffusers' warning about modules kept in fp32 (it has none)."""
    for param in module.parameters():
        param.data = param.data.to(dtype)


def _latent_size(planner) -> tuple[int, int, int]:
    """(latent height, width, VAE factor) at the training resolution (a square; buckets keep its area)."""
    factor = 2 ** (len(planner.info.vae_config["block_out_channels"]) - 1)
    side = planner.settings.resolution // factor
    return side, side, factor


def _conditioning(planner, rows: int, dtype: torch.dtype):
    """Caption embeddings as the loop hands them to the UNet when the text side is frozen (computed
    once before the loop, so they are inputs here)."""
    config = planner.info.unet_config
    hidden = torch.zeros(rows, TOKENS, config["cross_attention_dim"], device="meta", dtype=dtype)
    added = None
    if FAMILIES[planner.info.family].pooled_text:
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.zeros(rows, pooled, device="meta", dtype=dtype),
                 "time_ids": torch.zeros(rows, 6, device="meta", dtype=dtype)}
    return hidden, added


def traced_step(planner, checkpointing: bool) -> Trace:
    s, info, dtype = planner.settings, planner.info, planner.compute
    vae_every_step = not s.cache_latents or s.crop == "random"
    unet, vae, encoders = empty_modules(info.unet_config, info.vae_config if vae_every_step else None,
                                        [(t.model_class, t.config) for t in info.text_encoders])
    for module in [unet, *encoders]:
        module.requires_grad_(False)
        _cast(module, dtype)
    config = lambda targets: adapter_config(s.adapter, s.rank, s.alpha, s.dropout, targets)  # noqa: E731
    if s.train_unet:
        inject_adapter_in_model(config(UNET_TARGETS[s.unet_targets]), unet)
    for encoder in encoders:
        if s.train_text_encoder:
            inject_adapter_in_model(config(TEXT_TARGETS), encoder)
        elif s.new_tokens:
            # New token rows get gradients through the whole encoder; a small trained parameter at
            # its input (not the vocabulary-sized table) stands in for them.
            encoder.text_model.embeddings.position_embedding.weight.requires_grad_(True)
    for module in [unet, *encoders]:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # the adapter trains in fp32 (trainer.model.attach_adapters)
    rows = s.batch_size * (2 if s.prior_preservation in ("class_images", "base_model") else 1)
    # accelerate runs the trained models' forward under autocast on a GPU with mixed precision
    autocast = dtype if planner.device == "cuda" and dtype != torch.float32 else None
    if checkpointing:
        # As the trainer switches it on; torch's checkpoint recomputes under the autocast state of the
        # forward, so the recomputation here runs under the same emulated autocast.
        kwargs = {"use_reentrant": False, "context_fn": lambda: (nullcontext(), autocast_like(autocast))}
        unet.enable_gradient_checkpointing(lambda module, *args: checkpoint(module, *args, **kwargs))
        if s.train_text_encoder:
            for encoder in encoders:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if vae is not None:
        _cast(vae, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    height, width, factor = _latent_size(planner)
    channels = info.unet_config.get("in_channels", 4)

    def step():
        if vae is not None:  # the instance (and class) images encoded every step
            with torch.no_grad():
                pixels = torch.zeros(rows, 3, height * factor, width * factor, device="meta", dtype=next(vae.parameters()).dtype)
                vae.encode(pixels).latent_dist.mean
        with autocast_like(autocast):  # active in the backward too: checkpointing recomputes under it
            trained_step()

    def trained_step():
        hidden, added = _conditioning(planner, rows, dtype)
        if planner.text_trained:
            ids = [torch.zeros(rows, TOKENS, dtype=torch.long, device="meta") for _ in encoders]
            hidden, pooled = encode_ids(info.family, encoders, ids)
            hidden = hidden.to(dtype)
            if added is not None:
                added["text_embeds"] = pooled.to(dtype)
        latents = torch.zeros(rows, channels, height, width, device="meta")
        timesteps = torch.zeros(rows, dtype=torch.long, device="meta")
        prediction = unet(latents.to(dtype), timesteps, hidden, added_cond_kwargs=added).sample
        target = torch.zeros_like(latents)
        if s.prior_preservation == "base_model":  # the frozen model's prediction for the prior rows
            half = rows // 2
            with torch.no_grad(), adapters_disabled(unet, *encoders):
                frozen = unet(latents[half:].to(dtype), timesteps[half:], hidden[half:],
                              added_cond_kwargs=None if added is None else {k: v[half:] for k, v in added.items()}).sample
            target = torch.cat([target[:half], frozen.float()])
        loss = (prediction.float() - target).square().mean()
        loss.backward()

    return traced_peak(step)


def traced_vae_encode(planner) -> Trace:
    """Latent caching: one image at a time through the fp32 VAE encoder (no gradients)."""
    _, vae, _ = empty_modules(None, planner.info.vae_config)
    height, width, factor = _latent_size(planner)

    def encode():
        return vae.encode(torch.zeros(1, 3, height * factor, width * factor, device="meta")).latent_dist.mean

    return traced_peak(encode, grad=False)


def traced_generation(planner) -> Trace:
    """A class image: the guided UNet (negative and positive rows together) in the compute dtype,
    then the VAE decode in fp32; the larger of the two."""
    unet, vae, _ = empty_modules(planner.info.unet_config, planner.info.vae_config)
    _cast(unet, planner.compute)
    height, width, _ = _latent_size(planner)
    channels = planner.info.unet_config.get("in_channels", 4)
    hidden, added = _conditioning(planner, 2, planner.compute)

    def denoise():
        latents = torch.zeros(2, channels, height, width, device="meta", dtype=planner.compute)
        return unet(latents, torch.zeros(2, dtype=torch.long, device="meta"), hidden, added_cond_kwargs=added).sample

    def decode():
        latents = torch.zeros(1, vae.config.latent_channels, height, width, device="meta")
        return vae.decode(latents).sample

    first, second = traced_peak(denoise, grad=False), traced_peak(decode, grad=False)
    return Trace(max(first.peak, second.peak), 0, first.convolutions | second.convolutions)

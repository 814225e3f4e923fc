"""The DreamBooth loss: instance term + λ · prior term, computed from one joint forward pass.

The batch is ``[instance examples ..., prior examples ...]``: the first ``n_instance`` rows
are the subject, the rest are the class (class images, or the instance latents under the
class prompt when the frozen base model supplies the target). Every weighting is applied per
sample *before* the split, with the sample's own timestep: diffusers' SDXL script applies
min-SNR weights computed from the whole batch's timesteps to the instance half only, which is
wrong for batch > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    total: torch.Tensor  # what is back-propagated
    instance: torch.Tensor  # mean over the instance rows (weighted)
    prior: torch.Tensor | None  # mean over the prior rows (weighted), None without prior rows


def target_for(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon models) or the velocity
    v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (v-prediction models such as SD2 768)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        abar = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
        return (abar.sqrt() * noise.float() - (1 - abar).sqrt() * latents.float()).to(noise.dtype)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each sample's timestep."""
    abar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return abar / (1 - abar)


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                    huber_delta: float = 0.1, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over C×H×W per sample, in fp32; ``weights`` (N, 1, H, W), the masks' loss weights,
    multiply each latent cell first (a weight of exactly 1 leaves the numbers as they were)."""
    diff = prediction.float() - target.float()
    if kind == "mse":
        per_pixel = diff.square()
    elif kind == "huber":
        # pseudo-Huber, scaled to equal the squared error near 0: 2δ(√(d²+δ²) − δ) ≈ d²
        per_pixel = 2 * huber_delta * (torch.sqrt(diff.square() + huber_delta**2) - huber_delta)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    if weights is not None:
        per_pixel = per_pixel * weights
    return per_pixel.flatten(1).mean(dim=1)


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, n_instance: int,
                    alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", prior_weight: float = 1.0,
                    kind: str = "mse", huber_delta: float = 0.1, min_snr_gamma: float = 0.0,
                    weights: torch.Tensor | None = None) -> LossParts:
    """``loss = mean(instance rows) + prior_weight · mean(prior rows)``, each row optionally
    min-SNR-γ weighted (Hang et al. 2023: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v) and
    mask weighted (``weights``: see ``per_sample_loss``)."""
    losses = per_sample_loss(prediction, target, kind, huber_delta, weights)
    if min_snr_gamma > 0:
        ratio = snr(timesteps, alphas_cumprod)
        clipped = torch.clamp(ratio, max=min_snr_gamma)
        weights = clipped / (ratio + 1) if prediction_type == "v_prediction" else clipped / ratio
        losses = losses * weights
    instance = losses[:n_instance].mean()
    if n_instance == len(losses):
        return LossParts(instance, instance, None)
    prior = losses[n_instance:].mean()
    return LossParts(instance + prior_weight * prior, instance, prior)

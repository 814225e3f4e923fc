"""The DreamBooth loss against a hand computation, for epsilon and v-prediction models."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dreambooth_lora.trainer.loss import dreambooth_loss


def _alphas_cumprod() -> torch.Tensor:
    # SD's scaled_linear betas, written out rather than taken from diffusers
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)


def _hand(prediction, latents, noise, timesteps, abar, n_instance, weight, kind, gamma, prediction_type):
    """Per sample, element by element, in float64."""
    per_sample = []
    for i in range(len(prediction)):
        a = float(abar[timesteps[i]])
        x0, eps, pred = latents[i].double(), noise[i].double(), prediction[i].double()
        target = eps if prediction_type == "epsilon" else a**0.5 * eps - (1 - a) ** 0.5 * x0
        diff = pred - target
        if kind == "mse":
            value = float((diff**2).mean())
        else:
            value = float((2 * 0.1 * (torch.sqrt(diff**2 + 0.01) - 0.1)).mean())
        if gamma:
            snr = a / (1 - a)
            value *= min(snr, gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        per_sample.append(value)
    instance = sum(per_sample[:n_instance]) / n_instance
    prior = sum(per_sample[n_instance:]) / (len(per_sample) - n_instance)
    return instance + weight * prior, instance, prior


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind,gamma", [("mse", 0.0), ("mse", 5.0), ("huber", 0.0)])
def test_loss_matches_hand_computation(prediction_type, kind, gamma):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    noise = torch.randn(4, 4, 8, 8, generator=generator)
    prediction = torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 400, 750, 999])
    abar = _alphas_cumprod()
    target = noise if prediction_type == "epsilon" else \
        abar[timesteps].sqrt().view(-1, 1, 1, 1) * noise - (1 - abar[timesteps]).sqrt().view(-1, 1, 1, 1) * latents
    parts = dreambooth_loss(prediction, target, timesteps, 2, abar, prediction_type, prior_weight=0.7, kind=kind,
                            min_snr_gamma=gamma)
    total, instance, prior = _hand(prediction, latents, noise, timesteps, abar, 2, 0.7, kind, gamma, prediction_type)
    assert parts.instance.item() == pytest.approx(instance, rel=1e-5)
    assert parts.prior.item() == pytest.approx(prior, rel=1e-5)
    assert parts.total.item() == pytest.approx(total, rel=1e-5)
    # the prior rows really are the last two: swapping an instance and a prior row changes both terms
    swapped = dreambooth_loss(prediction[[2, 1, 0, 3]], target[[2, 1, 0, 3]], timesteps[[2, 1, 0, 3]], 2, abar,
                              prediction_type, 0.7, kind, min_snr_gamma=gamma)
    assert swapped.instance.item() != pytest.approx(instance, rel=1e-3)


@pytest.mark.parametrize("fixture", ["sd1-tiny", "sd2v-tiny"])
def test_trainer_forward_builds_that_loss(fixture, tmp_path):
    """The trainer's own forward pass (noise, timesteps, targets, prior rows) against the same
    computation written out with the model, on a fixed batch of 1 instance + 1 class row."""
    from dreambooth_lora.data.core import load_batch
    from dreambooth_lora.fixtures.checkpoints import fixture_path
    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.runtime.text import encode_text
    from dreambooth_lora.trainer.batches import LatentSource, micro_batch_rows
    from dreambooth_lora.trainer.job import resolve_settings
    from dreambooth_lora.trainer.step import JointForward

    base = load_base_model(fixture_path(fixture))
    expected_type = "v_prediction" if fixture == "sd2v-tiny" else "epsilon"
    assert base.noise_scheduler.config.prediction_type == expected_type
    pictures = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
    instances = load_batch(pictures[:1], None, "a photo of sks dog", resolution=64)
    classes = load_batch(pictures[1:], None, "a photo of a dog", resolution=64)
    settings = resolve_settings({"prior_weight": 0.5, "seed": 1, "resolution": 64})
    assert settings.prior_preservation == "class_images"
    source = LatentSource(base.vae, torch.device("cpu"), cache=True)
    rows = micro_batch_rows(instances, classes, settings, 0, 1, random.Random(0), source)
    assert [r["prior"] for r in rows] == [False, True] and rows[1]["caption"] == "a photo of a dog"

    def embed(texts, te_training, base_only=False):
        with torch.no_grad():
            return encode_text(base.family, base.tokenizers, base.text_encoders, texts, torch.device("cpu"))

    abar = base.noise_scheduler.alphas_cumprod
    with torch.no_grad():
        forward = JointForward(base.family, expected_type, base.unet, base.unet, base.text_encoders,
                               base.noise_scheduler, abar, torch.device("cpu"), torch.float32)
        parts = forward.loss(rows, settings, embed, False, torch.Generator().manual_seed(11))
        generator = torch.Generator().manual_seed(11)
        latents = torch.stack([r["latents"] for r in rows])
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (2,), generator=generator)
        a = abar[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        hidden, _ = embed(["a photo of sks dog", "a photo of a dog"], False)
        prediction = base.unet(noisy, timesteps, hidden).sample
        target = noise if expected_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        instance = ((prediction[0] - target[0]) ** 2).mean().item()
        prior = ((prediction[1] - target[1]) ** 2).mean().item()
    assert parts.instance.item() == pytest.approx(instance, rel=1e-4)
    assert parts.prior.item() == pytest.approx(prior, rel=1e-4)
    assert parts.total.item() == pytest.approx(instance + 0.5 * prior, rel=1e-4)

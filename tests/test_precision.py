"""Frozen base weights stored in fp8 (e4m3 + per-tensor scale) or bf16: exact arithmetic around the
stored weight, peft adapters on stored layers, closeness to fp32 on the tiny models, and a run.

How close is close enough, and why. A stored weight differs from its fp32 value only by rounding
to the storage's mantissa: bf16 keeps 7 bits, e4m3 keeps 3, so each fp8 weight's rounding error
is 2^(7-3) = 16 times a bf16 weight's, and through the same network on the same inputs the
output's error scales the same way (measured on sd1-tiny / sdxl-tiny: fp8/bf16 error ratios
12.5-15.9; absolute: text-encoder states 5.2%, UNet output 10.0-10.8% relative to fp32, bf16
0.3-0.7%). The tests require fp8's error to be at most 20× bf16's (16 plus a quarter for the
spread) and at least 4× (so it really is the narrow format), and the UNet output within 15% of
fp32. These random tiny models are a worst case: their layers are 32-64 wide, so a layer's output
averages over few rounded weights.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import inject_adapter_in_model
from safetensors import safe_open
from torch import nn

from dreambooth_lora.errors import UserError
from dreambooth_lora.fixtures.checkpoints import fixture_path
from dreambooth_lora.models.families import FAMILIES
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.runtime.peft import adapter_config
from dreambooth_lora.runtime.precision import (StoredConv2d, StoredLinear, quantize, restore_weights, storage_dtype,
                                               store_weights, stored_layers)
from dreambooth_lora.runtime.text import encode_text
from dreambooth_lora.trainer.loop import train

from test_trainer import tiny_job

FP8_OVER_BF16_MAX = 20.0  # 16 = 2^(7-3) mantissa bits, plus a quarter for the spread (measured ≤ 15.9)
FP8_OVER_BF16_MIN = 4.0  # measured ≥ 12.5: far below means the weights were not stored in fp8
UNET_FP8_MAX = 0.15  # relative to fp32 (measured 0.100-0.108 on the tiny models)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1, stride=1)
        self.down = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.q = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4, bias=False)

    def forward(self, x):
        h = self.down(torch.relu(self.conv(x))).permute(0, 2, 3, 1)
        return self.out(torch.relu(self.q(h)))


def toy(precision: str | None, kind: str | None = None, seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    model = Toy().requires_grad_(False)
    if precision:
        store_weights(model, precision, torch.float32)
    if kind:
        torch.manual_seed(1)
        inject_adapter_in_model(adapter_config(kind, 2, 2.0, 0.0, ["q", "conv", "down", "out"]), model)
        for name, param in model.named_parameters():
            if "lora_B" in name or "hada_w2" in name or "lokr_w2" in name:
                nn.init.normal_(param, std=0.1)  # not the no-op start, so the base and the adapter both matter
    return model


def grads_of(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), {**grads, "input": x.grad}


def test_stored_layers_compute_exactly_what_their_dequantized_weight_computes():
    """The autograd function around a stored weight (forward, input and bias gradients, for Linear
    and strided Conv2d) against plain layers holding the same dequantized weights."""
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(3))
    stored = toy("fp8")
    plain = toy(None)
    for name in ("conv", "down", "q", "out"):
        layer = getattr(stored, name)
        assert isinstance(layer, (StoredLinear, StoredConv2d)) and layer.stored.dtype == torch.uint8
        getattr(plain, name).weight.data = layer.weight.detach().clone()
    for model in (stored, plain):  # gradients to the biases too (the frozen base's never need them)
        for name in ("conv", "down", "q"):
            getattr(model, name).bias.requires_grad_(True)
    y_stored, g_stored = grads_of(stored, x)
    y_plain, g_plain = grads_of(plain, x)
    torch.testing.assert_close(y_stored, y_plain, rtol=1e-6, atol=1e-6)
    assert g_stored.keys() == g_plain.keys() == {"conv.bias", "down.bias", "q.bias", "input"}
    for key in g_plain:
        torch.testing.assert_close(g_stored[key], g_plain[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_peft_adapters_on_fp8_layers_train_in_fp32_as_on_plain_layers(kind):
    """peft wraps a stored layer as any Linear/Conv2d, reads its dequantized weight (DoRA's norm,
    the adapter's dtype), and the adapter's gradients are those of the plain model with the same
    (dequantized) base weights."""
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(3))
    stored = toy("fp8", kind)
    plain = toy(None)
    for name in ("conv", "down", "q", "out"):
        getattr(plain, name).weight.data = getattr(stored, name).base_layer.weight.detach().clone()
    torch.manual_seed(1)
    inject_adapter_in_model(adapter_config(kind, 2, 2.0, 0.0, ["q", "conv", "down", "out"]), plain)
    plain.load_state_dict({k: v for k, v in stored.state_dict().items() if k in plain.state_dict()}, strict=False)
    adapters = [p for n, p in stored.named_parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    y_stored, g_stored = grads_of(stored, x)
    y_plain, g_plain = grads_of(plain, x)
    torch.testing.assert_close(y_stored, y_plain, rtol=1e-5, atol=1e-6)
    assert g_stored.keys() == g_plain.keys() and len(g_stored) > 4
    for key in g_plain:
        torch.testing.assert_close(g_stored[key], g_plain[key], rtol=1e-4, atol=1e-6)


def test_fp8_storage_keeps_a_quarter_of_the_bytes_and_survives_moves():
    weight = torch.randn(64, 32) * 0.02
    quantized, scale = quantize(weight, storage_dtype("fp8"))
    assert quantized.dtype == torch.float8_e4m3fn and quantized.float().abs().max() == 448
    model = toy(None)
    report = store_weights(model, "fp8", torch.float32)
    assert report.layers == 4 and report.bytes_after * 4 == report.bytes_before
    before = model.q.weight.clone()
    model.to(dtype=torch.bfloat16)  # biases follow; the stored bytes are an integer view and stay fp8
    assert model.q.stored.dtype == torch.uint8 and model.q.weight.dtype == torch.bfloat16
    model.float()
    torch.testing.assert_close(model.q.weight, before)
    restore_weights(model)
    assert not stored_layers(model) and type(model.q) is nn.Linear and torch.equal(model.q.weight, before)


@pytest.mark.parametrize("fixture", ["sd1-tiny", "sdxl-tiny"])
def test_fp8_base_is_close_to_fp32_and_bf16_storage_on_the_tiny_models(fixture):
    def outputs(precision):
        base = load_base_model(fixture_path(fixture))
        for module in [base.unet, *base.text_encoders]:
            module.requires_grad_(False)
            if precision:
                store_weights(module, precision, torch.float32)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            hidden, pooled = encode_text(base.family, base.tokenizers, base.text_encoders,
                                         ["a photo of a sks dog", "a red circle on a brick background"], "cpu")
            added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)} \
                if FAMILIES[base.family].pooled_text else None
            latents = torch.randn(2, 4, 8, 8, generator=generator)
            out = base.unet(latents, torch.tensor([10, 500]), hidden, added_cond_kwargs=added).sample
        return {"text": hidden, "unet": out}

    reference, bf16, fp8 = outputs(None), outputs("bf16"), outputs("fp8")
    for part in ("text", "unet"):
        error = {name: ((got[part] - reference[part]).norm() / reference[part].norm()).item()
                 for name, got in (("bf16", bf16), ("fp8", fp8))}
        assert FP8_OVER_BF16_MIN * error["bf16"] < error["fp8"] < FP8_OVER_BF16_MAX * error["bf16"], (part, error)
    unet_error = ((fp8["unet"] - reference["unet"]).norm() / reference["unet"].norm()).item()
    assert unet_error < UNET_FP8_MAX


def test_a_run_with_an_fp8_base_trains_like_the_fp32_one(tmp_path, capsys):
    """12 steps of sd1-tiny: the fp8 base's losses follow the fp32 base's (same seed, same noise),
    and the run says its predicted and measured peak memory."""
    fp32 = train(tiny_job(tmp_path, "fp32", prior_preservation="base_model"))
    out = capsys.readouterr().out
    assert "memory: predicted peak" in out and "memory: measured" in out and "peak resident-memory growth" in out
    fp8 = train(tiny_job(tmp_path, "fp8", prior_preservation="base_model", base_precision="fp8"))
    with safe_open(str(fp8.output), framework="pt") as handle:
        assert handle.metadata()["dreambooth_lora.base_precision"] == "fp8"
    losses = [(a["loss"], b["loss"]) for a, b in zip(fp32.log, fp8.log)]
    assert len(losses) == 12
    relative = [abs(b - a) / a for a, b in losses]
    assert sum(relative) / len(relative) < 0.03, relative  # measured 0.0072 (bf16 storage: 0.0004)


def test_offload_on_a_cpu_is_a_said_no_op(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(tiny_job(tmp_path, "off", prior_preservation="base_model", offload=True, steps=2))
    assert result.output.exists()
    assert any("--offload needs a CUDA GPU" in str(w.message) for w in caught)


def test_fp8_without_float8_support_names_the_option(monkeypatch):
    from dreambooth_lora.runtime import precision

    monkeypatch.delitem(precision.STORAGE, "fp8")
    with pytest.raises(UserError, match="--base-precision fp8 needs PyTorch 2.1"):
        storage_dtype("fp8")

"""Frozen base weights stored narrower than they compute (fp8 with a per-tensor scale, or
bf16/fp16 under fp32 compute), and streamed from CPU memory on a GPU (offload).

    store_weights(unet, "fp8", torch.bfloat16)   # every frozen Linear/Conv2d: e4m3 + scale
    offload_weights(unet)                         # their stored bytes wait in pinned CPU memory

Only the weight matrices of ``nn.Linear`` and ``nn.Conv2d`` change: they hold nearly all of a
UNet's or text encoder's parameters, while biases, norms and embeddings are small and stay in the
compute dtype. A stored layer keeps its class (``isinstance(layer, nn.Linear)`` still holds, so
peft wraps it as it wraps any Linear) and its ``weight`` attribute, which now gives the
dequantized weight in the compute dtype: peft reads it to place and type new adapters, DoRA to
take its norm, diffusers and transformers to learn a module's dtype. The adapter therefore stays
fp32 whatever the base is stored in.

The stored bytes are an integer view (uint8 for fp8, int16 for bf16/fp16), kept outside the
module's parameters and buffers: ``module.to(dtype)`` never widens them again (it casts only
floating tensors), DDP does not broadcast them, and ``_apply`` moves them with the module unless
they are offloaded. Forward and backward go through one autograd function that dequantizes the
weight for the op and keeps nothing of it: autograd would otherwise save the wide copy of every
weight until the backward pass, and the memory fp8 saves would come straight back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

# The storage dtypes by name; "fp8" is e4m3 (3 mantissa bits: the precision weights need; e5m2's
# extra range is for gradients), scaled so the tensor's largest magnitude lands on e4m3's maximum.
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
if hasattr(torch, "float8_e4m3fn"):
    STORAGE["fp8"] = torch.float8_e4m3fn
# Integer dtypes of the same width: the view the bytes are kept in.
_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def storage_dtype(name: str) -> torch.dtype:
    if name == "fp8" and "fp8" not in STORAGE:
        raise UserError(f"--base-precision fp8 needs PyTorch 2.1 or newer (this is {torch.__version__}); "
                        "upgrade torch or use --base-precision bf16.")
    return STORAGE[name]


def bytes_per_weight(name: str) -> int:
    """Bytes one stored weight takes ('fp8' → 1, 'bf16'/'fp16' → 2, 'fp32' → 4)."""
    return {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}[name]


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(``weight`` in ``dtype``, its scale): dequantized = stored · scale. Per-tensor for fp8 (the
    largest magnitude maps to e4m3's largest value, 448), 1.0 for the wider float types."""
    if dtype.itemsize > 1:
        return weight.detach().to(dtype), 1.0
    amax = weight.detach().abs().max().float().item()
    scale = amax / torch.finfo(dtype).max if amax > 0 else 1.0
    return (weight.detach().float() / scale).to(dtype), scale


class _StoredOp(torch.autograd.Function):
    """``layer``'s op with its weight dequantized for the forward and again for the backward
    (nothing of the weight is saved). The weight is frozen; the input and bias may need grads."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        # Under autocast (a GPU run with mixed precision) the op computes in autocast's dtype: widen
        # the weight to that, not to the input's (fp32 after a norm), which autocast would narrow again.
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        weight = layer.dequantized(dtype, x.device)
        ctx.layer, ctx.input_shape, ctx.input_dtype = layer, x.shape, x.dtype
        return layer.op(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = layer.dequantized(grad.dtype, grad.device)
            grad_x = layer.op_input_grad(ctx.input_shape, weight, grad).to(ctx.input_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = layer.op_bias_grad(grad)
        return grad_x, None, grad_bias


class _Stored:
    """What a stored Linear and a stored Conv2d share (mixed into subclasses of each)."""

    stored: torch.Tensor  # the integer view of the stored weight
    storage: torch.dtype
    scale: float
    compute_dtype: torch.dtype  # what ``weight`` gives (peft reads this name for the adapter's dtype)
    compute_device: torch.device  # where ``weight`` is given (the module's device, also when offloaded)
    offloaded: bool = False
    streamed: list | None = None  # [bytes moved host → device] while offloaded

    # peft builds a conv adapter as ``type(base_layer)(...)``: such a layer was never stored and
    # behaves as the plain layer it is ("stored" is set by ``store_weights`` alone).
    @property
    def weight(self) -> torch.Tensor:
        if "stored" not in self.__dict__:
            return nn.Module.__getattr__(self, "weight")
        return self.dequantized(self.compute_dtype, self.compute_device)

    def dequantized(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        data = self.stored
        if data.device != device:  # offloaded: this layer's bytes come over now, and go when used
            data = data.to(device, non_blocking=True)
            if self.streamed is not None:
                self.streamed[0] += data.nbytes
        weight = data.view(self.storage).to(dtype)
        return weight * self.scale if self.scale != 1.0 else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "stored" not in self.__dict__:
            return super().forward(x)
        return _StoredOp.apply(x, self, self.bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if "stored" in self.__dict__:
            # ``fn`` on an empty tensor tells where .to()/.cuda()/.half() send this module and in which
            # dtype it now computes; the stored bytes follow the device only, and not while offloaded.
            probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.compute_device))
            self.compute_dtype, self.compute_device = probe.dtype, probe.device
            if not self.offloaded:
                self.stored = fn(self.stored)
        return self


class StoredLinear(_Stored, nn.Linear):
    def op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def op_input_grad(self, shape, weight, grad):
        return grad @ weight

    def op_bias_grad(self, grad):
        return grad.reshape(-1, grad.shape[-1]).sum(0)


class StoredConv2d(_Stored, nn.Conv2d):
    def op(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def op_input_grad(self, shape, weight, grad):
        return torch.nn.grad.conv2d_input(shape, weight, grad, self.stride, self.padding, self.dilation, self.groups)

    def op_bias_grad(self, grad):
        return grad.sum((0, 2, 3))


_STORED_CLASS = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d}


def _storable(module: nn.Module, frozen: bool = True) -> bool:
    if type(module) not in _STORED_CLASS or (frozen and module.weight.requires_grad):
        return False
    # A string padding ("same") or a non-zero padding mode has no plain conv2d_input backward.
    return not isinstance(module, nn.Conv2d) or (module.padding_mode == "zeros" and not isinstance(module.padding, str))


def stored_layers(module: nn.Module) -> list[_Stored]:
    return [m for m in module.modules() if isinstance(m, _Stored) and "stored" in m.__dict__]


@dataclass
class StoreReport:
    layers: int  # Linear/Conv2d layers now stored
    weights: int  # weights (numbers) in them
    bytes_before: int
    bytes_after: int


def store_weights(module: nn.Module, precision: str, compute_dtype: torch.dtype) -> StoreReport:
    """Store every frozen Linear/Conv2d weight of ``module`` in ``precision`` ('fp8', 'bf16',
    'fp16', 'fp32'); everything else is cast to ``compute_dtype``. Converted one layer at a time,
    so memory never holds more than one extra weight. Already stored layers are restored first."""
    dtype = storage_dtype(precision)
    if any(p.dtype != compute_dtype for p in module.parameters()):  # diffusers warns on every .to(dtype)
        module.to(dtype=compute_dtype)
    report = StoreReport(0, 0, 0, 0)
    for layer in list(module.modules()):
        if isinstance(layer, _Stored) and "stored" in layer.__dict__:  # stored again (another precision): from its dequantized weight
            source = layer.dequantized(torch.float32, layer.compute_device)
        elif _storable(layer):
            source = layer.weight
        else:
            continue
        quantized, scale = quantize(source, dtype)
        report.layers += 1
        report.weights += source.numel()
        report.bytes_before += source.numel() * compute_dtype.itemsize
        report.bytes_after += quantized.nbytes
        if not isinstance(layer, _Stored):
            del layer._parameters["weight"]
            layer.__class__ = _STORED_CLASS[type(layer)]
        del source
        layer.stored = quantized.view(_VIEW[dtype.itemsize])
        layer.storage, layer.scale = dtype, scale
        layer.compute_dtype, layer.compute_device = compute_dtype, quantized.device
        layer.offloaded, layer.streamed = False, None
    return report


def offload_weights(module: nn.Module, counter: list | None = None) -> int:
    """Keep the stored weights of ``module`` in pinned CPU memory; each layer's bytes come to the
    GPU for its forward and again for its backward, one layer at a time, and are dropped after use.
    ``counter[0]`` (if given) adds up the bytes moved. Returns the bytes offloaded. Needs a CUDA
    module (callers check): on the CPU there is nothing to offload to."""
    total = 0
    for layer in stored_layers(module):
        layer.stored = layer.stored.to("cpu").pin_memory()
        layer.offloaded, layer.streamed = True, counter
        total += layer.stored.nbytes
    return total


def restore_weights(module: nn.Module) -> None:
    """Undo ``store_weights``: plain Linear/Conv2d layers with the dequantized weight (tests, and
    anything that needs a normal module back)."""
    for layer in stored_layers(module):
        weight = layer.weight
        plain = next(base for base in type(layer).__mro__ if base in _STORED_CLASS)
        for name in ("stored", "storage", "scale", "compute_dtype", "compute_device", "offloaded", "streamed"):
            layer.__dict__.pop(name, None)
        layer.__class__ = plain
        layer.weight = nn.Parameter(weight, requires_grad=False)


def weight_counts(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """(weights of the Linear/Conv2d layers ``store_weights`` would store, all other parameters) of
    plain ``modules``; meta modules too (only shapes are read)."""
    storable = total = 0
    for module in modules:
        total += sum(p.numel() for p in module.parameters())
        storable += sum(layer.weight.numel() for layer in module.modules() if _storable(layer, frozen=False))
    return storable, total - storable

"""The memory a computation needs, worked out from shapes alone: the real modules, built on the
meta device (no weights, no arithmetic), run the real forward and backward, and every tensor
they create is counted from its birth to its death.

    with LiveBytes() as live, attention_as_on_device():
        loss = unet(...).sample.float().square().mean()
        loss.backward()
    live.peak   # bytes: the most that was alive at once (parameters made before are not counted)

This counts what autograd keeps for the backward, the temporaries of each op, gradients and
the recomputation of gradient checkpointing, in the order they really happen; it is how the
planner derives activations instead of guessing them. Storage that existed before (weights,
inputs) is not counted, not even through a view made during the trace (``weight.t()``, which
autograd keeps). Run on real CPU tensors instead, it counts the same bytes within 0.1% (sd1-tiny,
sd15-full), and one step's resident-memory growth within 11%. What differs from a run on a
device: scaled-dot-product attention on meta tensors falls back to the math kernel (which keeps
the whole attention matrix), so it is replaced here by a stand-in with the memory of the fused
kernels both CPUs and GPUs use (they keep the output, laid out so that the usual reshape after
attention is free, and one log-sum-exp row per query); autocast exists only for real devices,
so for a GPU run (bf16/fp16 mixed precision under autocast, as
accelerate runs the models) ``autocast_like`` applies autocast's own rule to the meta tensors:
matrix products and convolutions in the low precision, normalizations and softmax in fp32, and
so casts (and what autograd keeps of them) happen where the GPU run makes them. Allocator
rounding, kernel workspaces and library caches are not tensors and are not seen.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


# torch.amp's CUDA op lists, the entries a diffusion model's memory depends on: these run in the
# autocast dtype, the next ones in fp32 (https://pytorch.org/docs/stable/amp.html#cuda-ops-that-can-autocast-to-float16).
_LOW_PRECISION = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul,
                  torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.baddbmm, torch.addmm}
_FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, F.mse_loss}


class AutocastLike(TorchFunctionMode):
    """Autocast's casting rule on meta tensors (autocast itself acts only on real device tensors)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wanted = self.dtype if func in _LOW_PRECISION else torch.float32 if func in _FP32 else None
        if wanted is not None:
            cast = lambda t: t.to(wanted) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != wanted else t  # noqa: E731
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)


_AUTOCAST: list[torch.dtype] = []  # the dtype autocast_like is emulating, for the attention stand-in


@contextmanager
def autocast_like(dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on meta tensors, for the region a GPU run autocasts (None: off)."""
    if dtype is None:
        yield
        return
    _AUTOCAST.append(dtype)
    try:
        with AutocastLike(dtype):
            yield
    finally:
        _AUTOCAST.pop()


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive now and at most, counted per storage (views share one)."""

    def __init__(self):
        super().__init__()
        self.owners: dict[int, int] = {}  # storage → tensors that hold it
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0
        # Distinct convolution kernels (shapes, strides, direction): a CPU run compiles and keeps one each.
        self.convolutions: set[tuple] = set()

    def _released(self, key: int) -> None:
        self.owners[key] -= 1
        if not self.owners[key]:
            del self.owners[key]
            self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            self._convolution(func, args)
        # An output on an input's storage (a view, an in-place op) is new memory only if that input's
        # is; storages made before the trace (weights, inputs: counted elsewhere) are never counted.
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self.owners:
                if key in inputs:
                    continue
                self.owners[key], self.sizes[key] = 0, storage.nbytes()
                self.now += self.sizes[key]
                self.peak = max(self.peak, self.now)
            self.owners[key] += 1
            # A tensor's Python object lives as long as the tensor (torch keeps it for autograd's
            # saved copies too), so its finalizer runs when the storage really loses a holder.
            weakref.finalize(tensor, self._released, key)
        return out


    def _convolution(self, func, args) -> None:
        shape = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else tuple(a) if isinstance(a, (list, tuple))
                      else a for a in args)
        if func is torch.ops.aten.convolution.default:
            self.convolutions.add(("forward", shape))
            return
        mask = args[-1]  # (input, weight, bias) gradients wanted: a backward-data and a backward-weights kernel
        for direction, wanted in zip(("backward-data", "backward-weights"), mask[:2]):
            if wanted:
                self.convolutions.add((direction, shape))


class _FusedAttention(torch.autograd.Function):
    """Scaled-dot-product attention with the memory of the fused kernels: the output and one
    fp32 log-sum-exp per query are created, and q, k, v, output and log-sum-exp are kept."""

    @staticmethod
    def forward(ctx, q, k, v):
        # The fused kernels write the output as (batch, query, head, dim) and hand back a transposed
        # view, so the usual transpose-and-reshape after attention is free (no copy).
        out = q.new_empty(q.shape[:-3] + (q.shape[-2], q.shape[-3], v.shape[-1])).transpose(-2, -3)
        logsumexp = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    if query.device.type != "meta":  # only the planner's meta runs are stood in for
        return _REAL_ATTENTION(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                               scale=scale)
    if _AUTOCAST:  # attention is one of autocast's low-precision ops
        query, key, value = (t.to(_AUTOCAST[-1]) for t in (query, key, value))
    return _FusedAttention.apply(query, key, value)


_REAL_ATTENTION = F.scaled_dot_product_attention


@contextmanager
def attention_as_on_device() -> Iterator[None]:
    """Meta-device attention with the memory of the fused kernels (see the module's docstring)."""
    F.scaled_dot_product_attention = _attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _REAL_ATTENTION


@dataclass(frozen=True)
class Trace:
    peak: int  # bytes alive at most
    after: int  # bytes still alive at the end
    convolutions: frozenset  # distinct convolution kernels used


def traced_peak(work, grad: bool = True) -> Trace:
    """What ``work()`` creates on meta tensors: its peak and what is left, in bytes, and its kernels."""
    with torch.set_grad_enabled(grad), LiveBytes() as live, attention_as_on_device():
        result = work()
        del result
    return Trace(live.peak, live.now, frozenset(live.convolutions))

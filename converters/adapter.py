"""``Adapter``: our in-memory form of a LoRA, the hub every format converts through.

One ``AdapterModule`` per adapted Linear/Conv2d holds its factors under kohya's tensor names
(``lora_down`` = PEFT ``lora_A``, ``lora_up`` = PEFT ``lora_B``) and kohya's ``alpha`` (the
delta is ``up @ down · alpha / rank``):

    PEFT state dict + LoraConfig ─┐                ┌─ kohya safetensors (ComfyUI, A1111, diffusers)
    diffusers LoRA file ──────────┼──► Adapter ◄───┤
    kohya / A1111 LoRA file ──────┘                └─ PEFT state dict + LoraConfig (sampling, training)

(``peft.py``, ``diffusers.py`` and ``kohya.py`` convert; ``files.py`` reads any LoRA file.)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import UserError


class LoraFormatError(UserError):
    """A LoRA file we cannot read, or one that does not fit the base model."""


# The tensors of each algorithm, in the LyCORIS/kohya vocabulary.
LORA_TENSORS = ("lora_down", "lora_up", "dora_scale")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass
class AdapterModule:
    """One adapted layer, in the LyCORIS/kohya vocabulary that ComfyUI and A1111 load:
    LoRA ``lora_down``/``lora_up`` (+ DoRA ``dora_scale``), LoHa ``hada_*``, LoKr ``lokr_*``.
    ``alpha`` follows the loaders' rule: scale = alpha / rank, where a LoKr's rank is the
    inner size of its decomposed factor, and a LoKr without one has no alpha (scale 1)."""

    component: str  # unet | text_encoder | text_encoder_2
    path: str  # module path inside the component (text encoders: without "text_model.")
    tensors: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def algorithm(self) -> str:
        if "lora_down" in self.tensors:
            return "lora"
        return "loha" if "hada_w1_a" in self.tensors else "lokr"

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if "lora_down" in t:
            return t["lora_down"].shape[0]
        if "hada_w1_b" in t:
            return t["hada_w1_b"].shape[0]
        for name in ("lokr_w1_b", "lokr_w2_b"):
            if name in t:
                return t[name].shape[0]
        return None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None and self.rank else 1.0

    @property
    def is_3x3_conv(self) -> bool:
        down = self.tensors.get("lora_down", self.tensors.get("hada_t1", self.tensors.get("lokr_w2")))
        return down is not None and down.ndim == 4 and down.shape[-1] > 1

    def delta(self, weight_shape: tuple[int, ...]) -> torch.Tensor:
        """ΔW as loaders add it to a weight of ``weight_shape`` at strength 1 (not for DoRA,
        whose result also renormalises W)."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.algorithm == "lora":
            down, up = t["lora_down"], t["lora_up"]
            product = up.flatten(1) @ down.flatten(1)
        elif self.algorithm == "loha":
            product = _hada_factor(t, "1") * _hada_factor(t, "2")
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = full_lokr_w2(t)
            if len(weight_shape) == 4 and w2.ndim == 2:  # non-Tucker conv: w2 is [out2, in2·kh·kw]
                w2 = w2.reshape(w2.shape[0], -1, *weight_shape[2:])
            # conv: the kernel stays on w2's side, as LyCORIS and ComfyUI build it
            product = torch.kron(w1[..., None, None], w2) if w2.ndim == 4 else torch.kron(w1, w2)
        return self.scale * product.reshape(weight_shape)


def _hada_factor(t: Mapping[str, torch.Tensor], i: str) -> torch.Tensor:
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    if f"hada_t{i}" in t:  # Tucker conv: a [r, out], b [r, in], t [r, r, kh, kw]
        return torch.einsum("ijkl,jr,ip->prkl", t[f"hada_t{i}"], b, a)
    return a @ b


def full_lokr_w2(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A LoKr's second Kronecker factor as one tensor, whether stored whole, decomposed or Tucker."""
    if "lokr_w2" in t:
        return t["lokr_w2"]
    if "lokr_t2" in t:
        return torch.einsum("ijkl,jr,ip->prkl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    return t["lokr_w2_a"] @ t["lokr_w2_b"]


@dataclass
class Adapter:
    family: str
    modules: dict[tuple[str, str], AdapterModule]
    unet_layout: dict  # layers_per_block, up_block_types: enough to name SDXL modules the LDM way
    metadata: dict[str, str] = field(default_factory=dict)

    def components(self) -> list[str]:
        return sorted({component for component, _ in self.modules})

    def summary(self) -> dict[str, Any]:
        ranks = Counter(m.rank for m in self.modules.values())
        alphas = Counter(m.alpha for m in self.modules.values())
        algorithms = Counter(m.algorithm for m in self.modules.values())
        return {
            "family": self.family,
            "algorithm": "+".join(sorted(algorithms)) or "lora",
            "dora": any("dora_scale" in m.tensors for m in self.modules.values()),
            "modules": dict(Counter(component for component, _ in self.modules)),
            "rank": ranks.most_common(1)[0][0] if ranks else None,
            "ranks": {str(k): v for k, v in ranks.items()},
            "alpha": alphas.most_common(1)[0][0] if alphas else None,
            "alphas": {str(k): v for k, v in alphas.items()},
            "conv_modules": sum(m.is_3x3_conv for m in self.modules.values()),
        }

"""What a training run will hold in memory, predicted before it starts, and the fastest settings
that fit a budget.

    planner = Planner("sdxl.safetensors", settings, device="cuda")
    plan = planner.plan(budget=8 * 2**30)      # every candidate, fastest first, and the choice
    plan.chosen.candidate.changes()            # {"base_precision": "fp8", "gradient_checkpointing": True, ...}

A prediction is the largest of the run's phases, in the order the trainer goes through them:
loading (the weights as loaded; on a CPU also the checkpoint's mapped pages), class images
(when they will be generated: the placed base, one guided UNet forward and a VAE decode), latents
(the VAE encoding the photos) and training (frozen weights at their stored precision, the
adapter with its gradients and optimizer state, one step's activations). Weights come from the
checkpoint's shapes, the adapter from injecting it into the meta-device model, activations and
every temporary from running that model's step on the meta device (``trace``). Nothing here is
fitted to the runs it is checked against; the only measured numbers are three CPU constants taken
on a toy model (``CPU_TOKENIZER``, ``CPU_RUNTIME``, ``CPU_KERNEL``).

``settings`` is anything with the training options as attributes (a ``TrainSettings``): this
package sits below the trainer, which asks it for its run's prediction and for --fit-to-vram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..errors import UserError
from ..models.families import FAMILIES
from ..models.inspect import inspect
from ..models.load import empty_modules
from ..runtime.memory import GIB, gigabytes
from ..runtime.peft import TEXT_TARGETS, UNET_TARGETS, adapter_config
from ..runtime.precision import bytes_per_weight, weight_counts
from .trace import traced_peak

SIZES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
NAME_OF = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Optimizer state per trained parameter (fp32 moments): AdamW keeps two, Prodigy four, 8-bit AdamW
# two bytes. AdamW on a CPU (foreach) also makes two parameter-sized temporaries in its step.
OPTIMIZER_STATE = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}
CPU_OPTIMIZER_SCRATCH = 8
# A CPU run's resident memory beyond its tensors, the same for every base model: one CLIP tokenizer
# (its vocabulary and merges as Python strings); what torch sets up at the first convolution,
# attention, backward pass and AdamW step of a process; and one compiled kernel per distinct
# convolution (oneDNN caches each shape, stride and direction). Measured on a toy model and the
# bundled tokenizer files, not on any model the planner is checked against
# (`bench/planner_calibration.py --runs 3`, 2-core CI machine, torch 2.15, one thread: 13.28 MiB,
# 12.88-12.94 MiB and 0.100 MiB in each of 3 fresh processes).
CPU_TOKENIZER = 13_930_000
CPU_RUNTIME = 13_530_000
CPU_KERNEL = 104_900  # per distinct convolution kernel


@dataclass(frozen=True)
class Candidate:
    """One way to run: how the base is stored, gradient checkpointing, offload."""
    precision: str  # a base_precision value ("auto" = the training precision)
    checkpointing: bool
    offload: bool

    def changes(self) -> dict:
        return {"base_precision": self.precision, "gradient_checkpointing": self.checkpointing,
                "offload": self.offload}

    def label(self, compute: str) -> str:
        parts = [f"base {compute if self.precision == 'auto' else self.precision}"]
        parts += ["checkpointing"] if self.checkpointing else []
        parts += ["offload"] if self.offload else []
        return " + ".join(parts)


def candidates(device: str) -> list[Candidate]:
    """The settings the planner chooses from, fastest first. The order is a stated assumption,
    not a measurement: storing the base in fp8 costs one extra pass over each weight per use (a
    few %); gradient checkpointing recomputes the forward in the backward (about 25-30%);
    offload moves every UNet weight over PCIe in the forward and again in the backward, which
    costs the most (and needs a GPU). With offload, fp8 moves half the bytes of bf16."""
    out = [Candidate(p, c, False) for c in (False, True) for p in ("auto", "fp8")]
    if device == "cuda":
        out += [Candidate(p, c, True) for c in (False, True) for p in ("fp8", "auto")]
    return out


@dataclass
class Prediction:
    candidate: Candidate
    phases: dict[str, dict[str, int]]  # phase → part → bytes
    streamed: int = 0  # bytes offload moves to the GPU per step

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def peak(self) -> int:
        return sum(self.phases[self.peak_phase].values())


@dataclass
class Plan:
    device: str
    compute: str
    budget: int
    predictions: list[Prediction]  # fastest first
    chosen: Prediction | None = None

    def table(self) -> str:
        lines = [f"predicted peak memory on {self.device} (compute in {self.compute}; budget {gigabytes(self.budget)}),"
                 " fastest first:"]
        for index, p in enumerate(self.predictions, 1):
            mark = "→" if p is self.chosen else ("✓" if p.peak <= self.budget else "✗")
            stream = f", offload moves {gigabytes(p.streamed)}/step" if p.streamed else ""
            lines.append(f" {mark} {index}. {p.candidate.label(self.compute):34s} {gigabytes(p.peak):>10s}  "
                         f"(peak in {p.peak_phase}{stream})")
        if self.chosen is None:
            lines.append(f"nothing fits {gigabytes(self.budget)}: lower --resolution or --batch-size, use "
                         "--prior-preservation off or a lower --rank, or give a larger budget.")
        else:
            parts = self.chosen.phases[self.chosen.peak_phase]
            lines.append(f"chosen: {self.chosen.candidate.label(self.compute)}; its {self.chosen.peak_phase} peak: "
                         + ", ".join(f"{k} {gigabytes(v)}" for k, v in parts.items() if v))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"device": self.device, "compute": self.compute, "budget_bytes": self.budget,
                "chosen": None if self.chosen is None else self.chosen.candidate.changes(),
                "candidates": [{**p.candidate.changes(), "peak_bytes": p.peak, "peak_phase": p.peak_phase,
                                "fits": p.peak <= self.budget, "phases": p.phases, "offload_bytes_per_step": p.streamed}
                               for p in self.predictions]}


def compute_dtype(settings, device: str) -> torch.dtype:
    """The dtype the run computes in (the trainer's resolve_mixed_precision): fp32 on a CPU."""
    if device != "cuda" or settings.mixed_precision == "no":
        return torch.float32
    if settings.mixed_precision == "auto":
        # planning for a GPU from a machine without one: assume a card with bf16 (Ampere or newer)
        return torch.bfloat16 if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[settings.mixed_precision]


class Planner:
    """Predictions for one base checkpoint, one set of training options and one device."""

    def __init__(self, base: str, settings, device: str, loads: bool = True, load_dtype: str = "auto",
                 class_images: bool = False):
        """``loads``: the run loads the checkpoint itself (the CLI) rather than being given it
        loaded (ComfyUI); ``load_dtype`` as --dtype; ``class_images``: the run generates class images."""
        self.info = inspect(base)
        self._steps: dict = {}
        self.settings, self.device, self.loads, self.class_images = settings, device, loads, class_images
        self.compute = compute_dtype(settings, device)
        self.load_name = ("fp16" if device == "cuda" else "fp32") if load_dtype == "auto" else load_dtype
        self.load_size = SIZES[self.load_name]

    # --- the model's shapes, read once ---------------------------------------------------------

    @cached_property
    def modules(self):
        info = self.info
        return empty_modules(info.unet_config, info.vae_config, [(t.model_class, t.config) for t in info.text_encoders])

    @cached_property
    def counts(self) -> dict[str, tuple[int, int]]:
        """component → (weights that can be stored narrower, other parameters)."""
        unet, vae, encoders = self.modules
        out = {"unet": weight_counts([unet]), "vae": (0, sum(p.numel() for p in vae.parameters()))}
        for spec, encoder in zip(self.info.text_encoders, encoders):
            out[spec.name] = weight_counts([encoder])
        return out

    @cached_property
    def largest_layer(self) -> int:
        """Weights in the largest Linear/Conv2d of the UNet (offload holds one at a time on the GPU)."""
        unet = self.modules[0]
        return max(m.weight.numel() for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))

    @property
    def text_trained(self) -> bool:
        return self.settings.train_text_encoder or self.settings.new_tokens > 0

    @cached_property
    def adapter_params(self) -> int:
        """Trained parameters: the adapters injected into the meta model as the trainer injects them,
        plus the new token rows."""
        from peft import inject_adapter_in_model

        s = self.settings
        unet, _, encoders = empty_modules(self.info.unet_config, None,
                                          [(t.model_class, t.config) for t in self.info.text_encoders])
        total = 0
        config = lambda targets: adapter_config(s.adapter, s.rank, s.alpha, s.dropout, targets)  # noqa: E731
        if s.train_unet:
            inject_adapter_in_model(config(UNET_TARGETS[s.unet_targets]), unet)
            total += sum(p.numel() for n, p in unet.named_parameters() if _adapter(n))
        for encoder in encoders:
            if s.train_text_encoder:
                inject_adapter_in_model(config(TEXT_TARGETS), encoder)
                total += sum(p.numel() for n, p in encoder.named_parameters() if _adapter(n))
            total += s.new_tokens * encoder.config.hidden_size
        return total

    # --- activations, from the meta-device trace ------------------------------------------------

    def step(self, checkpointing: bool):
        """The trace of one training step: activations, temporaries, gradients (traced once)."""
        from .steps import traced_step

        if checkpointing not in self._steps:
            self._steps[checkpointing] = traced_step(self, checkpointing)
        return self._steps[checkpointing]

    @cached_property
    def vae_encode(self):
        from .steps import traced_vae_encode

        return traced_vae_encode(self)

    @cached_property
    def generation(self):
        from .steps import traced_generation

        return traced_generation(self)

    def cpu_runtime(self, *traces) -> int:
        """Non-tensor CPU memory once these computations have run: torch's set-up, and one compiled
        kernel per distinct convolution (shape, stride, direction) among them."""
        kernels = frozenset().union(*(t.convolutions for t in traces))
        return CPU_RUNTIME + CPU_KERNEL * len(kernels)

    # --- the prediction ------------------------------------------------------------------------

    def frozen(self, component: str, precision: str, offload: bool = False) -> int:
        """Bytes of a frozen UNet or text encoder on the device."""
        storable, other = self.counts[component]
        compute = self.compute.itemsize
        stored = compute if precision == "auto" else bytes_per_weight(precision)
        if offload:  # the stored weights wait in CPU memory; one layer's comes over at a time
            return other * compute + self.largest_layer * (stored + compute)
        extra = 0 if stored == compute else self.largest_layer * compute  # one layer dequantized for its op
        return storable * stored + other * compute + extra

    def predict(self, candidate: Candidate) -> Prediction:
        s, cuda = self.settings, self.device == "cuda"
        offload = candidate.offload and cuda
        encoders = [t.name for t in self.info.text_encoders]
        vae_params = self.counts["vae"][1]
        vae_every_step = not s.cache_latents or s.crop == "random"
        vae_size = 2 if vae_every_step and self.compute == torch.bfloat16 else 4
        unet = self.frozen("unet", candidate.precision, offload)
        text = sum(self.frozen(name, candidate.precision) for name in encoders)
        vae = vae_params * vae_size
        adapter = self.adapter_params * 4
        state = self.adapter_params * (OPTIMIZER_STATE[s.optimizer] + (0 if cuda else CPU_OPTIMIZER_SCRATCH))
        # CPU memory that is not tensors (see CPU_TOKENIZER): tokenizers come with loading, the
        # runtime's set-up with the first computation (the latents' VAE encode).
        tokenizers = 0 if cuda or not self.loads else CPU_TOKENIZER * len(encoders)
        step = self.step(candidate.checkpointing)
        runtime = (lambda *traces: 0) if cuda else self.cpu_runtime  # noqa: E731
        phases: dict[str, dict[str, int]] = {}
        if self.loads:
            every = sum(sum(self.counts[c]) for c in self.counts)
            # safetensors maps the file; tensors read in the file's own dtype are its pages (counted
            # once), converted ones are copies beside the pages until loading ends.
            mapped = 0 if cuda or self.info.file_dtype == self.load_name else self.info.size_bytes
            phases["loading"] = {"weights as loaded": every * self.load_size, "checkpoint file (mapped)": mapped,
                                 "tokenizers": tokenizers}
        placed = {"UNet": unet, "text encoders": text, "VAE": vae, "tokenizers": tokenizers}
        before = [self.generation] if self.class_images else []
        if self.class_images:
            phases["class images"] = {**placed, "runtime": runtime(*before), "generation": self.generation.peak}
        if not vae_every_step:  # latent caching: every image through the VAE once, before the loop
            before.append(self.vae_encode)
            phases["latents"] = {**placed, "runtime": runtime(*before), "adapter": adapter,
                                 "VAE encode": self.vae_encode.peak}
        # On a GPU the trainer moves what the loop no longer needs to CPU memory (trainer.model.offload_frozen).
        keep_text = not cuda or self.text_trained
        keep_vae = not cuda or vae_every_step
        phases["training"] = {"UNet": unet, "text encoders": text if keep_text else 0, "VAE": vae if keep_vae else 0,
                              "tokenizers": tokenizers, "runtime": runtime(*before, step),
                              "adapter + optimizer": adapter + state, "step (activations, gradients)": step.peak}
        streamed = 0
        if offload:
            storable = self.counts["unet"][0]
            stored = self.compute.itemsize if candidate.precision == "auto" else bytes_per_weight(candidate.precision)
            streamed = storable * stored * (3 if candidate.checkpointing else 2)  # forward, (recompute,) backward
        return Prediction(candidate, phases, streamed)

    def plan(self, budget: int) -> Plan:
        predictions = [self.predict(c) for c in candidates(self.device)]
        chosen = next((p for p in predictions if p.peak <= budget), None)
        return Plan(self.device, NAME_OF[self.compute], budget, predictions, chosen)

    def predict_settings(self) -> Prediction:
        """The prediction for the settings as they are (what the run will do)."""
        s = self.settings
        return self.predict(Candidate(s.base_precision, s.gradient_checkpointing, s.offload))


def _adapter(name: str) -> bool:
    return any(part in name for part in ("lora_", "hada_", "lokr_"))


def fit(settings, base: str, device: str, loads: bool = True, class_images: bool = False):
    """``settings`` with the fastest candidate whose prediction fits ``settings.fit_to_vram`` GiB
    (unchanged when it is 0). Raises UserError, naming the smallest prediction, when none fits."""
    if not settings.fit_to_vram:
        return settings, None
    planner = Planner(base, settings, device, loads=loads, class_images=class_images)
    plan = planner.plan(math.floor(settings.fit_to_vram * GIB))
    if plan.chosen is None:
        smallest = min(plan.predictions, key=lambda p: p.peak)
        raise UserError(f"--fit-to-vram (fit_to_vram) {settings.fit_to_vram:g}: nothing fits; the smallest prediction is "
                        f"{gigabytes(smallest.peak)} ({smallest.candidate.label(plan.compute)}); lower --resolution or "
                        "--batch-size, turn prior preservation off, or give more memory.")
    return settings.replace(**plan.chosen.candidate.changes()), plan

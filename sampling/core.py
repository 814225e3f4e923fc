"""Text-to-image sampling with any number of LoRA files, each at its own UNet and text-encoder
scale, and the comparison grids built from it.

    session = SamplingSession(load_base_model("model.safetensors"), "model.safetensors")
    result = session.sample(SampleSettings(prompt="a photo of sks dog", seed=1,
                                           loras=[LoraChoice("sks.safetensors", 1.0, 0.5)]))

LoRAs are applied the way ComfyUI's LoraLoader and A1111 apply them: each layer's weight becomes
W₀ + Σ strength·ΔW (DoRA: W₀ + strength·(DoRA(W₀ + ΔW) − W₀)), computed in fp32 from a saved
copy of W₀. Changing a scale re-patches only the touched layers, never reloads the model, and
never drifts: the weights are always recomputed from W₀. Every image records its settings as
A1111-style ``parameters`` text in its PNG, from which ``settings_from_parameters`` re-creates
it bit for bit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import UserError

# our name → (diffusers scheduler class, its extra settings, A1111's name)
SAMPLERS = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
}
CHUNK = 75  # prompt tokens per 77-token window (BOS + 75 + EOS), as A1111 and ComfyUI chunk


def make_scheduler(name: str, noise_scheduler):
    import diffusers

    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; one of {', '.join(SAMPLERS)}.")
    class_name, extra, _ = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(noise_scheduler.config, **extra)


# --- LoRA choices and patching ------------------------------------------------------


@dataclass(frozen=True)
class LoraChoice:
    path: str
    unet_scale: float = 1.0
    te_scale: float = 1.0

    @property
    def name(self) -> str:
        """How prompts and PNG metadata name it: the file's stem, or for a training checkpoint
        (``x.state/step-000100/lora.safetensors``) ``x-step-000100``."""
        path = Path(self.path)
        if path.name == "lora.safetensors" and path.parent.name.startswith("step-"):
            return f"{path.parent.parent.name.removesuffix('.state')}-{path.parent.name}"
        return path.stem


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_lora(text: str) -> LoraChoice:
    """``FILE``, ``FILE:S`` (UNet and text encoder both at S) or ``FILE:UNET:TE``."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2 and _number(parts[-1]) is not None:
        numbers.insert(0, float(parts.pop()))
    path = ":".join(parts)
    if not path:
        raise UserError(f"--lora {text!r}: give a file, optionally with scales: FILE[:UNET_SCALE[:TE_SCALE]].")
    if not numbers:
        return LoraChoice(path)
    return LoraChoice(path, numbers[0], numbers[1] if len(numbers) > 1 else numbers[0])


def patched_weight(original: torch.Tensor, patches: Sequence[tuple[Any, float]]) -> torch.Tensor:
    """W₀ with each (converters.AdapterModule, strength) applied in order, in fp32."""
    weight = original.float()
    for module, strength in patches:
        delta = module.delta(tuple(weight.shape)).to(weight.device)
        if "dora_scale" in module.tensors:
            # DoRA as LyCORIS defines it: the direction of W + ΔW at the learned per-output
            # magnitude. (ComfyUI 0.3.75 divides by ‖W‖ instead, 4 % off: converters README.)
            combined = weight + delta
            norm = combined.reshape(combined.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (combined.ndim - 1))
            magnitude = module.tensors["dora_scale"].float().to(weight.device).reshape(norm.shape)
            weight = weight + strength * (magnitude * combined / norm - weight)
        else:
            weight = weight + strength * delta
    return weight


class LoraPatcher:
    """Puts LoRA files onto a loaded base model at given (UNet, text-encoder) strengths."""

    def __init__(self, base):
        from ..converters.core import COMPONENTS, structure_of_base
        from ..converters.keys import canonical_path

        self.base = base
        self.structure = structure_of_base(base)
        self.layers: dict[tuple[str, str], torch.nn.Module] = {}
        for component, module in zip(COMPONENTS[base.family], [base.unet, *base.text_encoders]):
            for path, child in module.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    self.layers[(component, canonical_path(component, path))] = child
        self.adapters: dict[str, Any] = {}  # resolved path → converters.Adapter
        self.originals: dict[tuple[str, str], torch.Tensor] = {}  # W₀ of every layer ever patched (CPU)
        self.applied: tuple = ()

    def adapter(self, path: str):
        from ..converters.core import load_adapter

        key = str(Path(path).expanduser().resolve())
        if key not in self.adapters:
            if not Path(key).is_file():
                raise UserError(f"{path}: no such LoRA file.")
            self.adapters[key] = load_adapter(key, self.structure)
        return self.adapters[key]

    def apply(self, loras: Sequence[LoraChoice]) -> None:
        wanted = tuple((str(Path(c.path).expanduser().resolve()), c.unet_scale, c.te_scale) for c in loras)
        if wanted == self.applied:
            return
        per_layer: dict[tuple[str, str], list] = {}
        for choice in loras:
            for key, module in self.adapter(choice.path).modules.items():
                strength = choice.unet_scale if key[0] == "unet" else choice.te_scale
                if strength != 0:
                    per_layer.setdefault(key, []).append((module, strength))
        with torch.no_grad():
            for key in set(self.originals) | set(per_layer):
                weight = self.layers[key].weight
                original = self.originals.setdefault(key, weight.detach().to("cpu", copy=True))
                patches = per_layer.get(key)
                target = patched_weight(original.to(weight.device), patches) if patches else original
                weight.copy_(target.to(weight.dtype))
        self.applied = wanted


# --- prompts ------------------------------------------------------------------------


def chunk_ids(tokenizer, text: str, chunks: int | None = None) -> torch.Tensor:
    """[chunks, 77] token ids: the prompt cut into windows of 75 tokens, each wrapped in BOS/EOS
    and padded (A1111/ComfyUI behaviour; a prompt of up to 75 tokens gives exactly the usual
    single window). ``chunks`` pads with empty windows (a negative prompt matching a long one)."""
    tokens = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    count = max(1, math.ceil(len(tokens) / CHUNK), chunks or 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for i in range(count):
        part = tokens[i * CHUNK:(i + 1) * CHUNK]
        rows.append([tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [pad] * (CHUNK - len(part)))
    return torch.tensor(rows)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


@torch.no_grad()
def encode_prompt(base, text: str, chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [1, 77·chunks, dim], SDXL pooled embedding [1, dim] or None), as the
    family's pipeline builds them per window; SDXL's pooled embedding is the first window's."""
    from ..trainer.core import encode_ids

    ids = [chunk_ids(tokenizer, text, chunks).to(next(encoder.parameters()).device)
           for tokenizer, encoder in zip(base.tokenizers, base.text_encoders)]
    hidden, pooled = encode_ids(base.family, base.text_encoders, ids)  # one row per window
    device = next(base.unet.parameters()).device
    embeds = hidden.reshape(1, -1, hidden.shape[-1]).to(device)  # the windows one after another
    return embeds, None if pooled is None else pooled[:1].to(device)


# --- settings and their PNG record ----------------------------------------------------


@dataclass
class SampleSettings:
    prompt: str = "a photo of sks dog"
    negative: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    width: int = 0  # 0 = the model's native size
    height: int = 0
    sampler: str = "euler_a"
    batch: int = 1
    loras: list[LoraChoice] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)  # embedding files (textual inversion) the prompts may use

    @classmethod
    def from_options(cls, values: dict, loras: Iterable[LoraChoice] = (), embeddings: Iterable[str] = ()) -> "SampleSettings":
        return cls(**{k: values[k] for k in ("prompt", "negative", "seed", "steps", "guidance", "width", "height",
                                             "sampler", "batch")}, loras=list(loras), embeddings=list(embeddings))


def parameters_text(settings: SampleSettings, seed: int, width: int, height: int, model_name: str,
                    model_hash: str, lora_hashes: dict[str, str], ti_hashes: dict[str, str] | None = None,
                    prompt: str | None = None, negative: str | None = None) -> str:
    """A1111's ``parameters`` text for one image. LoRAs are prompt tags in A1111's named form
    ``<lora:NAME:te=T:unet=U>`` (A1111's positional form is te first, then unet); embeddings are
    named by their bare name in the prompt (A1111's syntax) and listed in ``TI hashes``."""
    tags = "".join(f" <lora:{c.name}:te={c.te_scale:g}:unet={c.unet_scale:g}>" for c in settings.loras)
    lines = [(settings.prompt if prompt is None else prompt) + tags]
    negative = settings.negative if negative is None else negative
    if negative:
        lines.append(f"Negative prompt: {negative}")
    fields = [("Steps", settings.steps), ("Sampler", SAMPLERS[settings.sampler][2]), ("CFG scale", f"{settings.guidance:g}"),
              ("Seed", seed), ("Size", f"{width}x{height}"), ("Model hash", model_hash), ("Model", model_name)]
    if lora_hashes:
        fields.append(("Lora hashes", '"' + ", ".join(f"{n}: {h}" for n, h in lora_hashes.items()) + '"'))
    if ti_hashes:
        fields.append(("TI hashes", '"' + ", ".join(f"{n}: {h}" for n, h in ti_hashes.items()) + '"'))
    fields.append(("Generator", "ComfyUI-DreamBooth-LoRA"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


_PARAM = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LORA_TAG = re.compile(r"\s*<lora:([^:>]+)((?::[^:>]+)*)>")


def read_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 ``parameters`` text: prompt (LoRA tags removed), negative, loras, fields."""
    lines = text.strip().split("\n")
    fields = {}
    if lines and _PARAM.findall(lines[-1]) and lines[-1].lstrip().startswith("Steps:"):
        fields = {k.strip(): v.strip().strip('"') for k, v in _PARAM.findall(lines.pop())}
    prompt_lines, negative_lines, target = [], [], None
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if target is negative_lines else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines)
    loras = []
    for name, rest in _LORA_TAG.findall(prompt):
        values = [p for p in rest.split(":") if p]
        named = dict(p.split("=", 1) for p in values if "=" in p)
        positional = [float(p) for p in values if "=" not in p]
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        loras.append((name, unet, te))
    return {"prompt": _LORA_TAG.sub("", prompt).strip(), "negative": "\n".join(negative_lines), "loras": loras,
            "fields": fields}


def settings_from_parameters(text: str, lora_dirs: Sequence[str | Path] = (),
                             embedding_dirs: Sequence[str | Path] = ()) -> SampleSettings:
    """The settings that made an image, from its ``parameters`` text. LoRA tags are found as
    NAME.safetensors in ``lora_dirs`` or, by their recorded hash, anywhere below them; the
    embeddings of ``TI hashes`` the same way in ``embedding_dirs`` (and ``lora_dirs``)."""
    from ..priors.core import model_fingerprint

    parsed = read_parameters(text)
    fields = parsed["fields"]
    names = {a1111: ours for ours, (_, _, a1111) in SAMPLERS.items()}
    try:
        width, height = (int(v) for v in fields["Size"].split("x"))
        settings = SampleSettings(prompt=parsed["prompt"], negative=parsed["negative"], seed=int(fields["Seed"]),
                                  steps=int(fields["Steps"]), guidance=float(fields["CFG scale"]), width=width,
                                  height=height, sampler=names[fields["Sampler"]], batch=1)
    except (KeyError, ValueError) as err:
        raise UserError(f"the image's parameters lack or garble {err}; it was not made by an A1111-style sampler.") from None
    hashes = dict(item.split(": ", 1) for item in fields.get("Lora hashes", "").split(", ") if ": " in item)
    candidates = [p for d in lora_dirs for p in sorted(Path(d).expanduser().rglob("*.safetensors"))]
    for name, unet, te in parsed["loras"]:
        found = [p for d in lora_dirs if (p := Path(d).expanduser() / f"{name}.safetensors").is_file()]
        if not found and name in hashes:
            found = [p for p in candidates if model_fingerprint(p)[:12] == hashes[name]]
        if not found:
            where = ", ".join(str(d) for d in lora_dirs) or "nowhere (pass --lora-dir)"
            raise UserError(f"LoRA {name!r} of the image is not in {where}; pass the folder that holds it.")
        settings.loras.append(LoraChoice(str(found[0]), unet, te))
    ti_hashes = dict(item.split(": ", 1) for item in fields.get("TI hashes", "").split(", ") if ": " in item)
    dirs = [*embedding_dirs, *lora_dirs]
    for name, digest in ti_hashes.items():
        found = [p for d in dirs if (p := Path(d).expanduser() / f"{name}.safetensors").is_file()]
        if not found:
            found = [p for d in dirs for p in sorted(Path(d).expanduser().rglob("*.safetensors"))
                     if model_fingerprint(p)[:12] == digest]
        if not found:
            where = ", ".join(str(d) for d in dirs) or "nowhere (pass --embedding-dir)"
            raise UserError(f"embedding {name!r} of the image is not in {where}; pass the folder that holds it.")
        settings.embeddings.append(str(found[0]))
    return settings


# --- the session ---------------------------------------------------------------------


@dataclass
class Sample:
    image: Any  # PIL.Image
    pixels: np.ndarray  # float32 [H, W, 3] in [0, 1] (ComfyUI's IMAGE row)
    seed: int
    parameters: str


class SamplingSession:
    """A loaded base model plus the LoRAs put on it; samples any settings without reloading."""

    def __init__(self, base, model_path: str | Path | None = None):
        from ..priors.core import model_fingerprint

        self.base = base
        self.model_name = Path(model_path).stem if model_path else "model"
        self.model_hash = model_fingerprint(model_path)[:12] if model_path and Path(model_path).exists() else "unknown"
        self.patcher = LoraPatcher(base)
        self.pipelines: dict[str, Any] = {}
        self._lora_hashes: dict[str, str] = {}
        self.embeddings: dict[str, Any] = {}  # name → (converters.embeddings.Embedding, its internal token text)
        self._embedding_files: dict[str, str] = {}  # resolved path → name

    # --- embeddings (textual inversion / pivotal tuning) -------------------------------

    def load_embedding(self, path: str | Path, name: str | None = None):
        """Make an embedding file usable in prompts as ``embedding:NAME`` (ComfyUI), ``NAME``
        (A1111) or the tokens it was trained as (``<s1><s2>``): its vectors become tokens of
        their own in each tokenizer and text encoder (nothing else changes)."""
        from ..converters.embeddings import read_embedding
        from ..trainer.tokens import add_tokens

        key = str(Path(path).expanduser().resolve())
        stamp = (Path(key).stat().st_mtime_ns, Path(key).stat().st_size) if Path(key).is_file() else None
        if key in self._embedding_files and self._embedding_files[key][1] == stamp:
            return self.embeddings[self._embedding_files[key][0]][0]  # unchanged since it was loaded
        dims = [e.get_input_embeddings().embedding_dim for e in self.base.text_encoders]
        embedding = read_embedding(key, self.base.family, dims, name)
        owner = next((k for k, (n, _) in self._embedding_files.items() if n == embedding.name), key)
        if owner != key:
            raise UserError(f"{path}: another embedding called {embedding.name!r} is loaded ({owner}); rename one "
                            "of the files.")
        internal = [f"<emb:{embedding.name}:{i}>" for i in range(embedding.count)]
        for tokenizer, encoder, vectors in zip(self.base.tokenizers, self.base.text_encoders, embedding.vectors):
            add_tokens(tokenizer, encoder, internal, vectors)  # a changed file (retrained) replaces the rows
        self.embeddings[embedding.name] = (embedding, "".join(internal))
        self._embedding_files[key] = (embedding.name, stamp)
        return embedding

    def expand_prompt(self, text: str) -> str:
        """The prompt with every loaded embedding's references replaced by its tokens."""
        trained = {}
        for name, (embedding, _) in self.embeddings.items():
            if embedding.tokens:
                trained.setdefault(embedding.tokens, []).append(name)
        for name in sorted(self.embeddings, key=len, reverse=True):
            embedding, internal = self.embeddings[name]
            text = re.sub(rf"embedding:{re.escape(name)}(\.safetensors|\.pt)?(?![\w.-])", lambda _: internal, text)
            if embedding.tokens and len(trained[embedding.tokens]) == 1:
                text = text.replace(embedding.tokens, internal)
            text = re.sub(rf"(?<![\w:<.-]){re.escape(name)}(?![\w>.-])", lambda _: internal, text)
        return text

    def a1111_prompt(self, text: str) -> str:
        """The prompt as A1111 writes it: every embedding by its bare name."""
        text = self.expand_prompt(text)
        for name, (_, internal) in self.embeddings.items():
            text = text.replace(internal, name)
        return text

    def encode(self, text: str, chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``encode_prompt`` with the loaded embeddings resolved."""
        return encode_prompt(self.base, self.expand_prompt(text), chunks)

    def pipeline(self, sampler: str):
        from ..priors.core import make_pipeline

        if sampler not in self.pipelines:
            self.pipelines[sampler] = make_pipeline(self.base, sampler)
        return self.pipelines[sampler]

    def lora_hash(self, path: str) -> str:
        from ..priors.core import model_fingerprint

        key = str(Path(path).expanduser().resolve())
        if key not in self._lora_hashes:
            self._lora_hashes[key] = model_fingerprint(key)[:12]
        return self._lora_hashes[key]

    def sample(self, settings: SampleSettings, on_step: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> list[Sample]:
        if settings.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {settings.sampler!r}; one of {', '.join(SAMPLERS)}.")
        native = self.base.info.resolution
        width, height = settings.width or native, settings.height or native
        if width % 8 or height % 8:
            raise UserError(f"width and height must be multiples of 8 (got {width}×{height}).")
        self.patcher.apply(settings.loras)
        for path in settings.embeddings:
            self.load_embedding(path)
        pipe = self.pipeline(settings.sampler)
        prompt_text, negative_text = self.expand_prompt(settings.prompt), self.expand_prompt(settings.negative)
        prompt_tokens = token_count(self.base.tokenizers[0], prompt_text)
        negative_tokens = token_count(self.base.tokenizers[0], negative_text)
        chunks = max(1, math.ceil(prompt_tokens / CHUNK), math.ceil(negative_tokens / CHUNK))
        positive, pooled = encode_prompt(self.base, prompt_text, chunks)
        negative, negative_pooled = encode_prompt(self.base, negative_text, chunks)
        count = settings.batch
        kwargs = {"prompt_embeds": positive.repeat(count, 1, 1), "negative_prompt_embeds": negative.repeat(count, 1, 1)}
        if self.base.family == "sdxl":
            kwargs.update(pooled_prompt_embeds=pooled.repeat(count, 1),
                          negative_pooled_prompt_embeds=negative_pooled.repeat(count, 1))
        callback = None
        if on_step is not None or should_stop is not None:
            def callback(pipeline, step, timestep, callback_kwargs):
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                if on_step is not None:
                    on_step(step + 1, settings.steps)
                return callback_kwargs
        seeds = [settings.seed + i for i in range(count)]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        with torch.inference_mode():
            pixels = pipe(**kwargs, num_inference_steps=settings.steps, guidance_scale=settings.guidance, width=width,
                          height=height, generator=generators, output_type="np", callback_on_step_end=callback).images
        from PIL import Image

        hashes = {c.name: self.lora_hash(c.path) for c in settings.loras}
        used = {name for name, (_, internal) in self.embeddings.items() if internal in prompt_text + negative_text}
        ti_hashes = {name: self.lora_hash(path) for path, (name, _) in self._embedding_files.items() if name in used}
        out = []
        for seed, row in zip(seeds, pixels):
            image = Image.fromarray((row * 255).round().astype(np.uint8))
            text = parameters_text(settings, seed, width, height, self.model_name, self.model_hash, hashes, ti_hashes,
                                   self.a1111_prompt(settings.prompt), self.a1111_prompt(settings.negative))
            out.append(Sample(image, row.astype(np.float32), seed, text))
        return out


def save_sample(sample: Sample, path: Path) -> Path:
    """The PNG with its ``parameters`` text, written atomically."""
    from ..priors.core import write_png

    return write_png(sample.image, path, sample.parameters)


def png_parameters(path: str | Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except OSError as err:
        raise UserError(f"{path}: not a readable image ({err}).") from None
    if not text:
        raise UserError(f"{path}: has no 'parameters' text; only images made by this sampler or A1111 can be re-made.")
    return text


# --- grids ---------------------------------------------------------------------------


def parse_axis(text: str) -> tuple[str, list[str]]:
    """'unet-scale=0,0.5,1' → ('unet-scale', ['0', '0.5', '1']); prompts are separated by '|'."""
    from .options import GRID_AXES

    name, _, values = text.partition("=")
    name = name.strip()
    if name not in GRID_AXES or not values:
        raise UserError(f"axis {text!r}: write NAME=V1,V2,... with NAME one of {', '.join(GRID_AXES)} "
                        "(prompt values are separated by '|').")
    parts = values.split("|") if name == "prompt" else values.split(",")
    return name, [p.strip() for p in parts if p.strip()]


def step_lora(source: str, step: int) -> str:
    """The LoRA of training step ``step``: ``source`` is the final LoRA file or its state folder."""
    from ..trainer.checkpoint import step_dir_name

    path = Path(source).expanduser()
    state = path if path.is_dir() else path.with_name(path.stem + ".state")
    candidate = state / step_dir_name(step) / "lora.safetensors"
    if not candidate.is_file():
        raise UserError(f"{state}: has no checkpoint for step {step} ({candidate} is missing).")
    return str(candidate)


def with_axis(settings: SampleSettings, name: str, value: str) -> SampleSettings:
    number = _number(value)
    if name in ("unet-scale", "te-scale", "guidance", "seed", "steps", "step") and number is None:
        raise UserError(f"axis {name}: {value!r} is not a number.")
    if name in ("unet-scale", "te-scale") and not settings.loras:
        raise UserError(f"axis {name} needs a --lora.")
    if name == "unet-scale":
        return replace(settings, loras=[replace(c, unet_scale=number) for c in settings.loras])
    if name == "te-scale":
        return replace(settings, loras=[replace(c, te_scale=number) for c in settings.loras])
    if name == "guidance":
        return replace(settings, guidance=number)
    if name in ("seed", "steps"):
        return replace(settings, **{name: int(number)})
    if name == "prompt":
        return replace(settings, prompt=value)
    first = settings.loras[0] if settings.loras else LoraChoice("")
    if name == "lora":
        return replace(settings, loras=[replace(first, path=value)] + settings.loras[1:])
    if not settings.loras:
        raise UserError("axis step needs --lora (the final LoRA file or its .state folder).")
    return replace(settings, loras=[replace(first, path=step_lora(first.path, int(number)))] + settings.loras[1:])


def axis_label(name: str, value: str) -> str:
    if name == "lora":
        return Path(value).stem
    return f"{name} {value}"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def render_grid(cells: list[list[Any]], x_labels: list[str], y_labels: list[str], title: str = ""):
    """Images in rows × columns with the x values above and the y values to the left."""
    from PIL import Image, ImageDraw

    width, height = cells[0][0].size
    size = max(14, min(40, width // 14))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(min(max(probe.textlength(l, font=font) for l in y_labels) + size, width * 0.8))
    top_lines = max(len(_wrap(probe, l, font, width - 8)) for l in x_labels)
    title_lines = _wrap(probe, title, font, left + width * len(x_labels) - 8) if title else []
    line = int(size * 1.25)
    top = (top_lines + len(title_lines)) * line + size // 2
    grid = Image.new("RGB", (left + width * len(x_labels), top + height * len(y_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(title_lines):
        draw.text((4, 2 + i * line), text, fill="black", font=font)
    for column, label in enumerate(x_labels):
        for i, text in enumerate(_wrap(draw, label, font, width - 8)):
            draw.text((left + column * width + width / 2, (len(title_lines) + i) * line + 4), text, fill="black",
                      font=font, anchor="ma")
    for row, label in enumerate(y_labels):
        for i, text in enumerate(_wrap(draw, label, font, left - 8)):
            draw.text((4, top + row * height + height / 2 + (i - 0.5) * line), text, fill="black", font=font)
        for column, image in enumerate(cells[row]):
            grid.paste(image, (left + column * width, top + row * height))
    return grid


@dataclass
class GridResult:
    path: Path
    cells: list[list[Path]]  # [row][column] PNG with parameters


def make_grid(session: SamplingSession, settings: SampleSettings, x_axis: tuple[str, list[str]],
              y_axis: tuple[str, list[str]], out: str | Path, overwrite: bool = False,
              on_cell: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> GridResult:
    """Sample every (y, x) combination (batch 1), save each cell's PNG in ``<out stem>_cells/``
    and the labelled grid at ``out``."""
    from io import BytesIO

    from ..priors.core import _write_atomically

    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the grid is written as a .png file.")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; choose another --out or pass --overwrite.")
    (x_name, x_values), (y_name, y_values) = x_axis, y_axis
    if x_name == y_name:
        raise UserError(f"both axes are {x_name}; choose two different ones.")
    folder = out.with_name(out.stem + "_cells")
    images, paths = [], []
    total = len(x_values) * len(y_values)
    for row, y_value in enumerate(y_values):
        images.append([])
        paths.append([])
        for column, x_value in enumerate(x_values):
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            cell = with_axis(with_axis(replace(settings, batch=1), y_name, y_value), x_name, x_value)
            sample = session.sample(cell)[0]
            paths[-1].append(save_sample(sample, folder / f"r{row}_c{column}.png"))
            images[-1].append(sample.image)
            if on_cell is not None:
                on_cell(row * len(x_values) + column + 1, total)
    title = settings.prompt if "prompt" not in (x_name, y_name) else ""
    grid = render_grid(images, [axis_label(x_name, v) for v in x_values], [axis_label(y_name, v) for v in y_values],
                       title)
    buffer = BytesIO()
    grid.save(buffer, format="PNG")
    _write_atomically(out, buffer.getvalue())
    return GridResult(out, paths)

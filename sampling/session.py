"""A loaded base model with LoRAs and embeddings on it, sampling any settings without reloading.

    session = SamplingSession(load_base_model("model.safetensors"), "model.safetensors")
    [sample] = session.sample(SampleSettings(prompt="a photo of sks dog", seed=1,
                                             loras=[LoraChoice("sks.safetensors", 1.0, 0.5)]))

Every image records its settings as A1111-style ``parameters`` text, from which
``settings_from_parameters`` re-creates it bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..converters.embeddings import read_embedding
from ..errors import UserError
from ..runtime.files import file_stamp, fingerprint, write_png
from ..runtime.parameters import HASH_LENGTH
from ..runtime.pipeline import Conditioning, check_sampler, generate, make_pipeline, to_image
from ..runtime.text import encode_base_prompt, windows_for
from ..runtime.tokens import add_tokens
from .patch import LoraPatcher
from .settings import SampleSettings, parameters_text


@dataclass
class Sample:
    image: Any  # PIL.Image
    pixels: np.ndarray  # float32 [H, W, 3] in [0, 1] (ComfyUI's IMAGE row)
    seed: int
    parameters: str


class SamplingSession:
    """A loaded base model plus the LoRAs put on it; samples any settings without reloading."""

    def __init__(self, base, model_path: str | Path | None = None):
        self.base = base
        self.model_name = Path(model_path).stem if model_path else "model"
        self.model_hash = fingerprint(model_path)[:HASH_LENGTH] if model_path and Path(model_path).exists() else "unknown"
        self.patcher = LoraPatcher(base)
        self.pipelines: dict[str, Any] = {}
        self._lora_hashes: dict[str, tuple] = {}  # resolved path → (its file_stamp, short hash)
        self.embeddings: dict[str, Any] = {}  # name → (converters.embeddings.Embedding, its internal token text)
        self._embedding_files: dict[str, str] = {}  # resolved path → name

    # --- embeddings (textual inversion / pivotal tuning) -------------------------------

    def load_embedding(self, path: str | Path, name: str | None = None):
        """Make an embedding file usable in prompts as ``embedding:NAME`` (ComfyUI), ``NAME``
        (A1111) or the tokens it was trained as (``<s1><s2>``): its vectors become tokens of
        their own in each tokenizer and text encoder (nothing else changes)."""
        key = str(Path(path).expanduser().resolve())
        stamp = file_stamp(key)
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
        """``runtime.text.encode_prompt`` with the loaded embeddings resolved."""
        return encode_base_prompt(self.base, self.expand_prompt(text), chunks)

    def pipeline(self, sampler: str):
        if sampler not in self.pipelines:
            self.pipelines[sampler] = make_pipeline(self.base, sampler)
        return self.pipelines[sampler]

    def lora_hash(self, path: str) -> str:
        key = str(Path(path).expanduser().resolve())
        stamp = file_stamp(key)
        if key not in self._lora_hashes or self._lora_hashes[key][0] != stamp:
            self._lora_hashes[key] = (stamp, fingerprint(key)[:HASH_LENGTH])
        return self._lora_hashes[key][1]

    def without_loras(self):
        """The loaded base model with every LoRA taken off (its own weights, for class priors)."""
        self.patcher.apply([])
        return self.base

    def sample(self, settings: SampleSettings, on_step: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None, together: bool = False) -> list[Sample]:
        """``settings.batch`` images, image i from seed + i and exactly the image that seed makes
        alone (``runtime.pipeline.generate``; ``together``: in one denoising loop, faster, equal up
        to rounding — for measuring). ``on_step(done, total)`` counts sampler steps."""
        check_sampler(settings.sampler)
        native = self.base.info.resolution
        width, height = settings.width or native, settings.height or native
        self.patcher.apply(settings.loras)
        for path in settings.embeddings:
            self.load_embedding(path)
        prompt_text, negative_text = self.expand_prompt(settings.prompt), self.expand_prompt(settings.negative)
        chunks = windows_for(self.base.tokenizers[0], prompt_text, negative_text)
        positive, pooled = encode_base_prompt(self.base, prompt_text, chunks)
        negative, negative_pooled = encode_base_prompt(self.base, negative_text, chunks)
        seeds = [settings.seed + i for i in range(settings.batch)]
        pixels = generate(self.pipeline(settings.sampler), Conditioning(positive, negative, pooled, negative_pooled),
                          seeds, settings.steps, settings.guidance, width, height, on_step, should_stop, together)
        hashes = {c.name: self.lora_hash(c.path) for c in settings.loras}
        used = {name for name, (_, internal) in self.embeddings.items() if internal in prompt_text + negative_text}
        ti_hashes = {name: self.lora_hash(path) for path, (name, _) in self._embedding_files.items() if name in used}
        prompt, negative_prompt = self.a1111_prompt(settings.prompt), self.a1111_prompt(settings.negative)
        return [Sample(to_image(row), row, seed,
                       parameters_text(settings, seed, width, height, self.model_name, self.model_hash, hashes,
                                       ti_hashes, prompt, negative_prompt))
                for seed, row in zip(seeds, pixels)]


def save_sample(sample: Sample, path: Path) -> Path:
    """The PNG with its ``parameters`` text, written durably."""
    return write_png(sample.image, path, sample.parameters)

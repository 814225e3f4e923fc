"""Textual-inversion embedding files: the A1111/ComfyUI ``embeddings/`` format.

One file per concept holds its N learned vectors for each text encoder:

    SD1.x   {"emb_params": [N, 768]}                 (A1111: the single-key "diffuser concepts" form)
    SD2.x   {"emb_params": [N, 1024]}
    SDXL    {"clip_l": [N, 768], "clip_g": [N, 1280]} (A1111's SDXL form; ComfyUI reads each key
                                                      for its own encoder)

The file's name is the concept's name in prompts: ``embedding:NAME`` in ComfyUI, the bare word
``NAME`` in A1111. Which loader lines this follows is cited in ``tests/test_embeddings.py``.
The same vectors can also be bundled into a LoRA file as A1111's ``bundle_emb.NAME.…`` keys
(ComfyUI's LoraLoader does not read those, so the separate file is the default).
Only safetensors are written; ``.pt`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import UserError

# Per family: the file key of each text encoder's vectors, in the base model's encoder order.
EMBEDDING_KEYS = {"sd1": ("emb_params",), "sd2": ("emb_params",), "sdxl": ("clip_l", "clip_g")}
TOKENS_KEY = "dreambooth_lora.tokens"  # metadata: the tokens the vectors were trained as (e.g. <s1><s2>)


@dataclass
class Embedding:
    name: str  # the file's stem: what prompts call it
    vectors: list[torch.Tensor]  # one [N, dim] per text encoder, in the base model's order
    tokens: str = ""  # the training tokens ('<s1><s2>'), when the file records them
    metadata: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.vectors[0].shape[0])


def embedding_tensors(family: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors: fp32, contiguous, on the CPU (A1111 casts to fp32 on load anyway)."""
    keys = EMBEDDING_KEYS[family]
    if len(vectors) != len(keys):
        raise ValueError(f"{family} needs {len(keys)} vector sets, got {len(vectors)}")
    return {key: v.detach().float().contiguous().cpu() for key, v in zip(keys, vectors)}


def bundle_tensors(family: str, name: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A1111's bundled form inside a LoRA file: ``bundle_emb.NAME.string_to_param.*`` (one
    encoder) or ``bundle_emb.NAME.clip_l`` / ``.clip_g`` (SDXL)."""
    if "." in name:
        raise UserError(f"{name!r}: a bundled embedding's name cannot contain '.'; rename the output.")
    tensors = embedding_tensors(family, vectors)
    if family == "sdxl":
        return {f"bundle_emb.{name}.{key}": value for key, value in tensors.items()}
    return {f"bundle_emb.{name}.string_to_param.*": tensors["emb_params"]}


def write_embedding(path: str | Path, family: str, vectors: list[torch.Tensor], tokens: str = "",
                    metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write the embedding file atomically (safetensors only)."""
    from .core import write_atomically

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: embeddings are written as .safetensors files; change the name.")
    meta = {**{k: str(v) for k, v in (metadata or {}).items()}, TOKENS_KEY: tokens,
            "dreambooth_lora.family": family, "dreambooth_lora.vectors": str(int(vectors[0].shape[0]))}
    return write_atomically(embedding_tensors(family, vectors), path, meta, overwrite)


def _vectors_from(data: Mapping, family: str, dims: list[int], path: Path) -> list[torch.Tensor]:
    """The per-encoder vectors of a loaded file, in any of the forms A1111 and ComfyUI read."""
    if "string_to_param" in data:  # A1111 .pt: {'string_to_param': {'*': tensor}}
        params = data["string_to_param"]
        data = {"emb_params": next(iter(params.values()))}
    bundled = {k.split(".", 2)[2]: v for k, v in data.items() if isinstance(k, str) and k.startswith("bundle_emb.")}
    if bundled:
        data = {("emb_params" if k.startswith("string_to_param") else k): v for k, v in bundled.items()}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if family == "sdxl":
        if not {"clip_l", "clip_g"} <= set(tensors):
            raise UserError(f"{path}: not an SDXL embedding (it needs clip_l and clip_g vectors, it has "
                            f"{', '.join(sorted(tensors)) or 'none'}); use an embedding made for SDXL.")
        vectors = [tensors["clip_l"], tensors["clip_g"]]
    else:
        if len(tensors) != 1:
            raise UserError(f"{path}: holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); an SD1/SD2 "
                            "embedding holds one [N, dim] tensor (emb_params).")
        vectors = [next(iter(tensors.values()))]
    vectors = [v.float().reshape(-1, v.shape[-1]) for v in vectors]
    for vector, dim in zip(vectors, dims):
        if vector.shape[-1] != dim:
            raise UserError(f"{path}: its vectors have {vector.shape[-1]} values but this model's text encoder "
                            f"takes {dim}; it was made for another base model family.")
    if len({v.shape[0] for v in vectors}) != 1:
        raise UserError(f"{path}: its text encoders have different numbers of vectors; the file is damaged.")
    return vectors


def read_embedding(path: str | Path, family: str, dims: list[int], name: str | None = None) -> Embedding:
    """Read an embedding file (ours, A1111's or one from a LoRA's ``bundle_emb`` keys) for a
    model of ``family`` whose text encoders take ``dims`` values per token."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such embedding file; check the path.")
    metadata: dict = {}
    try:
        if path.suffix.lower() == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                data = {k: handle.get_tensor(k) for k in handle.keys()}
                metadata = dict(handle.metadata() or {})
        elif path.suffix.lower() in (".pt", ".bin"):
            data = torch.load(str(path), map_location="cpu", weights_only=True)  # never runs code
        else:
            raise UserError(f"{path}: not an embedding file (.safetensors, .pt or .bin).")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{path}: not a readable embedding ({str(err).splitlines()[0][:120]}); "
                        "download it again.") from None
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: not an embedding file (no named tensors in it).")
    vectors = _vectors_from(data, family, dims, path)
    return Embedding(name or path.stem, vectors, metadata.get(TOKENS_KEY, ""), metadata)

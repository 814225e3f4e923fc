"""Textual-inversion embedding files: the A1111/ComfyUI ``embeddings/`` format.

One file per concept holds its N learned vectors for each text encoder:

    SD1.x   {"emb_params": [N, 768]}                 (A1111: the single-key "diffuser concepts" form)
    SD2.x   {"emb_params": [N, 1024]}
    SDXL    {"clip_l": [N, 768], "clip_g": [N, 1280]} (A1111's SDXL form; ComfyUI reads each key
                                                      for its own encoder)

The file's name is the concept's name in prompts: ``embedding:NAME`` in ComfyUI, the bare word
``NAME`` in A1111. The loader code these keys are written for: ComfyUI ``comfy/sd1_clip.py``
``load_embed`` (``string_to_param``, else the encoder's ``embedding_key``, ``clip_l`` or
``clip_g`` as ``comfy/sdxl_clip.py`` sets it, else ``bundle_emb.*``, else the file's first
tensor) and A1111 ``modules/textual_inversion/textual_inversion.py``
``create_embedding_from_data`` (one ``string_to_param`` entry, or ``clip_l`` and ``clip_g``, or
exactly one tensor). The keys per family are in the family records (``models.families``).
The same vectors can also be bundled into a LoRA file as A1111's ``bundle_emb.NAME.…`` keys
(ComfyUI's LoraLoader does not read those, so the separate file is the default).
Only safetensors are written; ``.pt`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from ..models.families import FAMILIES
from ..runtime.files import write_safetensors

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
    keys = FAMILIES[family].embedding_keys
    if len(vectors) != len(keys):
        raise ValueError(f"{family} needs {len(keys)} vector sets, got {len(vectors)}")
    return {key: v.detach().float().contiguous().cpu() for key, v in zip(keys, vectors)}


def bundle_tensors(family: str, name: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A1111's bundled form inside a LoRA file: ``bundle_emb.NAME.string_to_param.*`` (one
    encoder) or ``bundle_emb.NAME.clip_l`` / ``.clip_g`` (SDXL)."""
    if "." in name:
        raise UserError(f"{name!r}: a bundled embedding's name cannot contain '.'; rename the output.")
    tensors = embedding_tensors(family, vectors)
    if len(tensors) > 1:
        return {f"bundle_emb.{name}.{key}": value for key, value in tensors.items()}
    return {f"bundle_emb.{name}.string_to_param.*": next(iter(tensors.values()))}


def write_embedding(path: str | Path, family: str, vectors: list[torch.Tensor], tokens: str = "",
                    metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write the embedding file (safetensors only; one durable write)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: embeddings are written as .safetensors files; change the name.")
    meta = {**{k: str(v) for k, v in (metadata or {}).items()}, TOKENS_KEY: tokens,
            "dreambooth_lora.family": family, "dreambooth_lora.vectors": str(int(vectors[0].shape[0]))}
    return write_safetensors(path, embedding_tensors(family, vectors), meta, overwrite)


def _vectors_from(data: Mapping, family: str, dims: list[int], path: Path) -> list[torch.Tensor]:
    """The per-encoder vectors of a loaded file, in any of the forms A1111 and ComfyUI read."""
    if "string_to_param" in data:  # A1111 .pt: {'string_to_param': {'*': tensor}}
        params = data["string_to_param"]
        data = {"emb_params": next(iter(params.values()))}
    bundled = {k.split(".", 2)[2]: v for k, v in data.items() if isinstance(k, str) and k.startswith("bundle_emb.")}
    if bundled:
        data = {("emb_params" if k.startswith("string_to_param") else k): v for k, v in bundled.items()}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    record = FAMILIES[family]
    if len(record.embedding_keys) > 1:  # one key per text encoder
        if not set(record.embedding_keys) <= set(tensors):
            raise UserError(f"{path}: not an {record.display} embedding (it needs {' and '.join(record.embedding_keys)} "
                            f"vectors, it has {', '.join(sorted(tensors)) or 'none'}); use an embedding made for "
                            f"{record.display}.")
        vectors = [tensors[key] for key in record.embedding_keys]
    else:
        if len(tensors) != 1:
            raise UserError(f"{path}: holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); an {record.display} "
                            f"embedding holds one [N, dim] tensor ({record.embedding_keys[0]}).")
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

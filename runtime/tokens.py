"""New tokens in a text encoder: textual inversion and pivotal tuning.

The tokenizer gets the new token strings (``<s1>``, ``<s2>``, …); the encoder's token
embedding is wrapped so that ids past the original vocabulary read their vectors from a
separate parameter, ``extra``. The original table is never touched or copied: training the
new vectors alone changes nothing else, bit for bit, and the optimizer sees only the new rows.
Sampling uses the same wrapper to load embedding files.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def token_names(count: int) -> list[str]:
    return [f"<s{i + 1}>" for i in range(count)]


class ExtraTokenEmbedding(torch.nn.Module):
    """``nn.Embedding`` of the original vocabulary plus rows for added tokens."""

    def __init__(self, base: torch.nn.Embedding):
        super().__init__()
        self.base = base
        self.vocab = base.num_embeddings
        self.extra = torch.nn.Parameter(torch.zeros(0, base.embedding_dim, dtype=base.weight.dtype,
                                                    device=base.weight.device), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings().weight expect
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.vocab
        out = self.base(torch.where(new, torch.zeros_like(ids), ids))
        if self.extra.shape[0] == 0:
            return out
        rows = self.extra.to(out.dtype)[(ids - self.vocab).clamp(0, self.extra.shape[0] - 1)]
        return torch.where(new.unsqueeze(-1), rows, out)

    def grow(self, count: int) -> None:
        """Make room for ``count`` rows in all (new rows are zero until set)."""
        if count <= self.extra.shape[0]:
            return
        grown = torch.zeros(count, self.extra.shape[1], dtype=self.extra.dtype, device=self.extra.device)
        grown[:self.extra.shape[0]] = self.extra.data
        self.extra = torch.nn.Parameter(grown, requires_grad=False)

    def set_rows(self, ids: list[int], vectors: torch.Tensor) -> None:
        self.grow(max(ids) - self.vocab + 1)
        with torch.no_grad():
            for i, vector in zip(ids, vectors):
                self.extra.data[i - self.vocab] = vector.to(self.extra.dtype)

    def rows(self, ids: list[int]) -> torch.Tensor:
        return torch.stack([self.extra[i - self.vocab] for i in ids])


def token_embedding(encoder) -> ExtraTokenEmbedding:
    """The encoder's token embedding, wrapped (once) so it can hold added tokens. The encoder's
    ``eos_token_id`` is set to the real one: with the legacy value 2, transformers' CLIP pools at
    the highest token id, which would be an added token instead of the end of the prompt (for
    prompts without added tokens both rules pick the same position)."""
    inner = getattr(encoder, "text_model", encoder)  # transformers 5: CLIPTextModel holds the layers itself
    embeddings = inner.embeddings
    if not isinstance(embeddings.token_embedding, ExtraTokenEmbedding):
        embeddings.token_embedding = ExtraTokenEmbedding(embeddings.token_embedding)
    wrapper = embeddings.token_embedding
    if getattr(inner, "eos_token_id", None) == 2:
        inner.eos_token_id = wrapper.vocab - 1  # CLIP's <|endoftext|> is the last id
    return wrapper


def add_tokens(tokenizer, encoder, names: list[str], vectors: torch.Tensor) -> list[int]:
    """Add ``names`` to the tokenizer (or reuse them if present) with ``vectors`` [N, dim] as
    their embeddings; returns their ids."""
    wrapper = token_embedding(encoder)
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
    ids = tokenizer.convert_tokens_to_ids(names)
    if min(ids) < wrapper.vocab:
        raise ValueError(f"tokens {names} are part of the original vocabulary")
    wrapper.set_rows(ids, vectors)
    return ids


def initial_vectors(tokenizer, encoder, count: int, init_word: str, generator: torch.Generator) -> torch.Tensor:
    """[count, dim] starting vectors: the embeddings of ``init_word``'s tokens (vector i takes
    token i·len/count, as A1111 initialises), or, without a word, random vectors with the
    spread of the existing embedding table."""
    table = token_embedding(encoder).base.weight.detach().float().cpu()
    if init_word.strip():
        ids = tokenizer(init_word.strip(), add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"--token-init {init_word!r}: gives no tokens; use a word such as 'painting'.")
        if max(ids) >= table.shape[0]:
            raise UserError(f"--token-init {init_word!r}: contains an added token; use plain words.")
        return torch.stack([table[ids[i * len(ids) // count]] for i in range(count)])
    return torch.randn(count, table.shape[1], generator=generator) * table.std() + table.mean(0)

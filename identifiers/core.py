"""Rare identifiers: the token that will stand for the subject ("a photo of sks dog").

The DreamBooth paper binds the subject to a *rare* token: one that is a single token of the
model's own tokenizer, short, and carries little meaning yet. Common words keep their meaning
and fight the subject; random strings split into several common tokens. We pick from CLIP's
BPE vocabulary (shared by SD1.x, SD2.x and SDXL):
- whole-word tokens of 2–3 lowercase letters (one token, nothing glued to it),
- merged late into the vocabulary (BPE merges frequent strings first, so a high id is rare),
- not an English word or a common web string (``common_short_words.txt``),
- then, with a model at hand, the ones that move its text encoder least.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..models.families import TOKENIZER_DIR
from ..models.load import make_tokenizer
from ..runtime.text import tokenize

WORD_LIST = Path(__file__).with_name("common_short_words.txt")
VOCAB_SIZE = 49408


@lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    return frozenset(line.strip() for line in WORD_LIST.read_text().splitlines() if line.strip() and not line.startswith("#"))


@lru_cache(maxsize=1)
def clip_vocab() -> dict[str, int]:
    return json.loads((TOKENIZER_DIR / "vocab.json").read_text())


@dataclass
class Candidate:
    token: str
    token_id: int
    prior_shift: float | None = None  # 1 − cosine between the text encodings with and without it

    def reason(self) -> str:
        later = 100.0 * self.token_id / VOCAB_SIZE
        text = f"one token, merged after {later:.0f}% of CLIP's vocabulary (rare), not an English word"
        if self.prior_shift is not None:
            text += f"; prior shift {self.prior_shift:.4f}"
        return text


def rare_tokens(min_token_id: int = 20000) -> list[Candidate]:
    """Every whole-word 2–3 letter token at or above ``min_token_id`` that is not a common word, rarest first."""
    found = []
    for token, token_id in clip_vocab().items():
        word = token[:-4]
        if token.endswith("</w>") and token_id >= min_token_id and re.fullmatch(r"[a-z]{2,3}", word) \
                and word not in common_words():
            found.append(Candidate(word, token_id))
    return sorted(found, key=lambda c: -c.token_id)


def prior_shift(text_encoders: list, tokenizers: list, words: list[str], class_word: str,
                batch_size: int = 32) -> list[float]:
    """How much 'a photo of a <word> <class>' differs from 'a photo of a <class>' for each word:
    1 − cosine of the pooled (end-of-text) encodings, averaged over the model's text encoders."""
    reference = f"a photo of a {class_word}"
    prompts = [f"a photo of a {w} {class_word}" for w in words]
    shifts = torch.zeros(len(words))
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        def pooled(texts: list[str]) -> torch.Tensor:
            ids = tokenize(tokenizer, texts).to(encoder.device)
            hidden = encoder(ids, output_hidden_states=False).last_hidden_state
            # the end-of-text position (first occurrence of the highest id) summarises the prompt
            return hidden[torch.arange(len(texts)), ids.argmax(dim=-1)].float()
        with torch.no_grad():
            base = pooled([reference])
            for start in range(0, len(prompts), batch_size):
                chunk = pooled(prompts[start:start + batch_size])
                shifts[start:start + len(chunk)] += 1 - torch.nn.functional.cosine_similarity(chunk, base, dim=-1).cpu()
    return (shifts / len(text_encoders)).tolist()


def propose(count: int = 8, class_word: str = "dog", min_token_id: int = 20000, base=None,
            score: bool = True) -> list[Candidate]:
    """``count`` identifiers, best first: least prior shift when a base model is given, else rarest."""
    candidates = rare_tokens(min_token_id)
    if base is not None and score and candidates:
        shifts = prior_shift(base.text_encoders, base.tokenizers, [c.token for c in candidates], class_word)
        for candidate, shift in zip(candidates, shifts):
            candidate.prior_shift = shift
        candidates.sort(key=lambda c: (c.prior_shift, -c.token_id))
    return candidates[:count]


def check(identifier: str, tokenizer=None, min_token_id: int = 20000) -> list[str]:
    """What is wrong with a user's identifier (empty list: nothing)."""
    problems = []
    word = identifier.strip()
    if not word:
        return ["the identifier is empty; pick one of the proposals"]
    if tokenizer is None:
        tokenizer = make_tokenizer("<|endoftext|>")
    pieces = tokenizer.tokenize(word)
    if len(pieces) > 1:
        readable = ", ".join(repr(p.replace("</w>", "")) for p in pieces)
        problems.append(f"{word!r} splits into {len(pieces)} tokens ({readable}); the model then learns a phrase of "
                        "common pieces. Prefer a single rare token.")
    if word.lower() in common_words():
        problems.append(f"{word!r} is an English word or a common web string; it keeps its meaning and fights the subject.")
    elif len(pieces) == 1:
        token_id = tokenizer.convert_tokens_to_ids(pieces[0])
        if token_id < min_token_id:
            problems.append(f"{word!r} is a frequent token (id {token_id} < {min_token_id}); the model already "
                            "associates it with something.")
    return problems

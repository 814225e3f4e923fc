"""The one prompt encoder: training, previews, class priors, sampling and identifiers all
encode text here, so a prompt means the same conditioning everywhere.

Training encodes a caption as one 77-token window (BOS + 75 + EOS, longer captions cut), as
diffusers' and kohya's trainers do. Sampling, priors and previews cut a prompt into windows of
75 tokens and put them one after another, as A1111 and ComfyUI do; a prompt of up to 75 tokens
gives exactly the training window.
"""

from __future__ import annotations

import math

import torch

from ..models.families import FAMILIES

CHUNK = 75  # prompt tokens per 77-token window


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """[len(captions), 77] ids: each caption padded or cut to the tokenizer's length."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` without BOS/EOS."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def encode_ids(family: str, encoders: list, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder hidden states, pooled embedding or None) of token ids (one tensor per encoder), as
    the family's pipeline builds them: one encoder's last hidden state (SD1/SD2); or, for a
    family whose UNet also takes pooled text (SDXL), every encoder's penultimate hidden states
    side by side and the last encoder's projected pooled output."""
    if not FAMILIES[family].pooled_text:
        return encoders[0](ids[0])[0], None
    hidden, pooled = [], None
    for encoder, encoder_ids in zip(encoders, ids):
        out = encoder(encoder_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(hidden, dim=-1), pooled


def encode_text(family: str, tokenizers: list, encoders: list, captions: list[str],
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``encode_ids`` of captions as one 77-token window each, as in training."""
    return encode_ids(family, encoders, [tokenize(tokenizer, captions).to(device) for tokenizer in tokenizers])


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


def windows_for(tokenizer, *texts: str) -> int:
    """How many 75-token windows the longest of ``texts`` needs (a prompt and its negative share it)."""
    return max(1, *(math.ceil(token_count(tokenizer, text) / CHUNK) for text in texts))


@torch.no_grad()
def encode_prompt(family: str, tokenizers: list, encoders: list, text: str, chunks: int | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [1, 77·chunks, dim], SDXL pooled embedding [1, dim] or None) of a prompt in
    75-token windows, each encoded as the family's pipeline does; SDXL's pooled embedding is the
    first window's. The result goes to ``device`` (default: where the first encoder is)."""
    home = next(encoders[0].parameters()).device
    ids = [chunk_ids(tokenizer, text, chunks).to(next(encoder.parameters()).device)
           for tokenizer, encoder in zip(tokenizers, encoders)]
    hidden, pooled = encode_ids(family, encoders, ids)  # one row per window
    target = home if device is None else device
    embeds = hidden.reshape(1, -1, hidden.shape[-1]).to(target)  # the windows one after another
    return embeds, None if pooled is None else pooled[:1].to(target)


def encode_base_prompt(base, text: str, chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``encode_prompt`` with a loaded base model's tokenizers and encoders, onto the UNet's device."""
    return encode_prompt(base.family, list(base.tokenizers), list(base.text_encoders), text, chunks,
                         next(base.unet.parameters()).device)


def sdxl_time_ids(original_hw, crop_top_left, target_hw) -> list[float]:
    return [*original_hw, *crop_top_left, *target_hw]

"""Rare identifiers: single tokens of the model's own tokenizer that are not English words."""

from __future__ import annotations

import math
import re

import pytest
import wordfreq
from english_words import get_english_words_set

from dreambooth_lora.cli import main
from dreambooth_lora.identifiers import core
from dreambooth_lora.models.load import load_base_model, make_tokenizer

# Independent of the bundled list: wordfreq's 50,000 most frequent English words and the
# web2 dictionary, as the installed packages ship them.
COMMON = set(wordfreq.top_n_list("en", 50_000)) | get_english_words_set(["web2"], lower=True)


def test_proposals_are_single_rare_tokens_and_no_english_words():
    tokenizer = make_tokenizer("<|endoftext|>")  # the SD1.5 tokenizer
    proposals = core.propose(count=20)
    assert len(proposals) == 20
    for candidate in proposals:
        assert re.fullmatch(r"[a-z]{2,3}", candidate.token)
        pieces = tokenizer.tokenize(candidate.token)
        assert len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) == candidate.token_id
        # in a prompt it stays one token too
        assert candidate.token_id in tokenizer(f"a photo of {candidate.token} dog").input_ids
        assert candidate.token not in COMMON, candidate.token
        assert candidate.token_id >= 20000
    assert [c.token_id for c in proposals] == sorted((c.token_id for c in proposals), reverse=True)


def test_model_ranks_by_prior_shift(tiny):
    base = load_base_model(tiny["sdxl-tiny"])  # two text encoders: the shift is averaged
    proposals = core.propose(count=10, class_word="cat", base=base)
    shifts = [c.prior_shift for c in proposals]
    assert all(math.isfinite(s) and s >= -1e-6 for s in shifts) and shifts == sorted(shifts)
    everything = core.propose(count=1000, class_word="cat", base=base)
    assert proposals[0].prior_shift == min(c.prior_shift for c in everything)
    assert all(c.token not in COMMON for c in everything)


@pytest.mark.parametrize("word,problem", [
    ("dog", "'dog' is an English word or a common web string"),
    ("qzxv", "'qzxv' splits into 3 tokens ('q', 'z', 'xv')"),
    ("sks dog", "splits into 2 tokens"),
    ("", "the identifier is empty"),
])
def test_check_warns(word, problem):
    assert any(problem in p for p in core.check(word)), core.check(word)


def test_check_warns_about_frequent_tokens():
    # a whole-word token that is no common word but was merged early: the model knows it well
    frequent = next(t[:-4] for t, i in sorted(core.clip_vocab().items(), key=lambda x: x[1])
                    if t.endswith("</w>") and 5000 < i < 20000 and re.fullmatch(r"[a-z]{3}", t[:-4])
                    and t[:-4] not in core.common_words())
    assert any(f"{frequent!r} is a frequent token (id" in p for p in core.check(frequent))


def test_check_accepts_a_proposal():
    assert core.check(core.propose(count=1)[0].token) == []


def test_command_prints_token_ids(capsys):
    assert main(["identifiers", "--count", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(re.match(r"[a-z]{2,3}\s+id \d{5}\s+one token, merged after", l) for l in lines)
    assert main(["identifiers", "--check", "dog"]) == 1
    assert "warning: 'dog' is an English word" in capsys.readouterr().out

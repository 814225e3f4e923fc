"""`dreambooth-lora identifiers`: propose rare identifier tokens, or check one."""

from __future__ import annotations

import argparse

from .options import IDENTIFIER_OPTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "identifiers", help="Propose rare single-token identifiers (or --check one) for 'a photo of <id> <class>'.",
        description="Lists whole-word CLIP tokens of 2-3 letters that are rare (merged late into the BPE "
                    "vocabulary), not English words or common web strings, and, with --base, move the model's "
                    "text encoder least. Prints each with its token id and why it was chosen.")
    parser.add_argument("--base", help="Checkpoint whose text encoder(s) rank the candidates.")
    parser.add_argument("--check", metavar="IDENTIFIER", help="Check an identifier you want to use instead.")
    IDENTIFIER_OPTIONS.add_to_parser(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from . import core

    opts = IDENTIFIER_OPTIONS.values(args)
    base = None
    if args.base:
        from ..models.load import load_base_model

        base = load_base_model(args.base)
    if args.check:
        from ..models.load import make_tokenizer

        tokenizer = base.tokenizers[0] if base else make_tokenizer("<|endoftext|>")
        problems = core.check(args.check, tokenizer, opts["min_token_id"])
        for problem in problems:
            print(f"warning: {problem}")
        if not problems:
            token_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(args.check)[0])
            print(f"{args.check!r}: fine, a single rare token (id {token_id}).")
        return 1 if problems else 0
    proposals = core.propose(opts["count"], opts["class_word"], opts["min_token_id"], base, opts["score"])
    for candidate in proposals:
        print(f"{candidate.token:<5} id {candidate.token_id:>5}  {candidate.reason()}")
    return 0

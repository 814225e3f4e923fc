"""`dreambooth-lora eval` (the paper's metrics on image folders) and `dreambooth-lora best`
(score every checkpoint of a training run and recommend one)."""

from __future__ import annotations

import argparse
import json
import sys

from ..models.options import LOAD_OPTIONS
from ..sampling.options import SAMPLE_OPTIONS
from .options import BEST_OPTIONS, EVAL_OPTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "eval", help="DreamBooth metrics: DINO, CLIP-I, CLIP-T, PRES, DIV of generated images against the subject.",
        description="Scores the images in --generated against the subject photos in --real with local evaluator "
                    "models (--dino, --clip; nothing is downloaded). CLIP-T uses each image's own prompt from its "
                    "PNG parameters (or --prompt), with the identifier removed. --class-generated (images of the "
                    "bare class prompt made with the LoRA) adds PRES.")
    evaluate.add_argument("--generated", required=True, help="Folder of generated images.")
    evaluate.add_argument("--real", required=True, help="Folder of the real subject images.")
    evaluate.add_argument("--class-generated", help="Folder of class-prompt images made with the LoRA (for PRES).")
    evaluate.add_argument("--prompt", help="The prompt of every generated image (default: each PNG's parameters).")
    evaluate.add_argument("--json", action="store_true", help="Print the scores as JSON.")
    EVAL_OPTIONS.add_to_parser(evaluate)
    evaluate.set_defaults(run=run_eval)

    best = subparsers.add_parser(
        "best", help="Score every saved checkpoint of a training run and recommend the best step.",
        description="For each step-N checkpoint in --state, samples the held-out --prompts and scores subject "
                    "fidelity (DINO/CLIP-I against --real) and prompt fidelity (CLIP-T); recommends the step with "
                    "the best balance of the two. With --by validation_loss (the default without --dino/--clip) "
                    "it recommends the step of lowest recorded validation loss instead, with no model at all.")
    best.add_argument("--base", help="The base checkpoint the LoRA was trained on (for --by metrics).")
    best.add_argument("--state", required=True, help="The '<output>.state' folder of a training run.")
    best.add_argument("--real", help="Folder of the real subject images, the instance photos (for --by metrics).")
    best.add_argument("--json", action="store_true", help="Print the table as JSON.")
    EVAL_OPTIONS.add_to_parser(best)
    BEST_OPTIONS.add_to_parser(best)
    for name in ("steps", "guidance", "sampler"):
        SAMPLE_OPTIONS[name].add_to_parser(best)
    LOAD_OPTIONS.add_to_parser(best)
    best.set_defaults(run=run_best)


def _evaluators(values: dict):
    from .core import load_evaluators

    return load_evaluators(values["dino"], values["clip"])


def run_eval(args: argparse.Namespace) -> int:
    from .core import evaluate, image_prompt, read_images

    values = EVAL_OPTIONS.values(args)
    skipped: list = []
    generated = read_images(args.generated, skipped)
    pairs = [(image, args.prompt or image_prompt(path) or "") for path, image in generated]
    real = [image for _, image in read_images(args.real, skipped)]
    classes = [image for _, image in read_images(args.class_generated, skipped)] if args.class_generated else []
    for path, why in skipped:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    dino, clip = _evaluators(values)
    scores = evaluate(pairs, real, dino, clip, values["identifier"], classes)
    if clip is not None and clip.has_text and "clip_t" not in scores.values:
        print("note: no CLIP-T: some images have no prompt (no PNG parameters); pass --prompt.")
    print(json.dumps({"scores": scores.values, "real": scores.real, "images": scores.counts}, indent=1)
          if args.json else scores.table())
    return 0


def run_best(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..runtime.devices import default_device
    from ..models.load import load_base_model
    from ..sampling.session import SamplingSession
    from ..errors import UserError
    from .choosing import by_validation_loss, score_checkpoints
    from .core import read_images

    values = {**EVAL_OPTIONS.values(args), **BEST_OPTIONS.values(args)}
    by = values["by"]
    if by == "auto":
        by = "metrics" if values["dino"] or values["clip"] else "validation_loss"
    if by == "validation_loss":
        return _print_by_validation_loss(*by_validation_loss(args.state), args.json)
    missing = [flag for flag, given in (("--base", args.base), ("--real", args.real)) if not given]
    if missing:
        raise UserError(f"--by metrics needs {' and '.join(missing)}: the base checkpoint and the folder of the "
                        "subject's photos; or choose --by validation_loss.")
    dino, clip = _evaluators(values)
    if dino is None and clip is None:
        raise UserError("no evaluator model: pass --dino and/or --clip (local paths; nothing is downloaded), or "
                        "choose --by validation_loss.")
    real = [image for _, image in read_images(args.real)]
    device = default_device()
    session = SamplingSession(load_base_model(args.base, **LOAD_OPTIONS.values(args), device=device), args.base)
    prompts = [p.strip() for p in values["prompts"].split("|") if p.strip()]
    with tqdm(unit="checkpoint", desc="scoring") as bar:
        def progress(done, total):
            bar.total = total
            bar.update(1)
        rows, best = score_checkpoints(session, args.state, real, prompts, dino, clip, values["images_per_prompt"],
                                       args.steps, args.sampler, args.guidance, on_progress=progress)
    if args.json:
        print(json.dumps({"checkpoints": rows, "recommended": best}, indent=1))
        return 0
    columns = [c for c in ("dino", "clip_i", "clip_t") if c in rows[0]]
    print(f"{'step':>8} " + " ".join(f"{c.upper().replace('_', '-'):>7}" for c in columns) + f" {'score':>7}")
    for row in rows:
        mark = "  <- recommended" if row is best else ""
        print(f"{row['step']:>8} " + " ".join(f"{row[c]:>7.3f}" for c in columns) + f" {row['score']:>7.3f}{mark}")
    if "clip_t" not in columns:
        print("note: without CLIP-T only subject fidelity counts, which favours overfit checkpoints; pass --clip.")
    print(f"recommended: step {best['step']}: {best['lora']}")
    return 0


def _print_by_validation_loss(rows: list[dict], best: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"checkpoints": rows, "recommended": best, "by": "validation_loss"}, indent=1))
        return 0
    print(f"{'step':>8} {'val loss':>10}")
    for row in rows:
        value = "-" if row["validation_loss"] is None else f"{row['validation_loss']:.5f}"
        print(f"{row['step']:>8} {value:>10}" + ("  <- recommended" if row is best else ""))
    print(f"recommended: step {best['step']} (lowest validation loss): {best['lora']}")
    return 0

"""`dreambooth-lora demo`: the whole pack on the built-in shapes-world base model, with a report."""

from __future__ import annotations

import argparse
import json

from .options import DEMO_OPTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="DreamBooth end to end on the built-in miniature base model (~2 min on a CPU), with a report.",
        description="Loads the bundled shapes-world base (a 64 px SD1.x miniature, no download), proposes a rare "
                    "identifier, makes class priors, trains a DreamBooth LoRA with prior preservation on a bundled "
                    "subject the base has never seen, writes it in kohya format, samples the subject in new "
                    "contexts and the bare class before and after, and writes report.html / report.png with the "
                    "images, the loss curve and the paper's metrics measured by the shapes judge.")
    parser.add_argument("--out", default="dreambooth-demo", help="Folder for the photos, class images, LoRA and report.")
    parser.add_argument("--json", action="store_true", help="Print the metrics as JSON.")
    parser.add_argument("--base", help="Another shapes-world base (made with `python -m dreambooth_lora.shapes.pretrain`); "
                                       "default: the built-in one.")
    DEMO_OPTIONS.add_to_parser(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .core import metrics_table, run_demo

    result = run_demo(DEMO_OPTIONS.values(args), args.out, args.base)
    if args.json:
        print(json.dumps({"identifier": result.identifier, "rows": result.rows, "seconds": result.seconds}, indent=1))
        return 0
    print(metrics_table(result.rows))
    print(f"LoRA:   {result.lora}")
    print(f"report: {result.report_html} and {result.report_png}")
    print("time:   " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    return 0

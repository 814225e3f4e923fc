"""DreamBooth quality in the shapes world: the paper's Table 1 in miniature, and the recipe sweep.

    .venv/bin/python bench/quality.py [--subjects candy,tile] [--steps 300] [--json out.json]
    .venv/bin/python bench/quality.py --sweep "learning_rate=5e-4,1e-3 steps=300,600 unet_targets=all,attention"

For every bundled subject: the base model (never saw the subject), a DreamBooth LoRA trained
without prior preservation, the same run with it (same seed, same steps), and real images
(held-out renders; the paper's upper-bound row). Metrics are shapes/core.py's SUBJ, PROMPT,
PRES, DIV; each is also printed as a ratio to the real-image value measured in the same run.

``--sweep`` runs every combination of the values given (demo options such as steps, learning_rate,
rank; or any trainer option such as unet_targets, train_text_encoder, prior_weight,
min_snr_gamma) and checks each against the quality goal of issue #17, per subject:
SUBJ with PP ≥ 0.7 × real; PROMPT with PP ≥ the base's; PRES with PP ≤ ½ × without; DIV with
PP ≥ 0.9 × the base's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))

GOALS = {"SUBJ": "SUBJ ≥ 0.7×real", "PROMPT": "PROMPT ≥ base", "PRES": "PRES ≤ ½×w/o PP", "DIV": "DIV ≥ 0.9×base"}


def goal_checks(rows: dict) -> dict[str, bool]:
    """The #17 goal of one subject's rows, check by check."""
    pp, off, base, real = rows["DB-LoRA with PP"], rows["DB-LoRA w/o PP"], rows["base"], rows["real images"]
    return {"SUBJ": pp["SUBJ"] >= 0.7 * real["SUBJ"], "PROMPT": pp["PROMPT"] >= base["PROMPT"],
            "PRES": pp["PRES"] <= 0.5 * off["PRES"], "DIV": pp["DIV"] >= 0.9 * base["DIV"]}


def parse_sweep(text: str, demo_options, train_options) -> list[dict]:
    """'a=1,2 b=x' → every combination, each value checked by its option."""
    axes = []
    for part in text.split():
        name, _, values = part.partition("=")
        owner = demo_options if name in [o.name for o in demo_options.options] else train_options
        try:
            option = owner[name]
        except KeyError:
            raise SystemExit(f"error: --sweep: {name!r} is neither a demo option nor a trainer option; use a name "
                             "from --help or from trainer/options.py") from None
        axes.append([(name, option.parse(v, f"--sweep {name}")) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def main() -> int:
    from dreambooth_lora.errors import UserError
    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.identifiers.core import propose
    from dreambooth_lora.sampling.session import SamplingSession
    from dreambooth_lora.shapes import core, world
    from dreambooth_lora.shapes.judge import Judge
    from dreambooth_lora.shapes.options import DEMO_OPTIONS
    from dreambooth_lora.trainer.options import TRAIN_OPTIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", default=",".join(world.SUBJECTS))
    parser.add_argument("--sweep", default="", help="space-separated name=v1,v2 axes; every combination is run")
    parser.add_argument("--base", type=Path, help="another shapes base (default: the built-in one)")
    parser.add_argument("--json", type=Path, help="also write the table here")
    DEMO_OPTIONS.add_to_parser(parser)
    args = parser.parse_args()
    options = DEMO_OPTIONS.values(args)
    try:
        configs = parse_sweep(args.sweep, DEMO_OPTIONS, TRAIN_OPTIONS)
    except UserError as error:  # one line, before anything is loaded
        raise SystemExit(f"error: {error}") from None
    base_file = args.base or core.base_path()
    base = load_base_model(base_file, dtype="fp32")
    judge = Judge.load()
    session = SamplingSession(base, base_file)
    common = dict(images_per_prompt=options["images_per_prompt"], guidance=options["guidance"],
                  steps=options["sample_steps"], seed=options["seed"])
    results, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fixed = {}  # per subject: identifier, reference, base row, priors (the same in every config)
        for config in configs:
            demo = {**options, **{k: v for k, v in config.items() if k in options}}
            more = {k: v for k, v in config.items() if k not in options}
            table = {}
            for name in args.subjects.split(","):
                subject = world.SUBJECTS[name]
                if name not in fixed:
                    identifier = propose(1, subject.look.shape, base=base)[0].token
                    ref = core.reference(subject, judge, options["images_per_prompt"], options["seed"])
                    base_row = core.measure(session, subject, identifier, ref, judge, None, **common).row()
                    priors = core.make_priors(base, base_file, subject, Path(tmp) / f"class-{name}", options)
                    fixed[name] = (identifier, ref, base_row, priors.folder)
                identifier, ref, base_row, class_dir = fixed[name]
                rows = {"base": base_row}
                for label, mode in (("DB-LoRA w/o PP", "off"), ("DB-LoRA with PP", "class_images")):
                    run = core.train_subject(base_file, subject, identifier, Path(tmp) / f"{name}-{mode}",
                                             {**demo, "prior_preservation": mode}, class_dir, f"{name}-{mode}", **more)
                    rows[label] = core.measure(session, subject, identifier, ref, judge, str(run.output), **common).row()
                rows["real images"] = ref.real.row()
                table[name] = rows
                checks = goal_checks(rows)
                print(f"\n{name} ({subject.look}), identifier {identifier!r}, {json.dumps(config) if config else 'defaults'}")
                print(core.metrics_table(rows))
                real = rows["real images"]
                print("as a ratio to real images: " + "; ".join(
                    f"{label} " + " ".join(f"{k} {v / real[k]:.2f}" for k, v in values.items() if real[k])
                    for label, values in rows.items() if label != "real images"))
                print("goal: " + ", ".join(f"{GOALS[k]} {'met' if ok else 'MISSED'}" for k, ok in checks.items()))
                sys.stdout.flush()
            labels = list(next(iter(table.values())))
            mean = {label: {k: sum(t[label][k] for t in table.values()) / len(table) for k in table[next(iter(table))][label]}
                    for label in labels}
            met = {name: goal_checks(rows) for name, rows in table.items()}
            results.append({"config": config, "subjects": table, "mean": mean, "goals": met})
            print(f"\nmean over subjects, {json.dumps(config) if config else 'defaults'}")
            print(core.metrics_table(mean))
    if len(configs) > 1:
        print("\nsweep: goals met per subject (SUBJ/PROMPT/PRES/DIV), mean SUBJ with PP as a ratio to real")
        for result in results:
            mean = result["mean"]
            flags = " ".join("".join("✓" if ok else "·" for ok in g.values()) for g in result["goals"].values())
            print(f"  {json.dumps(result['config']):<60} {flags}  SUBJ {mean['DB-LoRA with PP']['SUBJ'] / mean['real images']['SUBJ']:.2f}")
    print(f"({time.perf_counter() - started:.0f} s; options {json.dumps(options)})")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "options": options, "base": str(base_file)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

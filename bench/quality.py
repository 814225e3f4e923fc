"""DreamBooth quality in the shapes world: the paper's Table 1 in miniature.

    .venv/bin/python bench/quality.py [--subjects candy,tile] [--steps 300] [--json out.json]

For every bundled subject: the base model (never saw the subject), a DreamBooth LoRA trained
without prior preservation, the same run with it (same seed, same steps), and real images
(held-out renders; the paper's upper-bound row). Metrics are shapes/core.py's SUBJ, PROMPT,
PRES, DIV; each is also printed as a ratio to the real-image value measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))


def main() -> int:
    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.identifiers.core import propose
    from dreambooth_lora.sampling.session import SamplingSession
    from dreambooth_lora.shapes import core, world
    from dreambooth_lora.shapes.judge import Judge
    from dreambooth_lora.shapes.options import DEMO_OPTIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", default=",".join(world.SUBJECTS))
    parser.add_argument("--json", type=Path, help="also write the table here")
    DEMO_OPTIONS.add_to_parser(parser)
    args = parser.parse_args()
    options = DEMO_OPTIONS.values(args)
    base = load_base_model(core.base_path(), dtype="fp32")
    judge = Judge.load()
    session = SamplingSession(base, core.base_path())
    common = dict(images_per_prompt=options["images_per_prompt"], guidance=options["guidance"],
                  steps=options["sample_steps"], seed=options["seed"])
    table = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.subjects.split(","):
            subject = world.SUBJECTS[name]
            identifier = propose(1, subject.look.shape, base=base)[0].token
            ref = core.reference(subject, judge, options["images_per_prompt"], options["seed"])
            rows = {"base": core.measure(session, subject, identifier, ref, judge, None, **common).row()}
            priors = core.make_priors(base, core.base_path(), subject, Path(tmp) / "class", options)
            for label, mode in (("DB-LoRA w/o PP", "off"), ("DB-LoRA with PP", "class_images")):
                run = core.train_subject(core.base_path(), subject, identifier, Path(tmp) / f"{name}-{mode}",
                                         {**options, "prior_preservation": mode}, priors.folder, f"{name}-{mode}")
                rows[label] = core.measure(session, subject, identifier, ref, judge, str(run.output), **common).row()
            rows["real images"] = ref.real.row()
            table[name] = rows
            print(f"\n{name} ({subject.look}), identifier {identifier!r}")
            print(core.metrics_table(rows))
            real = rows["real images"]
            print("as a ratio to real images: " + "; ".join(
                f"{label} " + " ".join(f"{k} {v / real[k]:.2f}" for k, v in values.items() if real[k])
                for label, values in rows.items() if label != "real images"))
            sys.stdout.flush()
    print("\nmean over subjects")
    labels = list(next(iter(table.values())))
    mean = {label: {k: sum(t[label][k] for t in table.values()) / len(table) for k in table[next(iter(table))][label]}
            for label in labels}
    print(core.metrics_table(mean))
    print(f"({time.perf_counter() - started:.0f} s; options {json.dumps(options)})")
    if args.json:
        args.json.write_text(json.dumps({"subjects": table, "mean": mean, "options": options}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

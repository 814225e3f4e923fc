"""Masked training and the validation loss in the shapes world.

    .venv/bin/python bench/masks.py [--subjects candy,tile] [--steps 300] [--curve-steps 1200] [--json out.json]

1. Masks. Each subject is photographed on busy backgrounds only (brick, checkered): without a
   mask the LoRA learns the wallpaper with the subject. The same run (same seed, steps, class
   priors) with and without each photo's mask (``world.render_mask``: what a user would paint);
   SUBJ and PROMPT are measured in contexts the photos never had (sky, grass, night, sand,
   gray), with the base model's row for reference.
2. The validation-loss curve of an over-long run (one photo held out), against the checkpoint
   the metrics would choose: every checkpoint is sampled and scored (SUBJ as subject fidelity,
   PROMPT as prompt fidelity, combined as `dreambooth-lora best` combines DINO and CLIP-T).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))

BUSY = ("brick", "checkered")
CONTEXTS = ("sky", "grass", "night", "sand", "gray")


def write_busy_photos(world, subject, folder: Path, count: int = 5, seed: int = 0) -> None:
    """The subject on busy backgrounds only, each photo with its caption and its mask."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(subject.scenes(count, seed, BUSY)):
        path = folder / f"{subject.name}-{index}.png"
        world.render(scene).save(path)
        world.render_mask(scene).save(folder / f"{subject.name}-{index}.mask.png")
        path.with_suffix(".txt").write_text(f"a photo of a {{id}} {{class}} on a {scene.background} background\n")


def main() -> int:
    from dreambooth_lora.evaluation.choosing import recommend
    from dreambooth_lora.identifiers.core import propose
    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.sampling.session import SamplingSession
    from dreambooth_lora.shapes import core, world
    from dreambooth_lora.shapes.judge import Judge
    from dreambooth_lora.shapes.options import DEMO_OPTIONS
    from dreambooth_lora.trainer.checkpoint import list_checkpoints, read_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", default=",".join(world.SUBJECTS))
    parser.add_argument("--mask-floor", type=float, default=0.1)
    parser.add_argument("--curve-subject", default="candy")
    parser.add_argument("--curve-steps", type=int, default=1200, help="0 = skip the curve")
    parser.add_argument("--curve-every", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the tables here")
    DEMO_OPTIONS.add_to_parser(parser)
    args = parser.parse_args()
    options = DEMO_OPTIONS.values(args)
    base = load_base_model(core.base_path(), dtype="fp32")
    judge = Judge.load()
    session = SamplingSession(base, core.base_path())
    common = dict(images_per_prompt=options["images_per_prompt"], guidance=options["guidance"],
                  steps=options["sample_steps"], seed=options["seed"], contexts=CONTEXTS)
    report: dict = {"options": options, "mask_floor": args.mask_floor, "masks": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.subjects.split(","):
            subject = world.SUBJECTS[name]
            identifier = propose(1, subject.look.shape, base=base)[0].token
            ref = core.reference(subject, judge, options["images_per_prompt"], options["seed"], CONTEXTS)
            rows = {"base": core.measure(session, subject, identifier, ref, judge, None, **common).row()}
            priors = core.make_priors(base, core.base_path(), subject, Path(tmp) / "class", options)
            out = Path(tmp) / name
            write_busy_photos(world, subject, out / "photos")
            for label, more in (("no masks", {"mask_source": "off"}),
                                (f"masks (floor {args.mask_floor:g})", {"mask_source": "auto", "mask_floor": args.mask_floor})):
                run = core.train_subject(core.base_path(), subject, identifier, out, options, priors.folder,
                                         f"{name}-{more['mask_source']}", **more)
                rows[label] = core.measure(session, subject, identifier, ref, judge, str(run.output), **common).row()
            rows["real images"] = ref.real.row()
            report["masks"][name] = rows
            print(f"\n{name} ({subject.look}) on {', '.join(BUSY)} only, identifier {identifier!r}; measured in "
                  f"{', '.join(CONTEXTS)}")
            print(core.metrics_table(rows))
            sys.stdout.flush()
        if len(report["masks"]) > 1:
            labels = list(next(iter(report["masks"].values())))
            mean = {label: {k: sum(t[label][k] for t in report["masks"].values()) / len(report["masks"])
                            for k in ("SUBJ", "PROMPT", "PRES", "DIV")} for label in labels}
            report["masks_mean"] = mean
            print("\nmean over subjects")
            print(core.metrics_table(mean))

        if args.curve_steps:
            subject = world.SUBJECTS[args.curve_subject]
            identifier = propose(1, subject.look.shape, base=base)[0].token
            ref = core.reference(subject, judge, options["images_per_prompt"], options["seed"], CONTEXTS)
            priors = core.make_priors(base, core.base_path(), subject, Path(tmp) / "class", options)
            out = Path(tmp) / "curve"
            core.write_photos(subject, out / "photos", count=6)
            run = core.train_subject(core.base_path(), subject, identifier, out, {**options, "steps": args.curve_steps},
                                     priors.folder, "curve", validation_holdout=1,
                                     validation_loss_every=args.curve_every, save_every=args.curve_every,
                                     keep_checkpoints=0)
            rows = []
            for checkpoint in list_checkpoints(run.state_dir):
                scores = core.measure(session, subject, identifier, ref, judge, str(checkpoint / "lora.safetensors"),
                                      **common)
                rows.append({"step": int(checkpoint.name[5:]), "dino": scores.subj, "clip_t": scores.prompt,
                             "validation_loss": read_record(checkpoint).get("validation_loss")})
            by_metrics = recommend(rows)
            by_loss = min(rows, key=lambda r: (r["validation_loss"], r["step"]))
            print(f"\nvalidation-loss curve: {args.curve_subject}, {args.curve_steps} steps, 1 of 6 photos held out")
            print(f"{'step':>6} {'val loss':>9} {'SUBJ':>6} {'PROMPT':>6} {'score':>6}")
            for row in rows:
                marks = ("  <- lowest validation loss" if row is by_loss else "") + \
                        ("  <- best by the metrics" if row is by_metrics else "")
                print(f"{row['step']:>6} {row['validation_loss']:>9.5f} {row['dino']:>6.3f} {row['clip_t']:>6.3f} "
                      f"{row['score']:>6.3f}{marks}")
            report["curve"] = {"rows": rows, "lowest_validation_loss": by_loss["step"], "best_by_metrics": by_metrics["step"]}
    print(f"({time.perf_counter() - started:.0f} s; options {json.dumps(options)})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

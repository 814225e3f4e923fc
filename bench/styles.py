"""A style in the shapes world: pivotal tuning against LoRA-only and textual inversion alone.

    .venv/bin/python bench/styles.py [--steps 400] [--json out.json]

The style: black-and-white pictures (pretraining only ever shows colour), 12 varied scenes
captioned as the world captions them; style mode appends ``, in the style of {tokens}``. Three methods, same steps, seed and pictures
(``trainer.options.STYLE_METHODS``): a UNet LoRA with the identifier ``sks`` as the style word,
textual inversion alone (2 new tokens, initialised from "monochrome"), and pivotal tuning (the
2 tokens + the LoRA). Each then draws 8 held-out prompts (class and background never trained
together) × 2 seeds, in the style.

STYLE   share of images in the style: mean HSV saturation below the midpoint between the
        black-and-white and the colour renders of the same prompts
CONTENT share of images whose class is the prompt's (shapes judge; the style must not eat the
        content)
The base model, prompted without any style words, is the reference row of the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))


def main() -> int:
    import numpy as np
    import torch

    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.sampling.patch import LoraChoice
    from dreambooth_lora.sampling.session import SamplingSession
    from dreambooth_lora.sampling.settings import SampleSettings
    from dreambooth_lora.shapes import core, world
    from dreambooth_lora.shapes.judge import Judge
    from dreambooth_lora.trainer.job import TrainJob
    from dreambooth_lora.trainer.loop import train
    from dreambooth_lora.trainer.options import STYLE_METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="UNet LoRA learning rate")
    parser.add_argument("--token-lr", type=float, default=5e-3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    def styled(image):
        return image.convert("L").convert("RGB")

    def saturation(images) -> np.ndarray:
        return np.array([np.asarray(i.convert("HSV"), dtype=np.float32)[..., 1].mean() / 255 for i in images])

    rng = random.Random("style-set")
    colors = [c for c in world.COLORS if c != "white"]
    train_scenes = [world.random_scene(rng, world.Look(rng.choice(world.CLASSES), rng.choice(colors)))
                    for _ in range(12)]
    trained = {(s.look.shape, s.background) for s in train_scenes}
    held_out = []
    while len(held_out) < 8:
        scene = world.random_scene(rng, world.Look(rng.choice(world.CLASSES), rng.choice(colors)))
        if (scene.look.shape, scene.background) not in trained:
            held_out.append(scene)
    judge = Judge.load()
    base_file = core.base_path()
    session = SamplingSession(load_base_model(base_file, dtype="fp32"), base_file)
    rows, started = {}, time.perf_counter()

    def score(suffix: str, loras, embeddings) -> dict:
        images, truth = [], []
        for scene in held_out:
            settings = SampleSettings(prompt=scene.caption() + suffix, seed=0, steps=25, guidance=4.0,
                                      width=world.SIZE, height=world.SIZE, sampler="ddim", batch=2, loras=loras,
                                      embeddings=embeddings)
            images += [s.image for s in session.sample(settings)]
            truth += [scene, scene]
        plain = [world.render(s) for s in truth]
        threshold = (saturation(plain).mean() + saturation([styled(i) for i in plain]).mean()) / 2
        style = float((saturation(images) < threshold).mean())
        content = sum(sh == s.look.shape for sh, s in zip(judge.labels(images, "shape"), truth))
        return {"STYLE": style, "CONTENT": content / len(truth)}

    rows["base model (no style words)"] = score("", [], [])
    with tempfile.TemporaryDirectory() as tmp:
        pictures = Path(tmp) / "style"
        pictures.mkdir()
        for i, scene in enumerate(train_scenes):
            styled(world.render(scene)).save(pictures / f"{i:02d}.png")
            (pictures / f"{i:02d}.txt").write_text(scene.caption())
        for name, method in STYLE_METHODS.items():
            options = {"steps": args.steps, "learning_rate": args.learning_rate, "token_lr": args.token_lr,
                       "rank": 8, "alpha": 8.0, "unet_targets": "all", "resolution": world.SIZE, "seed": 0,
                       "token_init": "monochrome", "identifier": "sks", "save_every": 0, "mixed_precision": "no",
                       **method}
            output = Path(tmp) / name / f"style-{name}.safetensors"
            result = train(TrainJob(base=str(base_file), output=str(output), options=options,
                                    instance_dir=str(pictures), overwrite=True, load_options={"dtype": "fp32"}))
            loras = [LoraChoice(str(result.lora))] if result.lora else []
            embeddings = [str(result.embedding)] if result.embedding else []
            tokens = "<s1><s2>" if method["new_tokens"] else "sks"
            rows[name] = score(f", in the style of {tokens}", loras, embeddings)
            rows[name]["train_s"] = round(result.seconds, 1)
            print(name, rows[name], flush=True)
    print(f"\n{'':<28}{'STYLE':>8}{'CONTENT':>9}")
    for label, row in rows.items():
        print(f"{label:<28}{row['STYLE']:>8.3f}{row['CONTENT']:>9.3f}")
    print(f"({time.perf_counter() - started:.0f} s, {args.steps} steps each, torch {torch.__version__})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

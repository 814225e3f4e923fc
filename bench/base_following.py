"""How well a shapes base follows its prompts: class, colour and background, as the judge sees them.

    .venv/bin/python bench/base_following.py [--base FILE] [--guidance 4,7.5] [--grid out.png]

1. The 48 class × colour prompts of tests/test_shapes.py (a random background each, seed = the
   prompt's index, 20 DDIM steps): the share of images whose class, colour and background are
   the ones asked for, printed as a ratio to chance (1/6, 1/8, 1/7).
2. Per background, 6 prompts each (seeds 100 on): what the judge sees instead, so a base that
   paints night as gray says so.
3. How far a rare identifier moves the text encoder's output from the bare class prompt's
   (relative L2 over all 77 positions), against a colour word and a background clause.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))


def main() -> int:
    import torch

    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.sampling.session import SamplingSession
    from dreambooth_lora.sampling.settings import SampleSettings
    from dreambooth_lora.shapes import base_path, core, world
    from dreambooth_lora.shapes.judge import Judge

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=base_path(), help="a shapes base (default: the built-in one)")
    parser.add_argument("--guidance", default="4", help="comma-separated guidance scales")
    parser.add_argument("--grid", type=Path, help="also write the 48 images of the first guidance here (PNG)")
    args = parser.parse_args()
    base = load_base_model(args.base, dtype="fp32")
    judge, session = Judge.load(), SamplingSession(base, args.base)

    def sample(prompt: str, seed: int, guidance: float):
        settings = SampleSettings(prompt=prompt, seed=seed, steps=20, guidance=guidance, width=64, height=64,
                                  sampler="ddim")
        return [s.image for s in session.sample(settings)]

    chance = {"shape": 1 / len(world.CLASSES), "color": 1 / len(world.COLORS), "background": 1 / len(world.BACKGROUNDS)}
    for number, guidance in enumerate(float(g) for g in args.guidance.split(",")):
        started = time.perf_counter()
        rate, images = core.prompt_following(session, judge, guidance)
        print(f"guidance {guidance}: " + ", ".join(f"{h} {rate[h]:.3f} ({rate[h] / chance[h]:.1f}× chance)" for h in rate)
              + f" ({time.perf_counter() - started:.0f} s)")
        if args.grid and number == 0:
            from PIL import Image

            grid = Image.new("RGB", (world.SIZE * 8, world.SIZE * 6))
            for i, image in enumerate(images):
                grid.paste(image, ((i % 8) * world.SIZE, (i // 8) * world.SIZE))
            grid.save(args.grid)
    guidance = float(args.guidance.split(",")[0])
    asked, images = [], []
    for background in world.BACKGROUNDS:
        for i in range(6):
            prompt = f"a photo of a {list(world.COLORS)[i]} {world.CLASSES[i % len(world.CLASSES)]} on a {background} background"
            images += sample(prompt, 100 + len(images), guidance)
            asked.append(background)
    seen = judge.labels(images, "background")
    print(f"backgrounds at guidance {guidance}, what the judge sees (6 prompts each):")
    for background in world.BACKGROUNDS:
        print(f"  {background:<10} " + json.dumps(collections.Counter(s for s, a in zip(seen, asked) if a == background).most_common()))

    from dreambooth_lora.models.load import make_tokenizer
    from dreambooth_lora.runtime.text import encode_ids

    tokenizer = make_tokenizer("<|endoftext|>")

    def encoded(prompt: str):
        ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return encode_ids(base.info.family, base.text_encoders, [ids])[0][0]

    with torch.no_grad():
        bare = encoded("a photo of a star")
        print("text encoder: relative distance from 'a photo of a star'")
        for prompt in ("a photo of a xox star", "a photo of a purple star", "a photo of a star on a night background"):
            print(f"  {prompt!r:<45} {float((encoded(prompt) - bare).norm() / bare.norm()):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

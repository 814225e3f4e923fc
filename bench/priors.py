"""Class-prior throughput: ours vs diffusers' StableDiffusionPipeline called the same way.

    .venv/bin/python bench/priors.py [--base CKPT] [--num 4] [--batch-size 2] [--steps 10] [--resolution 256]

Same loaded components, batch size, steps, guidance, sampler (DDIM) and per-image seeds; both
sides save PNGs (the reference with a plain Image.save, ours with metadata and atomic renames,
plus its manifest). Runs alternate (ours, reference, ours, …) and the medians are compared, so
machine drift hits both. Not a test: it prints a table and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="Checkpoint (default: the full-size random SD1.5 fixture).")
    parser.add_argument("--num", type=int, default=4, help="Images per run.")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="Runs per side (medians are compared).")
    args = parser.parse_args()

    from dreambooth_lora.fixtures.checkpoints import fixture_path
    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.priors.core import generate_priors, make_pipeline

    base_path = args.base or str(fixture_path("sd15-full"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base_model(base_path, device=device)
    prompt = "a photo of a dog"
    reference = make_pipeline(base, "ddim")  # diffusers' own pipeline class over the same modules

    def run_reference(out: Path) -> float:
        started = time.perf_counter()
        for start in range(0, args.num, args.batch_size):
            indices = list(range(start, min(args.num, start + args.batch_size)))
            generators = [torch.Generator(device="cpu").manual_seed(i) for i in indices]
            images = reference(prompt=[prompt] * len(indices), num_inference_steps=args.steps, guidance_scale=7.5,
                               height=args.resolution, width=args.resolution, generator=generators).images
            for index, image in zip(indices, images):
                image.save(out / f"{index}.png")
        return time.perf_counter() - started

    def run_ours(out: Path) -> float:
        result = generate_priors(base, base_path, out, args.num, prompt, steps=args.steps, guidance=7.5,
                                 sampler="ddim", seed=0, batch_size=args.batch_size, resolution=args.resolution)
        assert result.generated == args.num
        return result.seconds

    times = {"ours": [], "diffusers": []}
    run_ours(Path(tempfile.mkdtemp()))  # warm-up (allocator, first-call kernels), not timed
    for _ in range(args.repeats):
        times["ours"].append(run_ours(Path(tempfile.mkdtemp())))
        times["diffusers"].append(run_reference(Path(tempfile.mkdtemp())))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {device}")
    print(f"model: {base_path} ({base.info.family}), {args.num} images, batch {args.batch_size}, "
          f"{args.steps} DDIM steps, {args.resolution}px, guidance 7.5")
    print(f"{'':<10} {'median s':>9} {'images/s':>9}   runs (s)")
    rate = {}
    for name, values in times.items():
        median = statistics.median(values)
        rate[name] = args.num / median
        print(f"{name:<10} {median:>9.2f} {rate[name]:>9.3f}   {', '.join(f'{v:.2f}' for v in values)}")
    print(f"throughput ratio ours/diffusers: {rate['ours'] / rate['diffusers']:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()

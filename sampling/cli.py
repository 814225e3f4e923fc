"""`dreambooth-lora sample` and `dreambooth-lora grid`: images with LoRAs at chosen scales."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..converters.options import SAVE_OPTIONS
from ..models.options import LOAD_OPTIONS
from .options import GRID_AXES, SAMPLE_OPTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    sample = subparsers.add_parser(
        "sample", help="Generate images with a base model and LoRAs, each at its own UNet and text-encoder scale.",
        description="Writes seed-numbered PNGs with A1111-style 'parameters' text to --out. --lora takes "
                    "FILE[:UNET_SCALE[:TE_SCALE]] and may be repeated (one scale sets both). --recreate PNG makes "
                    "an image again from its parameters.")
    _common(sample)
    SAMPLE_OPTIONS.add_to_parser(sample)
    sample.add_argument("--out", required=True, help="Folder for the images (created if missing).")
    sample.add_argument("--recreate", metavar="PNG", help="Re-make this image from its 'parameters' text (prompt, "
                        "seed, sampler, LoRAs and scales); the other sampling options are then ignored.")
    sample.add_argument("--lora-dir", action="append", default=[], help="Where --recreate looks for the image's "
                        "LoRAs (by name, then by hash in sub-folders); repeatable.")
    sample.add_argument("--embedding-dir", action="append", default=[], help="Where --recreate looks for the "
                        "image's embeddings (its 'TI hashes'); repeatable.")
    sample.set_defaults(run=run_sample)

    grid = subparsers.add_parser(
        "grid", help="A labelled grid of images over two settings (UNet/TE scale, guidance, seed, steps, LoRA, "
                     "training step, prompt).",
        description="Samples every combination of --x and --y (NAME=V1,V2,...; NAME one of "
                    f"{', '.join(GRID_AXES)}; prompt values separated by '|'; step values pick the "
                    "step-N checkpoints of --lora's training) and writes the labelled grid to --out, and each "
                    "cell as a PNG with its parameters to '<out stem>_cells/'.")
    _common(grid)
    SAMPLE_OPTIONS.add_to_parser(grid)
    grid.add_argument("--x", required=True, help="Horizontal axis, e.g. unet-scale=0,0.5,1.")
    grid.add_argument("--y", required=True, help="Vertical axis, e.g. guidance=3,7.")
    grid.add_argument("--out", required=True, help="The grid image to write (.png).")
    SAVE_OPTIONS["overwrite"].add_to_parser(grid)
    grid.set_defaults(run=run_grid)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="The base checkpoint (.safetensors/.ckpt or diffusers folder).")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:UNET[:TE]]",
                        help="A LoRA file (kohya/A1111, LyCORIS, PEFT or diffusers) and its scales; repeatable.")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE",
                        help="A textual-inversion embedding (A1111/ComfyUI format, e.g. the _emb file of a training "
                             "with --new-tokens); prompts use it as embedding:NAME, NAME (its file name) or the tokens "
                             "it was trained as (<s1><s2>). Repeatable.")
    LOAD_OPTIONS.add_to_parser(parser)


def _session(args: argparse.Namespace):
    from ..runtime.devices import default_device
    from ..models.load import load_base_model
    from .session import SamplingSession

    device = default_device()
    base = load_base_model(args.base, **LOAD_OPTIONS.values(args), device=device)
    return SamplingSession(base, args.base)


def run_sample(args: argparse.Namespace) -> int:
    from ..runtime.parameters import png_parameters
    from .settings import SampleSettings, settings_from_parameters
    from .patch import parse_lora
    from .session import save_sample

    if args.recreate:
        dirs = args.lora_dir or [str(Path(p.split(":")[0]).parent) for p in args.lora]
        embedding_dirs = args.embedding_dir or [str(Path(p).parent) for p in args.embedding]
        settings = settings_from_parameters(png_parameters(args.recreate), dirs, embedding_dirs)
    else:
        settings = SampleSettings.from_options(SAMPLE_OPTIONS.values(args), [parse_lora(t) for t in args.lora],
                                               args.embedding)
    session = _session(args)
    out = Path(args.out).expanduser()
    for sample in session.sample(settings):
        path = save_sample(sample, out / f"{sample.seed:06d}.png")
        print(path)
    return 0


def run_grid(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .settings import SampleSettings
    from .grid import make_grid, parse_axis
    from .patch import parse_lora

    settings = SampleSettings.from_options(SAMPLE_OPTIONS.values(args), [parse_lora(t) for t in args.lora],
                                           args.embedding)
    x_axis, y_axis = parse_axis(args.x), parse_axis(args.y)
    session = _session(args)
    with tqdm(total=len(x_axis[1]) * len(y_axis[1]), unit="img", desc="grid") as bar:
        result = make_grid(session, settings, x_axis, y_axis, args.out, overwrite=args.overwrite,
                           on_cell=lambda done, total: bar.update(1))
    print(f"{result.path} ({len(y_axis[1])}×{len(x_axis[1])}; cells in {result.cells[0][0].parent})")
    return 0

"""Ours against every peer on the same DreamBooth LoRA job, in one table per machine.

    .venv/bin/python bench/peers.py --diffusers-src ~/src/diffusers --kohya-src ~/src/sd-scripts \\
        --kohya-python ~/src/kohya-venv/bin/python

The peers run their own, unmodified code, from sources the user points at (none of it is part
of this project):
  diffusers  examples/dreambooth/train_dreambooth_lora.py from a diffusers checkout
             (--diffusers-src), on a diffusers folder of the same model, with this venv's diffusers
  kohya      sd-scripts' train_network.py (--kohya-src), in a Python of its own (--kohya-python:
             it pins transformers 4 and diffusers 0.32); skipped with a message when absent
  comfyui    ComfyUI's native TrainLoraNode, in the ComfyUI this venv runs (0.3.75 from .ci/setup;
             or --comfyui), driven by bench/peer_comfyui.py as a graph would call it
  ours       `dreambooth-lora train`, the command a user runs

Jobs (full-size random SD1.5 fixture, 4 photos of 256 px, fp32, on the CPU):
  prior      prior preservation: 4 class images, 1 instance + 1 class image per step (kohya: its
             batch of 2 drawn from photos and regularisation images), λ = 1, LoRA rank 16,
             AdamW 1e-4, gradient clipping 1.0, seed 0
  instance   no prior: 1 photo per step (ComfyUI's node has no prior preservation)

Each trainer trains on its own default set of layers; ours is run once per set that a peer
uses, so every ratio compares the same layers: attention projections (diffusers), every
Linear of the transformer blocks (kohya's networks.lora), every weight of the UNet with convs,
norms and biases (ComfyUI's node; ours: `--unet-targets all`, LoCon on convs and Linears).

Each (trainer, job) runs twice, --short and --long steps, each in a fresh process started
through bench/step_probe.py (torch's global optimizer-step hook writes the time of each step;
the trainer's code is not touched):
  s/step      (wall time of the long run − of the short run) / (long − short): loading,
              caching, saving and any end-of-run work cancel out
  1st step    from the process's start to the end of its first optimizer step (long run)
  peak RSS    the process's largest resident set (both runs' maximum)
  ratio       ours / the peer on the same job and layers

Not a test: it prints the table (and --json writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from conftest import comfyui_path  # noqa: E402  (where the tests find the real ComfyUI)
from train import make_images  # noqa: E402  (bench/train.py: the same random photos)
PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of a dog"


@dataclass
class Run:
    """One trainer on one job: how to start it for a given number of steps (through the probe)."""
    name: str
    job: str
    layers: str
    command: object  # steps -> the trainer's argv after `python bench/step_probe.py STAMPS`
    python: str = sys.executable
    cwd: Path | None = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-src", default=os.environ.get("DBLORA_DIFFUSERS_SRC"),
                        help="A diffusers checkout (its examples/dreambooth/train_dreambooth_lora.py is run).")
    parser.add_argument("--kohya-src", default=os.environ.get("DBLORA_KOHYA_SRC"), help="An sd-scripts checkout.")
    parser.add_argument("--kohya-python", default=os.environ.get("DBLORA_KOHYA_PYTHON"),
                        help="The Python with sd-scripts' requirements (default: this one).")
    parser.add_argument("--comfyui", help="A ComfyUI folder (default: $COMFYUI_PATH, else the one in this venv, "
                        "from .ci/setup).")
    parser.add_argument("--fixture", default="sd15-full")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--short", type=int, default=3, help="Steps of the short run.")
    parser.add_argument("--long", type=int, default=9, help="Steps of the long run.")
    parser.add_argument("--only", default="", help="Comma-separated trainers to run: diffusers, kohya, comfyui, ours "
                        "(default: all available).")
    parser.add_argument("--work", help="Work folder (default: a new temporary one, removed at the end).")
    parser.add_argument("--json", help="Also write the results here.")
    return parser.parse_args(argv)


def diffusers_folder(checkpoint: Path) -> Path:
    """The same model as a diffusers folder (built once beside the cached fixture)."""
    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.models.save import save_diffusers_folder

    folder = checkpoint.with_suffix(".diffusers")
    if not (folder / "model_index.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_diffusers_folder(load_base_model(checkpoint, dtype="fp32"), partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return folder


def kohya_layout(work: Path, photos: Path, classes: Path) -> tuple[Path, Path, Path]:
    """sd-scripts' DreamBooth folders (`<repeats>_<prompt>`) and a tokenizer cache holding our bundled
    CLIP tokenizer under the name it would otherwise download."""
    from dreambooth_lora.models.families import TOKENIZER_DIR

    train, reg, tokenizers = work / "kohya" / "train", work / "kohya" / "reg", work / "kohya" / "tokenizers"
    for source, target in ((photos, train / "1_sks dog"), (classes, reg / "1_dog")):
        shutil.copytree(source, target, dirs_exist_ok=True)
    cached = tokenizers / "openai_clip-vit-large-patch14"
    shutil.copytree(TOKENIZER_DIR, cached, dirs_exist_ok=True)
    # what the hub's copy of that tokenizer says beside its vocabulary (ours sets it when loading)
    (cached / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True}))
    return train, reg, tokenizers


def runs(args, work: Path, checkpoint: Path, photos: Path, classes: Path) -> tuple[list[Run], list[str]]:
    """Every run this machine can do, and a sentence for each peer it cannot."""
    out = work / "out"
    r, size = str(args.rank), str(args.resolution)
    ours_common = ["--base", str(checkpoint), "--instance-dir", str(photos), "--resolution", size, "--rank", r,
                   "--alpha", r, "--learning-rate", "1e-4", "--seed", "0", "--save-every", "0",
                   "--validation-loss-every", "0", "--instance-prompt", PROMPT, "--overwrite"]

    def ours(job: str, layers: str, targets: str) -> Run:
        prior = ["--prior-preservation", "class_images", "--class-dir", str(classes), "--class-prompt", CLASS_PROMPT] \
            if job == "prior" else ["--prior-preservation", "off"]
        return Run(f"ours ({layers})", job, layers, lambda n: [
            "-m", "dreambooth_lora.cli", "train", *ours_common, *prior, "--unet-targets", targets,
            "--steps", str(n), "--output", str(out / f"ours-{job}-{targets}-{n}.safetensors")])

    found, missing = [ours("prior", "attention", "attention")], []
    script = Path(args.diffusers_src or "-") / "examples" / "dreambooth" / "train_dreambooth_lora.py"
    if script.is_file():
        model = diffusers_folder(checkpoint)
        found.insert(0, Run("diffusers", "prior", "attention", lambda n: [
            str(script), "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(photos),
            "--class_data_dir", str(classes), "--with_prior_preservation", "--num_class_images", "4",
            "--instance_prompt", PROMPT, "--class_prompt", CLASS_PROMPT, "--resolution", size,
            "--train_batch_size", "1", "--max_train_steps", str(n), "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", r, "--seed", "0",
            "--mixed_precision", "no", "--checkpointing_steps", "100000", "--output_dir", str(out / f"diffusers-{n}")]))
    else:
        missing.append("diffusers: skipped, no --diffusers-src (a diffusers checkout with "
                       "examples/dreambooth/train_dreambooth_lora.py)")
    kohya = Path(args.kohya_src or "-")
    if (kohya / "train_network.py").is_file():
        train, reg, tokenizers = kohya_layout(work, photos, classes)
        found.append(Run("kohya", "prior", "transformer", lambda n: [
            str(kohya / "train_network.py"),
            "--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", str(train), "--reg_data_dir",
            str(reg), "--prior_loss_weight", "1.0", "--resolution", size, "--train_batch_size", "2",
            "--max_train_steps", str(n), "--learning_rate", "1e-4", "--lr_scheduler", "constant",
            "--optimizer_type", "AdamW", "--max_grad_norm", "1.0", "--network_module", "networks.lora",
            "--network_dim", r, "--network_alpha", r, "--network_train_unet_only", "--cache_latents",
            "--mixed_precision", "no", "--save_precision", "float", "--sdpa", "--seed", "0",
            "--max_data_loader_n_workers", "0", "--tokenizer_cache_dir", str(tokenizers), "--save_model_as",
            "safetensors", "--output_dir", str(out / f"kohya-{n}"), "--output_name", "kohya"],
            python=args.kohya_python or sys.executable, cwd=kohya))
        found.append(ours("prior", "transformer", "transformer"))
    else:
        missing.append("kohya: skipped, no --kohya-src (an sd-scripts checkout with train_network.py)")
    comfy = Path(args.comfyui) if args.comfyui else comfyui_path()
    if comfy is not None and (comfy / "comfy_extras" / "nodes_train.py").is_file():
        found.append(Run("comfyui", "instance", "all", lambda n: [
            str(HERE / "peer_comfyui.py"), "--comfyui", str(comfy), "--checkpoint", str(checkpoint),
            "--photos", str(photos), "--prompt", PROMPT, "--steps", str(n), "--rank", r, "--learning-rate", "1e-4",
            "--out", str(out / f"comfyui-{n}.safetensors")]))
        found.append(ours("instance", "all", "all"))
        found.append(ours("instance", "attention", "attention"))
    else:
        missing.append("comfyui: skipped, no ComfyUI with comfy_extras/nodes_train.py (run .ci/setup, or --comfyui)")
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        found = [run for run in found if {run.name, run.name.split(" ")[0], f"{run.name}/{run.job}"} & wanted]
    return found, missing


def measure(run: Run, steps: int, work: Path) -> dict:
    """Start the run for ``steps`` steps; its wall time, step stamps and peak RSS."""
    stamps = work / "stamps" / f"{run.name}-{run.job}-{steps}.txt".replace(" ", "_").replace("(", "").replace(")", "")
    stamps.parent.mkdir(parents=True, exist_ok=True)
    stamps.unlink(missing_ok=True)
    argv = [run.python, str(HERE / "step_probe.py"), str(stamps), *run.command(steps)]
    log = stamps.with_suffix(".log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DIFFUSERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    started = time.time()
    with log.open("w") as output:
        process = subprocess.Popen(argv, cwd=run.cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.time() - started
    code = os.waitstatus_to_exitcode(status)
    times = [float(line) for line in stamps.read_text().split()] if stamps.exists() else []
    if code != 0 or len(times) != steps:
        tail = log.read_text(errors="replace")[-2500:]
        raise RuntimeError(f"{run.name} ({run.job}, {steps} steps): exit {code}, {len(times)} optimizer steps; "
                           f"log {log}:\n{tail}")
    return {"wall_s": wall, "first_step_s": times[0] - started, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "step_gaps_s": [b - a for a, b in zip(times, times[1:])]}


def main() -> None:
    args = parse_args()
    if args.long <= args.short:
        sys.exit("error: --long must be more steps than --short")
    import tempfile

    import torch

    from dreambooth_lora.fixtures.checkpoints import fixture_path

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-peers-"))
    checkpoint = fixture_path(args.fixture)
    photos = make_images(work / "photos", 4, args.resolution, 0)
    classes = make_images(work / "class", 4, args.resolution, 1)
    todo, missing = runs(args, work, checkpoint, photos, classes)
    for line in missing:
        print(line, file=sys.stderr)
    results = {}
    for run in todo:
        short, long = measure(run, args.short, work), measure(run, args.long, work)
        per_step = (long["wall_s"] - short["wall_s"]) / (args.long - args.short)
        results[(run.name, run.job)] = {"name": run.name, "job": run.job, "layers": run.layers, "step_s": per_step,
                                        "first_step_s": long["first_step_s"],
                                        "peak_rss_bytes": max(short["peak_rss_bytes"], long["peak_rss_bytes"]),
                                        "short": short, "long": long}
        print(f"{run.name} / {run.job}: {per_step:.3f} s/step, first step {long['first_step_s']:.1f} s",
              file=sys.stderr, flush=True)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}, "
          f"torch {torch.__version__}, device cpu")
    print(f"model: {args.fixture}, {args.resolution} px, LoRA rank {args.rank}, fp32; s/step = (T({args.long} steps) "
          f"- T({args.short} steps)) / {args.long - args.short}")
    print(f"{'job':<9} {'trainer':<20} {'layers':<12} {'s/step':>7} {'1st step s':>11} {'peak RSS GB':>12} "
          f"{'ours/peer s/step':>17} {'1st step':>9}")
    for (name, job), r in results.items():
        peer = next((p for p in results.values() if p["job"] == job and p["layers"] == r["layers"]
                     and not p["name"].startswith("ours")), None) if name.startswith("ours") else None
        ratio = f"{r['step_s'] / peer['step_s']:.3f} ({peer['name']})" if peer else ""
        first = f"{r['first_step_s'] / peer['first_step_s']:.3f}" if peer else ""
        print(f"{job:<9} {name:<20} {r['layers']:<12} {r['step_s']:>7.3f} {r['first_step_s']:>11.1f} "
              f"{r['peak_rss_bytes'] / 1e9:>12.2f} {ratio:>17} {first:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": list(results.values())}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

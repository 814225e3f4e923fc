"""ComfyUI's own training node on a checkpoint, as a graph would run it, for `bench/peers.py`.

    python bench/peer_comfyui.py --comfyui PATH --checkpoint FILE --photos DIR --steps N --out FILE.safetensors

What the nodes of a native ComfyUI training graph do, called in that order in one process:
CheckpointLoaderSimple's loader, VAEEncode of the photos (one batch), CLIPTextEncode of the
prompt, TrainLoraNode (ComfyUI's code, unchanged: an adapter on every weight of the diffusion
model, its loss on the x0 prediction, no prior preservation), then SaveLoRA's write. ComfyUI
runs on the CPU here (`--cpu`), the way the test suite starts it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, help="The ComfyUI folder (the one with main.py).")
    parser.add_argument("--checkpoint", required=True, help="A single-file SD checkpoint.")
    parser.add_argument("--photos", required=True, help="A folder of square PNGs at the training resolution.")
    parser.add_argument("--prompt", default="a photo of sks dog")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true", help="The node's default; off here "
                        "unless asked, as in the other trainers' runs.")
    parser.add_argument("--out", required=True, help="Where SaveLoRA's file goes.")
    return parser.parse_args(argv)


def import_comfyui(path: str) -> None:
    sys.path.insert(0, path)
    saved, sys.argv = sys.argv, ["comfyui", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the argv above)
    finally:
        sys.argv = saved


def main() -> None:
    args = parse_args()
    import_comfyui(args.comfyui)
    import numpy as np
    import safetensors.torch
    import torch
    from PIL import Image

    import comfy.sd
    import nodes
    from comfy_extras.nodes_train import TrainLoraNode

    # ComfyUI's executor runs every node under inference mode (the training node leaves it itself)
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True,
                                                                 output_clip=True)[:3]
        pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
                                            for p in sorted(Path(args.photos).glob("*.png"))]))
        (latent,) = nodes.VAEEncode().encode(vae, pixels)
        (positive,) = nodes.CLIPTextEncode().encode(clip, args.prompt)
    node_inputs = dict(model=model, latents=latent, positive=positive, batch_size=args.batch_size, steps=args.steps,
                       grad_accumulation_steps=1, learning_rate=args.learning_rate, rank=args.rank,
                       optimizer="AdamW", loss_function="MSE", seed=args.seed, training_dtype=args.dtype,
                       lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=args.gradient_checkpointing,
                       existing_lora="[None]")
    # is_input_list: ComfyUI hands every input to this node as a list. The latents go in one per
    # image, as a dataset node's list output gives them: 0.3.75's node fails on a single batch
    # (`multi_res` is only set for a list: UnboundLocalError).
    lists = {name: [value] for name, value in node_inputs.items()}
    lists["latents"] = [{"samples": latent["samples"][i:i + 1]} for i in range(len(latent["samples"]))]
    with torch.inference_mode():
        result = TrainLoraNode.execute(**lists)
    lora = result.result[1]  # io.NodeOutput: (model, lora, loss_map, steps)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in lora.items()}, args.out)
    print(f"wrote {args.out}: {len(lora)} tensors", flush=True)


if __name__ == "__main__":
    main()

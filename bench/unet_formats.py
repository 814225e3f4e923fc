"""Does channels-last memory format pay for LoRA training of the UNet?

    .venv/bin/python bench/unet_formats.py [--fixture sd15-full] [--resolution 512] [--steps 10]

One UNet with a rank-16 attention LoRA, batch 2 (instance + prior), bf16 autocast on CUDA
(fp32 on the CPU): forward + backward + AdamW step, timed with the device synchronised, in
the default (contiguous) layout and in channels-last, alternating so drift hits both. Not a
test: it prints the medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="sd15-full")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per layout (after 3 warm-up steps).")
    args = parser.parse_args()

    from peft import inject_adapter_in_model

    from dreambooth_lora.fixtures.checkpoints import fixture_path
    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.runtime.peft import UNET_TARGETS, adapter_config

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    base = load_base_model(str(fixture_path(args.fixture)), dtype="fp16" if cuda else "fp32", device=str(device))
    unet = base.unet.to(dtype=dtype)
    unet.requires_grad_(False)
    inject_adapter_in_model(adapter_config("lora", 16, 16.0, 0.0, UNET_TARGETS["attention"]), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    side = args.resolution // 8
    channels = unet.config.in_channels
    latents = torch.randn(2, channels, side, side, device=device)
    context_dim = unet.config.cross_attention_dim
    hidden = torch.randn(2, 77, context_dim, device=device, dtype=dtype)
    added = None
    if base.family == "sdxl":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled_dim, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[args.resolution] * 2 + [0, 0] + [args.resolution] * 2] * 2,
                                          device=device, dtype=dtype)}
    timesteps = torch.tensor([500, 250], device=device)

    def step(layout: torch.memory_format) -> float:
        unet.to(memory_format=layout)
        x = latents.to(memory_format=layout)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            out = unet(x, timesteps, hidden, added_cond_kwargs=added).sample
        loss = out.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    times = {name: [] for name in layouts}
    for name, layout in layouts.items():
        for _ in range(3):
            step(layout)
    for _ in range(args.steps):
        for name, layout in layouts.items():
            times[name].append(step(layout))
    print(f"device {device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), {args.fixture} UNet, "
          f"{args.resolution}px, batch 2, {dtype}, LoRA rank 16, {args.steps} steps per layout")
    for name, values in times.items():
        print(f"{name:<14} median {statistics.median(values):.4f} s/step")
    ratio = statistics.median(times["channels_last"]) / statistics.median(times["contiguous"])
    print(f"channels_last / contiguous step time: {ratio:.3f}")


if __name__ == "__main__":
    main()

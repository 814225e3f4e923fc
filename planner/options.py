"""Options for memory: how the frozen base is stored, offload, fitting a run to a budget.

The first three are training options (``trainer/options.py`` puts them in its "speed and memory"
block, so they reach the CLI, the Train node, the A1111 tab and the LoRA's metadata from here);
``PLAN_OPTIONS`` belong to `dreambooth-lora plan` alone.
"""

from ..options import Option, OptionSet

BASE_PRECISIONS = ("auto", "fp8", "bf16", "fp16", "fp32")

MEMORY_OPTIONS = OptionSet(
    Option("base_precision", "auto", "How the frozen base's UNet and text-encoder weights are stored: fp8 (e4m3 "
           "with a per-tensor scale: half of bf16, a quarter of fp32; computed in the training precision), bf16, "
           "fp16, fp32; auto = in the training precision (bf16/fp16 on GPUs, fp32 on CPU). The adapter always "
           "trains in fp32.", choices=BASE_PRECISIONS, metadata_key="dreambooth_lora.base_precision"),
    Option("offload", False, "CUDA only: keep the UNet's frozen weights in CPU memory and bring each layer's to "
           "the GPU for its forward and again for its backward (least VRAM, slowest: every weight crosses "
           "PCIe twice a step). Does nothing on a CPU.", metadata_key="dreambooth_lora.offload"),
    Option("fit_to_vram", 0.0, "Before training, choose the fastest base precision (training precision or "
           "fp8), gradient checkpointing and offload whose predicted peak fits this many GiB of GPU memory (on "
           "a CPU: of RAM the run may add); see `dreambooth-lora plan`. 0 = off: the settings as given.",
           min=0.0, max=1024.0, step=0.5),
)

PLAN_OPTIONS = OptionSet(
    Option("vram", 8.0, "The memory budget in GiB: the card's memory (an '8 GB' card has 8 GiB; leave room for "
           "the CUDA context and the desktop), or on a CPU the RAM the run may add.", min=0.001, max=1024.0,
           step=0.5),
    Option("device", "cuda", "The device to plan for: cuda (a GPU, also from a machine without one) or cpu.",
           choices=("cuda", "cpu")),
    Option("json", False, "Print the plan as JSON.", node=False),
)

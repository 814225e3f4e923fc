"""Options for writing LoRA files."""

from ..options import Option, OptionSet

SAVE_OPTIONS = OptionSet(
    Option("dtype", "fp16",
           "Precision of the LoRA factors in the file. fp16 is what every UI loads and halves the size; "
           "alpha is always stored in fp32.",
           choices=("fp16", "bf16", "fp32")),
    Option("overwrite", False, "Replace an existing file of the same name instead of stopping."),
    Option("bake_alpha", False,
           "Fold each module's alpha/rank into lora_up and write alpha = rank. Every loader then applies "
           "the same delta, including diffusers 0.42, which misapplies LoRAs whose modules have different "
           "alphas; the file no longer records the training alpha."),
)

CONVERT_OPTIONS = SAVE_OPTIONS + OptionSet(
    Option("to", "kohya",
           "Output format: kohya = the A1111/ComfyUI/diffusers-loadable file (lora_unet_…/lora_te_…); "
           "peft = diffusers' save_lora_weights layout with its LoraConfig in the metadata.",
           choices=("kohya", "peft"), node=False),
    Option("base", None, "The base checkpoint the LoRA belongs to. Needed for models of non-standard "
           "sizes; otherwise the family is read from the LoRA and checked against it.", node=False),
)

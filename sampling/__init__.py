"""Stage: images from a base model with LoRAs at separate UNet/text-encoder scales, their A1111
records, and comparison grids.

    options.py   what can be set (one definition → CLI flag, node input)
    patch.py     LoRA files put onto the loaded weights (W₀ + Σ strength·ΔW)
    settings.py  what one image is made with; its PNG record and back
    session.py   a loaded model that samples any settings without reloading
    grid.py      x/y comparison grids
    cli.py       `dreambooth-lora sample` and `grid`

Nothing is imported here: the nodes read ``options`` without loading torch.
"""

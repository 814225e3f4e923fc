"""ComfyUI-DreamBooth-LoRA: teach a Stable Diffusion model one subject from a few photos.

This file is two things at once:
- the ComfyUI entry point when the repository sits in ``ComfyUI/custom_nodes/``
  (ComfyUI imports it under a path-derived module name and calls ``comfy_entrypoint``);
- the top of the ``dreambooth_lora`` package after ``pip install -e .``.

It must stay light: ComfyUI imports every pack at start-up, so nothing here touches
torch, diffusers, peft or comfy. Node classes are imported only when ComfyUI asks.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    # Imported here, not at module level, so that `import dreambooth_lora` (CLI, tests)
    # never needs ComfyUI and ComfyUI's start-up pays only for the schema classes.
    from .nodes import DreamBoothLoRAExtension

    return DreamBoothLoRAExtension()

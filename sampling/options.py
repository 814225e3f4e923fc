"""Options for sampling with LoRAs (and for the grids built from samples): defined once here."""

from ..options import Option, OptionSet

# Our sampler names → diffusers scheduler settings live in core.SAMPLERS; these are the choices.
SAMPLER_NAMES = ("euler_a", "euler", "dpmpp_2m", "dpmpp_2m_karras", "ddim")

SAMPLE_OPTIONS = OptionSet(
    Option("prompt", "a photo of sks dog", "What to draw. Longer than 75 tokens is fine: the prompt is encoded in "
           "chunks of 75 tokens, as A1111 and ComfyUI do."),
    Option("negative", "", "What not to draw (classifier-free guidance pushes away from it)."),
    Option("seed", 0, "Seed of the first image; image i of a batch uses seed + i, so any image can be re-made "
           "alone.", min=0, max=2**63 - 1),
    Option("steps", 25, "Sampler steps.", min=1, max=500),
    Option("guidance", 7.5, "Classifier-free guidance scale (CFG).", min=0.0, max=30.0, step=0.5),
    Option("width", 0, "Image width in pixels (multiple of 8); 0 = the model's native size.", min=0, max=4096,
           step=8),
    Option("height", 0, "Image height in pixels (multiple of 8); 0 = the model's native size.", min=0, max=4096,
           step=8),
    Option("sampler", "euler_a", "Sampler: euler_a (Euler a), euler, dpmpp_2m (DPM++ 2M), dpmpp_2m_karras, ddim.",
           choices=SAMPLER_NAMES),
    Option("batch", 1, "Images per call (seeds seed, seed+1, ...).", min=1, max=64),
)

# Grid axes: what can vary along x and y.
GRID_AXES = ("unet-scale", "te-scale", "guidance", "seed", "steps", "lora", "step", "prompt")

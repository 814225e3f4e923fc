"""Options for class-prior images (the frozen model's pictures of the bare class)."""

from ..options import Option, OptionSet

PRIOR_OPTIONS = OptionSet(
    Option("class_prompt", "a photo of a dog", "Prompt for the class images: the instance prompt without the "
           "identifier, e.g. 'a photo of a dog'."),
    Option("num_class_images", 200, "How many class images to have. The paper uses about 1000 (~200 work for "
           "a LoRA); existing ones for the same model and prompt are reused.", min=1, max=100000,
           metadata_key="ss_num_reg_images"),
    Option("negative_prompt", "", "What class images should not show (e.g. 'blurry, lowres')."),
    Option("steps", 25, "Sampler steps per class image.", min=1, max=500),
    Option("guidance", 7.5, "Classifier-free guidance scale for class images.", min=0.0, max=30.0, step=0.5),
    Option("sampler", "ddim", "Sampler for class images.", choices=("ddim", "euler", "euler_a", "dpmpp_2m")),
    Option("seed", 0, "Image i uses seed + i, so the same settings always give the same images.", min=0,
           max=2**63 - 1),
    Option("resolution", 0, "Class image size in pixels; 0 = the model's native size (512 SD1, 768 SD2-v, "
           "1024 SDXL). Use the training resolution.", min=0, max=4096, step=8),
)

"""Options for reading the instance (subject) images."""

from ..options import Option, OptionSet

DATA_OPTIONS = OptionSet(
    Option("resolution", 512, "Training size in pixels (the short side, or the bucket area's side). SD1.x "
           "and SD2-base train at 512, SD2 768-v at 768, SDXL at 1024.", min=64, max=4096, step=8,
           metadata_key="ss_resolution"),
    Option("crop", "center", "How an image is cut to the training size after the short side is scaled: "
           "center keeps the middle; random picks a new window every time the image is used.",
           choices=("center", "random")),
    Option("buckets", False, "Aspect-ratio buckets: keep each image's shape (within 1:4..4:1) at about "
           "resolution² pixels instead of cropping to a square. SDXL users usually want this."),
    Option("flip", False, "Randomly mirror images left-right while training (doubles the poses seen; "
           "leave off for subjects with text or an asymmetric logo)."),
    Option("repeats", 1, "How many times each image appears per epoch.", min=1, max=1000),
    Option("background", "white", "Colour that transparent pixels (RGBA, LA, palette transparency) are "
           "composited on.", choices=("white", "black", "gray")),
    Option("mask_source", "auto", "Which pixels the loss cares about: auto = a <name>.mask.png beside a photo (white = "
           "subject) where there is one; alpha = also the photo's transparency (opaque = subject); off = every "
           "pixel counts alike. In ComfyUI, a MASK batch on the Subject Photos node (1 = subject).",
           choices=("auto", "alpha", "off")),
    Option("recursive", False, "Also read images in sub-folders of the instance folder."),
)

# The prompt that binds the subject: shared by the dataset, identifier and training stages.
PROMPT_OPTIONS = OptionSet(
    Option("instance_prompt", "a photo of {id} {class}", "Caption for images without a <name>.txt beside them; "
           "{id} and {class} are replaced by --identifier and --class-word."),
    Option("identifier", "sks", "The rare token that will stand for the subject."),
    Option("class_word", "dog", "The subject's class, e.g. dog, cat, backpack, person."),
)


"""Options of the shapes-world demo and quality measurement."""

from ..options import Option, OptionSet
from ..trainer.options import PRIOR_MODES
from .world import SUBJECTS

SUBJECT = Option("subject", "badge", "Which built-in subject to teach: candy (a red-and-white striped circle), tile "
                 "(a yellow/blue split square), badge (a purple star with a yellow rim), domino (a green diamond "
                 "with white dots). The base model has never seen any of these looks.", choices=tuple(SUBJECTS))

# The ComfyUI node that renders a subject's training photos.
PHOTO_OPTIONS = OptionSet(
    SUBJECT,
    Option("count", 5, "How many photos of the subject (the demo trains on 5).", min=1, max=64),
    Option("seed", 0, "Where the subject sits in each photo and on which background (the demo's photos: 0).",
           min=0, max=2**31 - 1),
)

DEMO_OPTIONS = OptionSet(
    SUBJECT,
    Option("steps", 600, "Training steps (1 photo + 1 class image per step).", min=1, max=100_000),
    Option("learning_rate", 5e-4, "Learning rate of the UNet LoRA (LoCon: attention, convs, time embeddings).",
           min=0.0, max=1.0, step=1e-4),
    Option("rank", 8, "LoRA rank.", min=1, max=256),
    Option("prior_preservation", "class_images", "class_images (the paper), base_model, or off: run with off "
           "to see the class drift towards the subject (PRES up, DIV down).",
           choices=tuple(m for m in PRIOR_MODES if m != "auto")),
    Option("num_class_images", 50, "Class-prior images the base makes of the bare class.", min=1, max=10_000),
    Option("images_per_prompt", 6, "Images per prompt when measuring (each new context, and the bare class "
           "4× as many).", min=2, max=64),
    Option("guidance", 4.0, "Classifier-free guidance for every image the demo makes (class priors included).",
           min=0.0, max=30.0, step=0.5),
    Option("sample_steps", 25, "Sampler steps for every image the demo makes.", min=1, max=200),
    Option("seed", 0, "Seeds the photos' order, the training noise and every sample.", min=0, max=2**31 - 1),
)

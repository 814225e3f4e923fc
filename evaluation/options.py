"""Options for evaluating a DreamBooth LoRA with the paper's metrics: defined once here."""

from ..options import Option, OptionSet

EVAL_OPTIONS = OptionSet(
    Option("dino", "", "DINO evaluator: a local folder of a self-supervised ViT (the paper uses DINO ViT-S/16, "
           "e.g. facebook/dino-vits16 saved with save_pretrained). Gives DINO, PRES and DIV. Never downloaded."),
    Option("clip", "", "CLIP evaluator: a local CLIP folder (image + text: CLIP-I and CLIP-T), or a ComfyUI "
           "models/clip_vision file (image only: CLIP-I). Never downloaded."),
    Option("identifier", "", "The identifier to remove from prompts before CLIP-T (the paper scores the prompt "
           "without it); empty = take it from the training record when there is one."),
)

BEST_OPTIONS = OptionSet(
    Option("by", "auto", "How to choose: metrics (sample the --prompts with every checkpoint and score them with "
           "--dino/--clip against --real), validation_loss (the lowest validation loss a checkpoint recorded; "
           "needs no model), auto = metrics when an evaluator is given, else validation_loss.",
           choices=("auto", "metrics", "validation_loss")),
    Option("prompts", "a photo of {id} {class} on the beach|a {id} {class} in the snow|a painting of {id} {class}",
           "Held-out prompts for scoring checkpoints, separated by '|' ({id}/{class} are filled in from the "
           "training record)."),
    Option("images_per_prompt", 2, "Images per prompt and checkpoint (seeds 0, 1, ...).", min=1, max=64),
)

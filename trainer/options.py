"""Options for DreamBooth LoRA training: defined once here, derived into the CLI, the node, the
LoRA file's ``ss_*`` metadata and the typed view the trainer reads (``TrainSettings``)."""

from ..data.options import DATA_OPTIONS, PROMPT_OPTIONS
from ..options import Option, OptionSet
from ..planner.options import MEMORY_OPTIONS
from ..priors.options import PRIOR_OPTIONS

# What the prior-preservation term is computed against (auto: class_images for subjects, off for styles).
PRIOR_MODES = ("auto", "class_images", "base_model", "off")
# The caption template used when --caption-template is empty, per mode.
DEFAULT_TEMPLATES = {"subject": "{caption}", "style": "{caption}, in the style of {tokens}"}

TRAIN_OPTIONS = OptionSet(
    # --- length and learning rates
    Option("steps", 500, "Optimizer steps to train. 3-20 photos usually need 400-1500 at LR 1e-4.", min=1,
           max=1_000_000, metadata_key="ss_max_train_steps", node_default=1000),
    Option("learning_rate", 1e-4, "Learning rate of the UNet adapter (1e-4 is the usual LoRA value).", min=0.0,
           max=1.0, step=1e-5, metadata_key="ss_unet_lr"),
    Option("batch_size", 1, "Instance images per step (with prior preservation, as many class images join them "
           "in the same forward pass).", min=1, max=64, metadata_key="ss_batch_size_per_device"),
    Option("gradient_accumulation", 1, "Steps whose gradients are summed before one optimizer step (a larger "
           "effective batch without more memory).", min=1, max=256, metadata_key="ss_gradient_accumulation_steps"),
    # --- the adapter
    Option("adapter", "lora", "Adapter type: lora (loads everywhere), dora (LoRA with learned magnitudes; "
           "ComfyUI 0.3.75 applies it 4% off), loha or lokr (LyCORIS; need a LyCORIS-aware loader in A1111).",
           choices=("lora", "dora", "loha", "lokr")),
    Option("rank", 16, "Adapter rank: size of the update. 4-32 is typical for one subject.", min=1, max=1024,
           metadata_key="ss_network_dim"),
    Option("alpha", 16.0, "Adapter alpha: the update is scaled by alpha/rank (alpha = rank means scale 1).",
           min=0.0, max=4096.0, step=0.5, metadata_key="ss_network_alpha"),
    Option("dropout", 0.0, "Dropout on the adapter's input (LoRA/DoRA) or rank dropout (LoHa/LoKr) while "
           "training.", min=0.0, max=0.9, step=0.05, metadata_key="ss_network_dropout"),
    Option("unet_targets", "attention", "UNet layers that get an adapter: attention (q/k/v/out projections, as "
           "diffusers), transformer (+ proj_in/out and feed-forward, as kohya), all (+ ResNet convs and time "
           "embeddings: LoCon).", choices=("attention", "transformer", "all")),
    # --- text encoder
    Option("train_text_encoder", False, "Also train an adapter on the text encoder(s): binds the identifier "
           "faster, risks language drift. Uses its own learning rate."),
    Option("text_encoder_lr", 1e-5, "Learning rate of the text-encoder adapter.", min=0.0, max=1.0, step=1e-6,
           metadata_key="ss_text_encoder_lr"),
    Option("text_encoder_steps", 0, "Stop training the text encoder after this many steps (0 = train it to the "
           "end).", min=0, max=1_000_000),
    # --- prior preservation and the loss
    Option("prior_preservation", "auto", "What keeps the class intact: class_images (the paper: loss on "
           "images of the bare class made by the base model), base_model (no class images: the frozen model's "
           "own prediction for the class prompt on the instance latents is the target), off; auto = "
           "class_images in subject mode, off in style mode.",
           choices=PRIOR_MODES),
    Option("prior_weight", 1.0, "λ in loss = instance loss + λ · prior loss.", min=0.0, max=100.0, step=0.05,
           metadata_key="ss_prior_loss_weight"),
    Option("loss", "mse", "Per-pixel loss: mse, or huber (pseudo-Huber, less swayed by outliers).",
           choices=("mse", "huber")),
    Option("huber_delta", 0.1, "Where the pseudo-Huber loss turns from quadratic to linear.", min=1e-4, max=10.0,
           step=0.01),
    Option("min_snr_gamma", 0.0, "Min-SNR-γ weighting of timesteps (5 is the paper's value; 0 = off).", min=0.0,
           max=100.0, step=0.5, metadata_key="ss_min_snr_gamma"),
    Option("mask_floor", 0.1, "Loss weight of the pixels outside a photo's mask (see --mask-source): 0 = only the "
           "subject is learned, 1 = the mask has no effect. Photos without a mask count fully everywhere.",
           min=0.0, max=1.0, step=0.05, metadata_key="dreambooth_lora.mask_floor"),
    Option("mask_prior", False, "Also weight the prior loss by the photo's mask (with prior_preservation "
           "base_model, whose prior rows are the photos under the class prompt; class images have no masks)."),
    Option("noise_offset", 0.0, "Add this much per-channel constant noise (0.05-0.1 lets the model learn very "
           "dark or bright images).", min=0.0, max=1.0, step=0.01, metadata_key="ss_noise_offset"),
    # --- optimizer and schedule
    Option("optimizer", "adamw", "adamw, adamw8bit (bitsandbytes, CUDA only: ~1/4 of the optimizer memory), or "
           "prodigy (adaptive; set learning rates to 1.0; needs `pip install prodigyopt`).",
           choices=("adamw", "adamw8bit", "prodigy"), metadata_key="ss_optimizer"),
    Option("weight_decay", 1e-2, "AdamW weight decay.", min=0.0, max=1.0, step=1e-3),
    Option("lr_scheduler", "constant", "Learning-rate schedule.", choices=("constant", "constant_with_warmup",
           "linear", "cosine"), metadata_key="ss_lr_scheduler"),
    Option("warmup_steps", 0, "Steps over which the learning rate ramps up from 0.", min=0, max=1_000_000,
           metadata_key="ss_lr_warmup_steps"),
    Option("max_grad_norm", 1.0, "Clip the gradient norm to this (0 = no clipping).", min=0.0, max=1000.0,
           step=0.1, metadata_key="ss_max_grad_norm"),
    # --- speed and memory
    Option("mixed_precision", "auto", "auto (bf16 on GPUs that have it, else fp16 on CUDA; fp32 on CPU), no, "
           "fp16, bf16. The adapter itself always trains in fp32.", choices=("auto", "no", "fp16", "bf16"),
           metadata_key="ss_mixed_precision"),
    Option("gradient_checkpointing", False, "Recompute activations in the backward pass: much less memory, "
           "about 25% slower.", metadata_key="ss_gradient_checkpointing"),
    Option("cache_latents", True, "Encode every image with the VAE once before training (not possible with "
           "random crops, which change every step).", metadata_key="ss_cache_latents"),
    *MEMORY_OPTIONS,  # base_precision, offload, fit_to_vram (planner/options.py)
    # --- reproducibility, saving, watching
    Option("seed", 0, "Everything random (order, noise, timesteps, dropout) follows from it: the same seed "
           "gives the same LoRA on the same machine.", min=0, max=2**31 - 1, metadata_key="ss_seed"),
    Option("save_every", 100, "Write a resumable checkpoint (and a LoRA file) every N steps (0 = only at the "
           "end).", min=0, max=1_000_000),
    Option("keep_checkpoints", 3, "How many checkpoints to keep (older ones are deleted; 0 = keep all).", min=0,
           max=10_000),
    Option("validation_prompts", "", "Prompts for preview images, separated by '|' ({id}/{class} are filled "
           "in). Empty = no previews."),
    Option("validation_every", 0, "Make preview images every N steps (0 = only at the end, when prompts are "
           "given).", min=0, max=1_000_000),
    Option("validation_scales", "1.0", "LoRA scales for previews: '1.0', or a grid 'unet=0.5,1.0 te=0,1' over "
           "UNet × text-encoder scales (same seeds in every cell)."),
    Option("validation_steps", 20, "Sampler steps per preview image.", min=1, max=200),
    Option("validation_loss_every", 50, "Every N steps (and at each checkpoint and the end), the loss on the "
           "validation photos at fixed timesteps and noise, the same every time: the curve to read for over- "
           "and under-fitting, and the criterion of `best --by validation_loss`. 0 = off.", min=0,
           max=1_000_000),
    Option("validation_holdout", 0, "Photos held out of training for the validation loss (chosen by the seed); "
           "0 = measure it on the training photos (with very few photos nothing can be spared).", min=0,
           max=100),
    # --- styles, new tokens (textual inversion / pivotal tuning)
    Option("mode", "subject", "subject: bind an identifier to one subject (DreamBooth). style: learn a style from "
           "varied, per-image captioned pictures (<name>.txt beside each); no class priors unless asked for, "
           "and captions go through --caption-template.", choices=("subject", "style"),
           metadata_key="dreambooth_lora.mode"),
    Option("new_tokens", 0, "Add this many new tokens (<s1>, <s2>, ...) to the tokenizer(s) and learn their "
           "embeddings (textual inversion; with the LoRA: pivotal tuning). Saved as an embedding file for "
           "A1111/ComfyUI (embedding:NAME). In subject mode they replace the identifier in captions; "
           "0 = none.", min=0, max=75, metadata_key="dreambooth_lora.new_tokens"),
    Option("token_init", "", "Word whose embedding the new tokens start from (e.g. painting); empty = random "
           "vectors with the spread of the vocabulary.", metadata_key="dreambooth_lora.token_init"),
    Option("token_lr", 1e-3, "Learning rate of the new token embeddings (no weight decay).", min=0.0, max=1.0,
           step=1e-4, metadata_key="dreambooth_lora.token_lr"),
    Option("token_steps_fraction", 1.0, "Stop training the new token embeddings after this fraction of the "
           "steps (1 = to the end; pivotal tuning often stops them at 0.5).", min=0.0, max=1.0, step=0.05),
    Option("train_unet", True, "Train the UNet adapter. Off with --new-tokens and no text-encoder training = "
           "textual inversion alone (the output is then the embedding file).",
           metadata_key="dreambooth_lora.train_unet"),
    Option("caption_template", "", "How each caption is built: {caption} is the image's caption, {tokens} the "
           "new tokens (or the identifier without new tokens). Empty = '{caption}' in subject mode, "
           "'{caption}, in the style of {tokens}' in style mode."),
    Option("bundle_embeddings", False, "Also put the learned embeddings inside the LoRA file (A1111's "
           "bundle_emb keys). ComfyUI's LoraLoader ignores them and diffusers refuses such files, so the "
           "separate embedding file is always written too."),
)

# The class-image settings the trainer exposes; generation details keep their PRIOR_OPTIONS defaults.
CLASS_OPTIONS = OptionSet(PRIOR_OPTIONS["class_prompt"], PRIOR_OPTIONS["num_class_images"])

# Everything a training run reads: the trainer's own options, the dataset's and the class images'.
ALL_OPTIONS = TRAIN_OPTIONS + DATA_OPTIONS + PROMPT_OPTIONS + CLASS_OPTIONS
# The typed view of ALL_OPTIONS the trainer works with (``TrainSettings.of(mapping)``).
TrainSettings = ALL_OPTIONS.typed("TrainSettings")

# The three ways to learn a style, as option sets to merge into TrainJob.options (same data, steps,
# seed and everything else): a LoRA bound to the identifier, textual inversion alone, pivotal
# tuning (new tokens + LoRA). E.g. {**common, **STYLE_METHODS["pivotal"]}.
STYLE_METHODS = {
    "lora": {"mode": "style", "new_tokens": 0, "train_unet": True},
    "textual_inversion": {"mode": "style", "new_tokens": 2, "train_unet": False, "train_text_encoder": False},
    "pivotal": {"mode": "style", "new_tokens": 2, "train_unet": True},
}

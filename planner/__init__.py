"""Stage: memory — what a training run will hold at its peak, before it starts, and the fastest
settings that fit a budget (`dreambooth-lora plan`, --fit-to-vram).

    options.py   base_precision, offload, fit_to_vram (training options) and the plan command's own
    trace.py     peak bytes of a computation run on the meta device (shapes only, no weights)
    steps.py     the traced computations: a training step, latent caching, a class image
    core.py      the phases of a run, the candidates in their speed order, the choice
    report.py    for the trainer: --fit-to-vram, and predicted against measured peak of every run

It sits below the trainer (which asks it before and around each run) and reads training options
as attributes of the settings it is given. The plan command is registered by the trainer's CLI,
because it takes the train command's own flags. Nothing is imported here.
"""

"""Stage: the DreamBooth LoRA trainer (prior preservation, new tokens, resumable, multi-GPU).

    options.py     what can be set (one definition → CLI flag, node input, ss_* metadata, TrainSettings)
    job.py         TrainJob and TrainResult, the checks before any work, the resume policy
    batches.py     instance and class images, their latents, the rows of each micro-batch
    model.py       the frozen base, adapters and new tokens injected, parameter groups
    step.py        caption embeddings, one joint forward pass and its loss, the optimizer
    loss.py        the DreamBooth loss (instance + λ · prior, min-SNR, Huber)
    checkpoint.py  the state folder's layout; checkpoints written and read
    export.py      adapter states → kohya LoRA, embedding file, final PEFT adapter
    logs.py        log.jsonl, the loss plot, the progress bar
    preview.py     preview grids, made as the sampler makes images
    loop.py        train(): setup, resume, the loop, the result
    cli.py         `dreambooth-lora train`

Nothing is imported here: the nodes read ``options`` without loading torch.
"""

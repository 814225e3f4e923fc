"""The shared runtime: what every stage uses and no stage owns.

    text.py        one prompt encoder (75-token windows, every family) for training, previews,
                   priors, sampling and identifiers
    pipeline.py    schedulers, diffusers pipelines, and the one image generator
    peft.py        adapter configs, switching adapters off or scaling them, their states
    tokens.py      new token rows in a text encoder (textual inversion, embeddings)
    files.py       the durable writer every user-visible file goes through; fingerprints
    parameters.py  A1111 ``parameters`` text, written and read in one place
    pictures.py    grids, the loss plot, fonts

It imports ``errors``, ``options`` and ``models`` only, never a stage.
"""

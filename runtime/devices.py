"""Where the work runs."""

from __future__ import annotations

import torch


def default_device() -> str:
    """The first CUDA GPU if there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"

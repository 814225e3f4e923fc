"""The shapes world: a procedural miniature, its pretrained base model and its judge.

Kept free of heavy imports: ComfyUI's loader node names the built-in base at start-up.
"""

from pathlib import Path

BASE_NAME = "shapes-sd1.safetensors"


def base_path() -> Path:
    """Where the pack ships the built-in base model (a 64 px SD1.x miniature of this world)."""
    return Path(__file__).resolve().parent / "base" / BASE_NAME

"""The model families: one record per family, the one place that knows what differs between them.

A family is an architecture whose checkpoints share a key layout and whose LoRAs share module
names: SD1.x, SD2.x and SDXL today. Its ``Family`` record holds what every stage needs to know
and a file cannot say: its components, names for users, native resolution, prediction
defaults, the names kohya/A1111 give its LoRA modules and metadata, and its embedding-file
keys. The component configs a file cannot tell either (attention heads, activations, VAE
scaling, scheduler betas, the text encoders' single-file prefixes and classes) are in the
family's JSON file in ``configs/`` (``family_config``). Stages never branch on a family's name:
they read its record.

Adding a family
---------------
A family in this mould (a UNet2DConditionModel, CLIP-style text encoders, an AutoencoderKL)
touches exactly these files:

1. ``models/families.py``: its ``Family`` record in ``FAMILIES``.
2. ``models/configs/<name>.json``: its reference diffusers configs (``unet``, ``vae``,
   ``scheduler``), its ``text_encoders`` (diffusers name, tokenizer, single-file layout and
   prefix, transformers class, pad token, config) and its UNet head rule (``unet_heads``).
3. Its loader: ``models/identify.py`` (how its single-file keys and diffusers folders are
   recognised, and what its prediction type is), and where its layout differs from the LDM
   one, ``models/derive.py`` (component configs from tensor shapes) and ``models/layouts.py``
   (single-file ⇄ diffusers key names).
4. ``fixtures/checkpoints.py``: its tiny test sizes (``TINY_UNET``), so every test can build a
   random checkpoint of it.

A family of another architecture (a diffusion transformer such as Flux or Z-Image) also needs a
loader for its denoiser in ``models/load.py`` and, for the stages that run it, the prompt rule
in ``runtime/text.py`` and the pipeline in ``runtime/pipeline.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping

CONFIG_DIR = Path(__file__).parent / "configs"
TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"  # the CLIP BPE vocabulary every family's tokenizers use


@dataclass(frozen=True, eq=False)
class Family:
    """What one family is, for every stage. One record per family (compared by identity); its
    mappings are shared, never mutate them."""

    name: str  # the id in files, options and training records: "sd1"
    display: str  # short name in messages: "SD1.x"
    title: str  # full name in the inspection report: "Stable Diffusion 1.x"
    config_file: str  # its component configs, in configs/
    # The parts an adapter can train, as diffusers names them: the UNet, then each text
    # encoder in the base model's order (``BaseModel.text_encoders``).
    components: tuple[str, ...]
    # Native training size per prediction type; a type not listed has the default type's.
    resolution: Mapping[str, int]
    default_prediction: str = "epsilon"
    # SD2: 768-v and 512-base files share every shape; a weight's spread tells them apart.
    v_from_weights: bool = False
    # SD2 768-v: diffusers' config computes attention in fp32 (``upcast_attention``).
    upcast_attention_for_v: bool = False
    # SDXL: the UNet also takes the last text encoder's pooled, projected output.
    pooled_text: bool = False
    pipeline_class: str = "StableDiffusionPipeline"  # the diffusers pipeline of a diffusers folder
    # kohya's LoRA names (sd-scripts ``networks/lora.py``): UNet modules by their diffusers
    # path ("diffusers", SD1/SD2) or their LDM path ("ldm", SDXL), and one prefix per text encoder.
    kohya_unet_names: str = "diffusers"
    kohya_text_prefixes: Mapping[str, str] = field(default_factory=dict)
    # Text-encoder prefixes also read (never written): ComfyUI accepts ``lora_te1_`` for
    # single-encoder families, and some tools write it.
    kohya_text_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # LoRA metadata A1111 sorts LoRAs by: ``ss_v2`` and ``ss_base_model_version``, and
    # Stability's ``modelspec.architecture``, per prediction type like ``resolution``.
    kohya_v2: bool = False
    base_version: Mapping[str, str] = field(default_factory=dict)
    architecture: Mapping[str, str] = field(default_factory=dict)
    # Textual-inversion files: the key of each text encoder's vectors, in encoder order.
    embedding_keys: tuple[str, ...] = ("emb_params",)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return self.components[1:]

    def for_prediction(self, table: Mapping, prediction_type: str):
        """``table``'s entry for ``prediction_type``, else the default prediction type's."""
        return table.get(prediction_type, table[self.default_prediction])


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        name="sd1", display="SD1.x", title="Stable Diffusion 1.x", config_file="sd1.json",
        components=("unet", "text_encoder"),
        resolution={"epsilon": 512},
        kohya_text_prefixes={"text_encoder": "lora_te_"},
        kohya_text_aliases={"text_encoder": ("lora_te1_",)},
        base_version={"epsilon": "sd_v1"},
        architecture={"epsilon": "stable-diffusion-v1"},
    ),
    Family(
        name="sd2", display="SD2.x", title="Stable Diffusion 2.x", config_file="sd2.json",
        components=("unet", "text_encoder"),
        resolution={"epsilon": 512, "v_prediction": 768},
        v_from_weights=True, upcast_attention_for_v=True,
        kohya_text_prefixes={"text_encoder": "lora_te_"},
        kohya_text_aliases={"text_encoder": ("lora_te1_",)},
        kohya_v2=True,
        base_version={"epsilon": "sd_v2", "v_prediction": "sd_v2_v"},
        architecture={"epsilon": "stable-diffusion-v2-512", "v_prediction": "stable-diffusion-v2-768-v"},
    ),
    Family(
        name="sdxl", display="SDXL", title="Stable Diffusion XL", config_file="sdxl.json",
        components=("unet", "text_encoder", "text_encoder_2"),
        resolution={"epsilon": 1024},
        pooled_text=True, pipeline_class="StableDiffusionXLPipeline",
        kohya_unet_names="ldm",
        kohya_text_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
        base_version={"epsilon": "sdxl_base_v1-0"},
        architecture={"epsilon": "stable-diffusion-xl-v1-base"},
        embedding_keys=("clip_l", "clip_g"),
    ),
)}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; one of {', '.join(FAMILIES)}") from None


@lru_cache(maxsize=None)
def family_config(name: str) -> dict:
    """The family's reference component configs (``configs/<name>.json``); shared, do not mutate."""
    return json.loads((CONFIG_DIR / family(name).config_file).read_text())

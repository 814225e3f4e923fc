"""LoRA file metadata that UIs read: kohya ``ss_*`` keys and Stability's ``modelspec.*``.

A1111 decides which base a LoRA belongs to from ``ss_base_model_version`` (``sdxl_…``) and
``ss_v2``; any metadata without them reads as SD1, and the LoRA is then hidden on SD2/SDXL
checkpoints. ``ss_output_name`` is A1111's prompt alias. ComfyUI reads no metadata. The
per-family values are in the family records (``models.families``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Mapping

import torch
from safetensors.torch import save

from ..models.families import FAMILIES
from .adapter import Adapter

# modelspec.implementation, by how kohya names the family's UNet modules: the diffusers way
# (SD1/SD2) or the LDM (sgm) way (SDXL), as sd-scripts' library/sai_model_spec.py records it.
IMPLEMENTATION = {"diffusers": "diffusers", "ldm": "https://github.com/Stability-AI/generative-models"}


def data_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the safetensors data section (header excluded), as kohya's ``sshs_model_hash``:
    metadata can change without changing the hash users compare."""
    blob = save(dict(tensors))
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def build_metadata(adapter: Adapter, data_hash: str, output_name: str, *, prediction_type: str = "epsilon",
                   title: str | None = None, trigger_phrase: str | None = None, comment: str | None = None,
                   hyperparameters: Mapping | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    family = FAMILIES[adapter.family]
    summary = adapter.summary()
    conv = [m for m in adapter.modules.values() if m.is_3x3_conv]
    network_args = {}
    if summary["algorithm"] != "lora":
        network_args["algo"] = summary["algorithm"]  # LyCORIS records its algorithm here
    if summary["dora"]:
        network_args["dora_wd"] = "True"
    if conv:
        # kohya has one conv rank; with mixed ranks, report the most common (as for ss_network_dim)
        network_args["conv_dim"] = str(Counter(m.rank for m in conv).most_common(1)[0][0])
        network_args["conv_alpha"] = str(Counter(m.alpha for m in conv).most_common(1)[0][0])
    architecture = family.for_prediction(family.architecture, prediction_type)
    resolution = family.for_prediction(family.resolution, prediction_type)
    meta = {
        "ss_network_module": "networks.lora" if summary["algorithm"] == "lora" else "lycoris.kohya",
        "ss_network_dim": str(summary["rank"]),
        "ss_network_alpha": str(summary["alpha"]),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": family.for_prediction(family.base_version, prediction_type),
        "ss_v2": str(family.kohya_v2),
        "ss_output_name": output_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "sshs_model_hash": data_hash,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": IMPLEMENTATION[family.kohya_unet_names],
        "modelspec.title": title or output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.hash_sha256": "0x" + data_hash,
    }
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    if comment:
        meta["ss_training_comment"] = comment
    if hyperparameters is not None:
        meta["dreambooth_lora.hyperparameters"] = json.dumps(dict(hyperparameters), sort_keys=True, default=str)
    meta.update(extra or {})
    return meta

"""The DreamBooth paper's metrics (Ruiz et al. 2022, §4.1); choosing a checkpoint is in choosing.py.

Subject fidelity
  DINO    mean pairwise cosine between DINO ViT embeddings (CLS token) of generated and real
          subject images
  CLIP-I  the same with CLIP image embeddings
Prompt fidelity
  CLIP-T  mean cosine between each generated image's CLIP image embedding and the CLIP text
          embedding of its prompt, with the identifier removed
Prior preservation and diversity
  PRES    DINO between images of the *class* prompt made with the LoRA and the real subject
          images: high means the class drifted towards the subject (lower is better)
  DIV     1 − mean pairwise DINO cosine among images of the same prompt, averaged over prompts.
          The paper uses LPIPS for DIV; LPIPS needs its own weights, so this is the LPIPS-free
          variant on the features we already have (higher is more diverse).

Real-image rows (the paper's "Real images" upper bound) use the real images against each
other, self-pairs excluded. Evaluator models are read from local paths only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.core import IMAGE_SUFFIXES, open_image, to_rgb
from ..errors import UserError
from ..models.families import TOKENIZER_DIR
from ..runtime.parameters import png_parameters, read_parameters

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# --- the formulas -------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def cosine_matrix(a, b) -> torch.Tensor:
    return _unit(a) @ _unit(b).T


def mean_pairwise_cosine(a, b) -> float:
    """Mean of cos(a_i, b_j) over every pair (DINO, CLIP-I, PRES)."""
    return float(cosine_matrix(a, b).mean())


def mean_cosine_within(a) -> float:
    """Mean of cos(a_i, a_j) over pairs i ≠ j (the real-image upper bound, DIV)."""
    matrix = cosine_matrix(a, a)
    n = matrix.shape[0]
    if n < 2:
        raise UserError("a within-set score needs at least 2 images.")
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1)))


def paired_cosine(a, b) -> float:
    """Mean of cos(a_i, b_i) (CLIP-T: each image with its own prompt)."""
    return float((_unit(a) * _unit(b)).sum(dim=-1).mean())


def diversity(features, groups: Sequence[str]) -> float:
    """DIV: 1 − mean within-prompt cosine, averaged over prompts with at least 2 images."""
    features = torch.as_tensor(features, dtype=torch.float64)
    scores = []
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        if len(members) >= 2:
            scores.append(1.0 - mean_cosine_within(features[members]))
    if not scores:
        raise UserError("DIV needs at least 2 images of the same prompt.")
    return float(np.mean(scores))


def strip_identifier(prompt: str, identifier: str) -> str:
    if not identifier:
        return prompt
    return re.sub(rf"\s*\b{re.escape(identifier)}\b", "", prompt).strip()


# --- evaluator models ----------------------------------------------------------------


@dataclass
class Evaluator:
    kind: str  # "dino" | "clip" | "clip_vision"
    model: Any
    image_size: int
    mean: tuple
    std: tuple
    tokenizer: Any = None
    source: str = ""

    @property
    def has_text(self) -> bool:
        return self.kind == "clip"

    def pixels(self, images: Sequence) -> torch.Tensor:
        """Shorter side to the model's size (bicubic), centre crop, normalise: the processors'
        steps for DINO and CLIP."""
        from PIL import Image

        size, out = self.image_size, []
        for image in images:
            image = image.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            w, h = image.size
            left, top = (w - size) // 2, (h - size) // 2
            array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
            out.append((array - np.array(self.mean, np.float32)) / np.array(self.std, np.float32))
        return torch.from_numpy(np.stack(out).transpose(0, 3, 1, 2))

    @torch.no_grad()
    def image_features(self, images: Sequence, batch: int = 16) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), batch):
            pixels = self.pixels(images[start:start + batch]).to(next(self.model.parameters()).dtype)
            if self.kind == "dino":
                rows.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])  # the CLS token
            else:
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                rows.append(self.model.visual_projection(pooled))
        return torch.cat(rows).float()

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        if not self.has_text:
            raise UserError(f"{self.source}: an image-only CLIP (clip_vision) cannot score prompts; give a full CLIP "
                            "folder for CLIP-T.")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.model.config.text_config.max_position_embeddings,
                             truncation=True, return_tensors="pt").input_ids
        return self.model.text_projection(self.model.text_model(input_ids=ids).pooler_output).float()


def _preprocessor(folder: Path, default_mean, default_std, default_size) -> tuple[int, tuple, tuple]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return default_size, default_mean, default_std
    config = json.loads(path.read_text())
    size = config.get("crop_size") or config.get("size") or default_size
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or default_size
    return int(size), tuple(config.get("image_mean", default_mean)), tuple(config.get("image_std", default_std))


def load_evaluator(path: str | Path, kind: str) -> Evaluator:
    """``kind`` "dino": a ViT/DINOv2 folder. "clip": a CLIP folder (config.json with model_type
    clip or clip_vision_model) or a ComfyUI ``clip_vision`` .safetensors file."""
    import transformers

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such evaluator model; pass a local folder (saved with save_pretrained) or "
                        "a ComfyUI models/clip_vision file. Nothing is downloaded.")
    if path.is_file():
        if kind != "clip" or path.suffix != ".safetensors":
            raise UserError(f"{path}: a single file works only as a ComfyUI clip_vision model (--clip); DINO needs a "
                            "folder with config.json.")
        return _clip_vision_file(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: has no config.json; save the evaluator with save_pretrained into it.")
    model_type = json.loads(config_path.read_text()).get("model_type", "")
    try:
        if kind == "dino":
            classes = {"vit": transformers.ViTModel, "dinov2": transformers.Dinov2Model}
            if model_type not in classes:
                raise UserError(f"{path}: a {model_type or 'unknown'} model, not a DINO ViT (vit or dinov2).")
            model = classes[model_type].from_pretrained(path, local_files_only=True, add_pooling_layer=False) \
                if model_type == "vit" else classes[model_type].from_pretrained(path, local_files_only=True)
            size, mean, std = _preprocessor(path, IMAGENET_MEAN, IMAGENET_STD, model.config.image_size)
            return Evaluator("dino", model.eval(), size, mean, std, source=str(path))
        if model_type == "clip":
            model = transformers.CLIPModel.from_pretrained(path, local_files_only=True)
            tokenizer = _clip_tokenizer(path)
            size, mean, std = _preprocessor(path, CLIP_MEAN, CLIP_STD, model.config.vision_config.image_size)
            return Evaluator("clip", model.eval(), size, mean, std, tokenizer, str(path))
        if model_type == "clip_vision_model":
            model = transformers.CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
            size, mean, std = _preprocessor(path, CLIP_MEAN, CLIP_STD, model.config.image_size)
            return Evaluator("clip_vision", model.eval(), size, mean, std, source=str(path))
    except OSError as err:
        raise UserError(f"{path}: could not load the evaluator ({err}).") from None
    raise UserError(f"{path}: a {model_type or 'unknown'} model, not CLIP (clip or clip_vision_model).")


def load_evaluators(dino_path: str, clip_path: str) -> tuple[Any, Any]:
    """(DINO, CLIP) evaluators from the --dino/--clip paths; None for a path left empty."""
    dino = load_evaluator(dino_path, "dino") if dino_path else None
    clip = load_evaluator(clip_path, "clip") if clip_path else None
    return dino, clip


def _clip_tokenizer(folder: Path):
    """The folder's own tokenizer, else CLIP's BPE shipped with the pack (the same vocabulary)."""
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


def _clip_vision_file(path: Path) -> Evaluator:
    """A ComfyUI clip_vision file (transformers key names): the config follows from the shapes."""
    import transformers
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise UserError(f"{path}: not a readable safetensors file ({err}).") from None
    state = {k.removeprefix("clip_vision."): v for k, v in state.items()}
    try:
        patch = state["vision_model.embeddings.patch_embedding.weight"]
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        projection = state["visual_projection.weight"]
        fc1 = state["vision_model.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as err:
        raise UserError(f"{path}: not a CLIP vision model in the transformers layout (missing {err}).") from None
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
    # Not in the weights, so from the models ComfyUI ships: OpenAI's ViT-L/14 uses quick_gelu, the
    # OpenCLIP ViT-H/G use gelu; the large ones have 16 heads, ViT-B widths 64 per head.
    activation = "quick_gelu" if (hidden, layers, patch_size) == (1024, 24, 14) else "gelu"
    heads = 16 if hidden >= 1024 else max(1, hidden // 64)
    config = transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=fc1.shape[0], num_hidden_layers=layers,
                                           num_attention_heads=heads, patch_size=patch_size,
                                           image_size=int(round((positions - 1) ** 0.5)) * patch_size,
                                           projection_dim=projection.shape[0], hidden_act=activation)
    model = transformers.CLIPVisionModelWithProjection(config)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if "position_ids" not in k}, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise UserError(f"{path}: {len(missing)} CLIP vision weights missing (e.g. {missing[0]!r}).")
    return Evaluator("clip_vision", model.eval().float(), config.image_size, CLIP_MEAN, CLIP_STD, source=str(path))


# --- evaluating image sets ------------------------------------------------------------


def read_images(folder: str | Path, skipped: list | None = None) -> list[tuple[Path, Any]]:
    """Every image in ``folder`` (checked as the dataset stage checks them), with its path; an
    unusable file is left out and, when ``skipped`` is given, listed there with its reason."""

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of images.")
    found = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            found.append((path, to_rgb(open_image(path), "white")[0]))
        except UserError as err:
            if skipped is not None:
                skipped.append((path, str(err)))
    if not found:
        raise UserError(f"{folder}: holds no readable image.")
    return found


def image_prompt(path: Path) -> str | None:
    """The prompt an image was made with, from its A1111 ``parameters`` text (LoRA tags removed)."""
    text = png_parameters(path, required=False)
    return read_parameters(text)["prompt"] if text else None


@dataclass
class Scores:
    values: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    real: dict[str, float] = field(default_factory=dict)  # real-image upper bounds

    def table(self) -> str:
        names = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}
        lines = [f"{'metric':<8} {'value':>7} {'real':>7}  images"]
        for key, name in names.items():
            if key in self.values:
                real = f"{self.real[key]:.3f}" if key in self.real else "-"
                lines.append(f"{name:<8} {self.values[key]:>7.3f} {real:>7}  {self.counts[key]}")
        return "\n".join(lines)


def evaluate(generated: Sequence[tuple[Any, str]], real: Sequence[Any], dino: Evaluator | None = None,
             clip: Evaluator | None = None, identifier: str = "",
             class_generated: Sequence[Any] = ()) -> Scores:
    """``generated``: (image, prompt it was made with) pairs; ``real``: the subject's photos;
    ``class_generated``: images of the bare class prompt made with the LoRA (for PRES)."""
    if dino is None and clip is None:
        raise UserError("no evaluator model: pass --dino (a local DINO ViT folder) and/or --clip (a local CLIP "
                        "folder or ComfyUI clip_vision file). Nothing is downloaded.")
    images = [image for image, _ in generated]
    prompts = [prompt for _, prompt in generated]
    scores = Scores()
    if dino is not None:
        gen, ref = dino.image_features(images), dino.image_features(real)
        scores.values["dino"], scores.counts["dino"] = mean_pairwise_cosine(gen, ref), len(images)
        if len(real) > 1:
            scores.real["dino"] = mean_cosine_within(ref)
        if any(prompts.count(p) > 1 for p in prompts):
            scores.values["div"], scores.counts["div"] = diversity(gen, prompts), len(images)
            if len(real) > 1:
                scores.real["div"] = 1.0 - mean_cosine_within(ref)
        if class_generated:
            scores.values["pres"] = mean_pairwise_cosine(dino.image_features(class_generated), ref)
            scores.counts["pres"] = len(class_generated)
    if clip is not None:
        gen, ref = clip.image_features(images), clip.image_features(real)
        scores.values["clip_i"], scores.counts["clip_i"] = mean_pairwise_cosine(gen, ref), len(images)
        if len(real) > 1:
            scores.real["clip_i"] = mean_cosine_within(ref)
        if clip.has_text and all(prompts):
            text = clip.text_features([strip_identifier(p, identifier) for p in prompts])
            scores.values["clip_t"], scores.counts["clip_t"] = paired_cosine(gen, text), len(images)
    return scores

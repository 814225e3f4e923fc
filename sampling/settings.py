"""What one image is made with, and how it is recorded in (and read back from) its PNG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UserError
from ..runtime.files import fingerprint
from ..runtime.parameters import HASH_LENGTH, ImageParameters, format_parameters, hashes_field, read_parameters
from ..runtime.pipeline import A1111_SAMPLERS
from .patch import LoraChoice


@dataclass
class SampleSettings:
    prompt: str = "a photo of sks dog"
    negative: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    width: int = 0  # 0 = the model's native size
    height: int = 0
    sampler: str = "euler_a"
    batch: int = 1
    loras: list[LoraChoice] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)  # embedding files (textual inversion) the prompts may use

    @classmethod
    def from_options(cls, values: dict, loras: Iterable[LoraChoice] = (), embeddings: Iterable[str] = ()) -> "SampleSettings":
        return cls(**{k: values[k] for k in ("prompt", "negative", "seed", "steps", "guidance", "width", "height",
                                             "sampler", "batch")}, loras=list(loras), embeddings=list(embeddings))



    def parameters(self, seed: int, width: int, height: int, model_name: str, model_hash: str,
                   lora_hashes: dict[str, str], ti_hashes: dict[str, str] | None = None, prompt: str | None = None,
                   negative: str | None = None) -> ImageParameters:
        """The record of image ``seed`` of these settings (prompts as A1111 writes them, if given)."""
        return ImageParameters(
            prompt=self.prompt if prompt is None else prompt, negative=self.negative if negative is None else negative,
            seed=seed, steps=self.steps, sampler=self.sampler, guidance=self.guidance, width=width, height=height,
            model_name=model_name, model_hash=model_hash,
            loras=[(c.name, c.unet_scale, c.te_scale) for c in self.loras], lora_hashes=dict(lora_hashes),
            ti_hashes=dict(ti_hashes or {}))


def parameters_text(settings: SampleSettings, seed: int, width: int, height: int, model_name: str,
                    model_hash: str, lora_hashes: dict[str, str], ti_hashes: dict[str, str] | None = None,
                    prompt: str | None = None, negative: str | None = None) -> str:
    """A1111's ``parameters`` text for image ``seed`` of ``settings``."""
    return format_parameters(settings.parameters(seed, width, height, model_name, model_hash, lora_hashes, ti_hashes,
                                                 prompt, negative))


def settings_from_parameters(text: str, lora_dirs: Sequence[str | Path] = (),
                             embedding_dirs: Sequence[str | Path] = ()) -> SampleSettings:
    """The settings that made an image, from its ``parameters`` text. LoRA tags are found as
    NAME.safetensors in ``lora_dirs`` or, by their recorded hash, anywhere below them; the
    embeddings of ``TI hashes`` the same way in ``embedding_dirs`` (and ``lora_dirs``)."""
    parsed = read_parameters(text)
    fields = parsed["fields"]
    try:
        width, height = (int(v) for v in fields["Size"].split("x"))
        settings = SampleSettings(prompt=parsed["prompt"], negative=parsed["negative"], seed=int(fields["Seed"]),
                                  steps=int(fields["Steps"]), guidance=float(fields["CFG scale"]), width=width,
                                  height=height, sampler=A1111_SAMPLERS[fields["Sampler"]], batch=1)
    except (KeyError, ValueError) as err:
        raise UserError(f"the image's parameters lack or garble {err}; it was not made by an A1111-style sampler.") from None
    hashes = hashes_field(fields, "Lora hashes")
    candidates = [p for d in lora_dirs for p in sorted(Path(d).expanduser().rglob("*.safetensors"))]
    for name, unet, te in parsed["loras"]:
        found = [p for d in lora_dirs if (p := Path(d).expanduser() / f"{name}.safetensors").is_file()]
        if not found and name in hashes:
            found = [p for p in candidates if fingerprint(p)[:HASH_LENGTH] == hashes[name]]
        if not found:
            where = ", ".join(str(d) for d in lora_dirs) or "nowhere (pass --lora-dir)"
            raise UserError(f"LoRA {name!r} of the image is not in {where}; pass the folder that holds it.")
        settings.loras.append(LoraChoice(str(found[0]), unet, te))
    ti_hashes = hashes_field(fields, "TI hashes")
    dirs = [*embedding_dirs, *lora_dirs]
    for name, digest in ti_hashes.items():
        found = [p for d in dirs if (p := Path(d).expanduser() / f"{name}.safetensors").is_file()]
        if not found:
            found = [p for d in dirs for p in sorted(Path(d).expanduser().rglob("*.safetensors"))
                     if fingerprint(p)[:HASH_LENGTH] == digest]
        if not found:
            where = ", ".join(str(d) for d in dirs) or "nowhere (pass --embedding-dir)"
            raise UserError(f"embedding {name!r} of the image is not in {where}; pass the folder that holds it.")
        settings.embeddings.append(str(found[0]))
    return settings



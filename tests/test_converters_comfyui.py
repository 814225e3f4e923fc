"""Our kohya files in the real ComfyUI: every key mapped, and the same numbers as PEFT."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lora.converters import keys
from dreambooth_lora.converters.kohya import save_kohya, to_kohya
from dreambooth_lora.converters.peft import from_peft
from dreambooth_lora.converters.structure import unet_layout_of
from dreambooth_lora.fixtures.adapters import TEXT, UNET_ATTENTION, UNET_CONV, add_random_lora
from dreambooth_lora.models import families, layouts
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.runtime.peft import peft_state

CLIP_NAMES = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}  # ComfyUI's text-encoder names


def _comfy_key_maps(model, checkpoint_path):
    """ComfyUI's own LoRA key maps (comfy.lora.model_lora_keys_unet / _clip), computed from
    stand-ins that expose what those functions read: state_dict() keys and the UNet config."""
    import comfy.lora
    import comfy.model_detection

    file_state = load_file(str(checkpoint_path))
    unet_sd = {"diffusion_model." + k[len(layouts.UNET_PREFIX):]: v for k, v in file_state.items()
               if k.startswith(layouts.UNET_PREFIX)}
    unet_config = comfy.model_detection.detect_unet_config(file_state, layouts.UNET_PREFIX)
    fake_unet = SimpleNamespace(state_dict=lambda: unet_sd, model_config=SimpleNamespace(unet_config=unet_config))
    clip_sd = {}
    for clip_name, encoder in zip(CLIP_NAMES[model.family], model.text_encoders):
        for key, tensor in encoder.state_dict().items():
            clip_sd[f"{clip_name}.transformer.text_model.{layouts.strip_text_model(key)}"] = tensor
    key_map = comfy.lora.model_lora_keys_unet(fake_unet, {})
    comfy.lora.model_lora_keys_clip(SimpleNamespace(state_dict=lambda: clip_sd), key_map)
    return key_map


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2-tiny", "sdxl-tiny"])
def test_every_exported_key_is_one_comfyui_maps(comfy, tiny, name):
    model = load_base_model(tiny[name])
    key_map = _comfy_key_maps(model, tiny[name])  # of the plain model, before PEFT wraps its layers
    peft = {"unet": (None, add_random_lora(model.unet, UNET_ATTENTION + UNET_CONV, 4, 4.0, 0))}
    peft["unet"] = (peft_state(model.unet), peft["unet"][1])
    for component, encoder in zip(families.family(model.family).components[1:], model.text_encoders):
        config = add_random_lora(encoder, TEXT, 4, 4.0, 1)
        peft[component] = (peft_state(encoder), config)
    adapter = from_peft(model.family, unet_layout_of(model.unet.config), peft)
    exported = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in to_kohya(adapter)}
    missing = sorted(exported - key_map.keys())
    assert not missing, f"{len(missing)} of {len(exported)} not mapped by ComfyUI, e.g. {missing[:3]}"
    # and each lands on the module we meant
    for module in adapter.modules.values():
        name_ = keys.kohya_name(model.family, module.component, module.path, adapter.unet_layout)
        if module.component == "unet":
            expected = layouts.unet_key_to_ldm(module.path + ".weight", model.unet.config.layers_per_block,
                                               [t.startswith("CrossAttn") for t in model.unet.config.up_block_types])
            assert key_map[name_] == "diffusion_model." + expected[len(layouts.UNET_PREFIX):], name_
        else:
            clip = CLIP_NAMES[model.family][families.family(model.family).components.index(module.component) - 1]
            assert key_map[name_] == f"{clip}.transformer.text_model.{module.path}.weight", name_


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def full_size(comfy, sd15_full):
    """The full-size SD1.5 fixture with a random LoRA (attention + LoCon, and the text encoder)."""
    model = load_base_model(sd15_full, dtype="fp32")
    unet_config = add_random_lora(model.unet, UNET_ATTENTION + UNET_CONV, 8, 4.0, 0)
    text_config = add_random_lora(model.text_encoders[0], TEXT, 8, 8.0, 1)
    adapter = from_peft("sd1", unet_layout_of(model.unet.config),
                           {"unet": (peft_state(model.unet), unet_config),
                            "text_encoder": (peft_state(model.text_encoders[0]), text_config)})
    return model, adapter


@pytest.mark.parametrize("unet_strength,te_strength", [(0.75, 0.4), (0.0, 1.0), (1.0, 0.0)])
def test_comfyui_loads_every_key_and_matches_peft(full_size, sd15_full, tmp_path, unet_strength, te_strength):
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    model, adapter = full_size
    path = save_kohya(adapter, tmp_path / "lora.safetensors", dtype="fp32")
    # The comparison is in fp32, as the issue asks. On CPU, ComfyUI keeps CLIP weights in
    # fp16 and rounds the patched weights to it (measured: 2e-4 relative per weight, 6e-4 on
    # the output); asking for an fp32 text encoder removes that rounding.
    unet, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_full), output_vae=False,
                                                             te_model_options={"dtype": torch.float32})
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        patched_unet, patched_clip = comfy.sd.load_lora_for_models(unet, clip, lora, unet_strength, te_strength)
        comfy.model_management.load_models_gpu([patched_unet, patched_clip.patcher])
    finally:
        logging.getLogger().removeHandler(records)
    problems = [m for m in records.messages if "not loaded" in m.lower() or "error lora" in m.lower()]
    assert problems == [], problems[:5]
    assert len(lora) == 3 * 350  # 278 UNet (with LoCon) + 72 text-encoder modules

    from peft.tuners.lora import LoraLayer

    layers = [layer for m in (model.unet, model.text_encoders[0]) for layer in m.modules() if isinstance(layer, LoraLayer)]
    saved = [dict(layer.scaling) for layer in layers]
    try:
        for layer in model.unet.modules():
            if isinstance(layer, LoraLayer):
                layer.scaling = {k: v * unet_strength for k, v in layer.scaling.items()}
        for layer in model.text_encoders[0].modules():
            if isinstance(layer, LoraLayer):
                layer.scaling = {k: v * te_strength for k, v in layer.scaling.items()}
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 16, 16, generator=generator)
        timestep = torch.tensor([500.0])
        context = torch.randn(1, 77, 768, generator=generator)
        ids = model.tokenizers[0]("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            ours = model.unet(latents, timestep, encoder_hidden_states=context).sample
            theirs = patched_unet.model.diffusion_model(latents, timestep, context=context)
            our_text = model.text_encoders[0](ids).last_hidden_state
            their_text = patched_clip.encode_from_tokens(patched_clip.tokenize("a photo of sks dog"))
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling = scaling
    unet_error = float((ours - theirs).norm() / ours.norm())
    text_error = float((our_text - their_text).norm() / our_text.norm())
    print(f"\nstrengths unet={unet_strength} te={te_strength}: UNet rel. error {unet_error:.2e}, text encoder {text_error:.2e}")
    assert unet_error < 1e-3 and text_error < 1e-3


# --- LoHa, LoKr, DoRA through ComfyUI's own weight adapters ------------------------------

from dreambooth_lora.fixtures.adapters import ALGORITHMS, add_random_adapter, algorithm_config  # noqa: E402

# ComfyUI 0.3.75 normalises output-axis DoRA by ||W|| where peft uses ||W + ΔW|| (open upstream
# fix: ComfyUI PR #15458), so DoRA is only approximate there; measured on the tiny models below.
DORA_TOLERANCE = 0.05


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2-tiny", "sdxl-tiny"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_comfyui_patches_each_layer_like_peft(comfy, tiny, name, algorithm):
    """Every exported module through comfy.lora.load_lora + calculate_weight (what LoraLoader runs)
    equals the layer PEFT merges itself."""
    import comfy.lora
    from peft.tuners.tuners_utils import BaseTunerLayer

    clean = load_base_model(tiny[name])
    key_map = _comfy_key_maps(clean, tiny[name])
    clean_weights = {}
    for component, module in zip(families.family(clean.family).components, [clean.unet, *clean.text_encoders]):
        for path, child in module.named_modules():
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                clean_weights[(component, keys.canonical_path(component, path))] = child.weight.detach()

    model = load_base_model(tiny[name])
    peft, layers = {}, {}
    modules = [("unet", model.unet, UNET_ATTENTION + UNET_CONV)] + [
        (c, e, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
        for c, e in zip(families.family(model.family).components[1:], model.text_encoders)]
    for seed, (component, module, targets) in enumerate(modules):
        config = add_random_adapter(module, algorithm_config(algorithm, targets), seed)
        peft[component] = (peft_state(module), config)
        for path, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer):
                layers[(component, keys.canonical_path(component, path))] = layer
    adapter = from_peft(model.family, unet_layout_of(model.unet.config), peft)
    tensors = to_kohya(adapter, torch.float32)

    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        patches = comfy.lora.load_lora(tensors, key_map)
        errors = {}
        for key, module in adapter.modules.items():
            target = key_map[keys.kohya_name(model.family, module.component, module.path, adapter.unet_layout)]
            base = clean_weights[key].float()
            theirs = comfy.lora.calculate_weight([(1.0, patches[target], 1.0, None, None)], base.clone(), target)
            layer = layers[key]
            with torch.no_grad():
                layer.merge()
                merged = layer.get_base_layer().weight.detach().float().clone()
                layer.unmerge()
            errors[key] = float((theirs - merged).norm() / (merged - base).norm())
    finally:
        logging.getLogger().removeHandler(records)
    assert not [m for m in records.messages if "not loaded" in m.lower() or "error" in m.lower()], records.messages[:3]
    assert len(patches) == len(adapter.modules)
    worst = max(errors.values())
    print(f"\n{name} {algorithm}: {len(errors)} layers, worst relative error of the change {worst:.1e}")
    assert worst < (DORA_TOLERANCE if algorithm == "dora" else 1e-4), max(errors, key=errors.get)

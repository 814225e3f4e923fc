"""LoRA conversion PEFT ⇄ kohya ⇄ diffusers on the tiny SD1 / SD2 / SDXL fixtures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dreambooth_lora.cli import main
from dreambooth_lora.converters import keys
from dreambooth_lora.converters.adapter import LoraFormatError
from dreambooth_lora.converters.diffusers import save_peft
from dreambooth_lora.converters.files import detect_family, load_adapter
from dreambooth_lora.converters.kohya import save_kohya, to_kohya
from dreambooth_lora.converters.metadata import data_sha256
from dreambooth_lora.converters.peft import from_peft, inject, to_peft
from dreambooth_lora.converters.structure import structure_of_base, unet_layout_of
from dreambooth_lora.errors import UserError
from dreambooth_lora.fixtures.adapters import TEXT, UNET_ATTENTION, UNET_CONV, add_random_lora
from dreambooth_lora.models import families
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.runtime.files import confined_name
from dreambooth_lora.runtime.peft import peft_state

FAMILIES = {"sd1-tiny": "sd1", "sd2-tiny": "sd2", "sdxl-tiny": "sdxl"}


def _with_lora(path, use_rslora=False):
    """A tiny base with random LoRAs on the UNet (attention + LoCon convs, mixed ranks and
    alphas) and on every text encoder; returns (model, adapter, {component: (state, config)})."""
    model = load_base_model(path)
    peft = {"unet": (None, add_random_lora(model.unet, UNET_ATTENTION + UNET_CONV, 4, 2.0, 0,
                                           rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 3.0},
                                           use_rslora=use_rslora))}
    peft["unet"] = (peft_state(model.unet), peft["unet"][1])
    for index, (component, encoder) in enumerate(zip(families.family(model.family).components[1:], model.text_encoders)):
        config = add_random_lora(encoder, TEXT, 4, 8.0, 1 + index)
        peft[component] = (peft_state(encoder), config)
    adapter = from_peft(model.family, unet_layout_of(model.unet.config), peft)
    return model, adapter, peft


def _model_paths(model, component):
    module = model.unet if component == "unet" else model.text_encoders[families.family(model.family).components.index(component) - 1]
    return {name for name, _ in module.named_modules()}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_kohya_peft_round_trip_is_exact(tiny, tmp_path, name, use_rslora):
    model, adapter, peft = _with_lora(tiny[name], use_rslora)
    path = save_kohya(adapter, tmp_path / "lora.safetensors", dtype="fp32")
    back = load_adapter(path, structure_of_base(model))
    assert back.modules.keys() == adapter.modules.keys()
    for component, (state, config) in peft.items():
        round_state, round_config = to_peft(back, component, _model_paths(model, component))
        assert round_state.keys() == state.keys(), component
        for key, tensor in state.items():
            assert torch.equal(round_state[key], tensor), key
    # the effective scale of every module survives (alpha ≠ rank, per-module alphas, rsLoRA)
    for key, module in adapter.modules.items():
        assert back.modules[key].scale == pytest.approx(module.scale, rel=1e-6), key
    to_k = next(m for k, m in back.modules.items() if k[1].endswith("attn1.to_k"))
    assert to_k.scale == pytest.approx(3.0 / (2.0 if use_rslora else 4.0))


def test_kohya_names_are_what_kohya_writes(tiny, tmp_path):
    names = {}
    for name in FAMILIES:
        _, adapter, _ = _with_lora(tiny[name])
        path = save_kohya(adapter, tmp_path / f"{name}.safetensors")
        with safe_open(str(path), "pt") as handle:
            names[name] = set(handle.keys())
            assert {str(handle.get_tensor(k).dtype) for k in handle.keys() if k.endswith(".alpha")} == {"torch.float32"}
            assert {str(handle.get_tensor(k).dtype) for k in handle.keys() if not k.endswith(".alpha")} == {"torch.float16"}
    # SD1/SD2: diffusers module names, lora_te_text_model_…
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in names["sd1-tiny"]
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in names["sd1-tiny"]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in names["sd2-tiny"]
    for name in ("sd1-tiny", "sd2-tiny"):
        assert all(k.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_text_model_"))
                   for k in names[name])
    # SDXL: LDM module names, lora_te1_/lora_te2_
    xl = names["sdxl-tiny"]
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight" in xl  # tiny: 1 block per level
    assert "lora_unet_output_blocks_1_2_conv.lora_down.weight" in xl  # upsampler after the attention
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in xl)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in xl)
    assert not any("down_blocks" in k or "up_blocks" in k for k in xl)


@pytest.mark.parametrize("name,base_version,v2,arch", [
    ("sd1-tiny", "sd_v1", "False", "stable-diffusion-v1/lora"),
    ("sd2-tiny", "sd_v2", "True", "stable-diffusion-v2-512/lora"),
    ("sdxl-tiny", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora"),
])
def test_metadata_lets_a1111_classify_the_lora(tiny, tmp_path, name, base_version, v2, arch):
    _, adapter, _ = _with_lora(tiny[name])
    path = save_kohya(adapter, tmp_path / "x.safetensors", output_name="sks_dog_v1", trigger_phrase="sks dog",
                         hyperparameters={"rank": 4, "steps": 800})
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    assert meta["ss_base_model_version"] == base_version and meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == arch
    assert meta["ss_output_name"] == "sks_dog_v1" and meta["modelspec.trigger_phrase"] == "sks dog"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}  # most 3x3 convs: rank 4
    assert json.loads(meta["dreambooth_lora.hyperparameters"]) == {"rank": 4, "steps": 800}
    # the hash users compare covers the tensors only, as kohya's sshs_model_hash does
    assert meta["sshs_model_hash"] == data_sha256(tensors)
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    # A1111's detect_version(): "sdxl_" prefix → SDXL, ss_v2 == "True" → SD2, else SD1
    detected = "sdxl" if meta["ss_base_model_version"].startswith("sdxl_") else "sd2" if meta["ss_v2"] == "True" else "sd1"
    assert detected == FAMILIES[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_diffusers_file_keeps_alpha_and_rank(tiny, tmp_path, name):
    model, adapter, _ = _with_lora(tiny[name])
    path = save_peft(adapter, tmp_path / "peft.safetensors", dtype="fp32")
    with safe_open(str(path), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
        assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in handle.keys())
    assert config["unet.lora_alpha"] == 2.0 and config["unet.r"] == 4
    back = load_adapter(path, structure_of_base(model))
    assert back.modules.keys() == adapter.modules.keys()
    for key, module in adapter.modules.items():
        assert back.modules[key].scale == pytest.approx(module.scale, rel=1e-6), key
        assert torch.equal(back.modules[key].tensors["lora_down"], module.tensors["lora_down"])


def test_convert_cli_both_ways_and_lora_info(tiny, tmp_path, capsys):
    _, adapter, _ = _with_lora(tiny["sd1-tiny"])
    kohya = save_kohya(adapter, tmp_path / "a.safetensors", dtype="fp32", output_name="mine")
    base = str(tiny["sd1-tiny"])
    assert main(["convert", str(kohya), str(tmp_path / "b.safetensors"), "--to", "peft", "--base", base, "--dtype", "fp32"]) == 0
    assert main(["convert", str(tmp_path / "b.safetensors"), str(tmp_path / "c.safetensors"), "--base", base, "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "kohya LoRA for SD1.x, 91 modules (text_encoder 12, unet 79), rank 4, alpha 2.0, fp16" in out
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as c, safe_open(str(kohya), "pt") as a:
        assert set(c.keys()) == set(a.keys())
        for key in a.keys():  # fp32 → peft → fp16: equal up to fp16 rounding
            assert torch.allclose(c.get_tensor(key).float(), a.get_tensor(key), rtol=1e-3, atol=1e-4), key
    assert main(["lora-info", str(kohya), "--base", base, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"] == {"unet": 79, "text_encoder": 12} and info["ranks"] == {"4": 83, "2": 8}
    assert info["metadata"]["ss_output_name"] == "mine"
    # refuses to overwrite unless asked
    assert main(["convert", str(kohya), str(tmp_path / "c.safetensors"), "--base", base]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(kohya), str(tmp_path / "c.safetensors"), "--base", base, "--overwrite"]) == 0


def test_family_is_read_from_real_sizes(tmp_path):
    """Without --base, the family comes from the LoRA's own shapes (real SD sizes)."""
    lora = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 1024),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4)}
    from safetensors.torch import save_file

    save_file(lora, str(tmp_path / "sd2.safetensors"))
    assert detect_family(tmp_path / "sd2.safetensors") == "sd2"


def test_lora_for_another_family_is_refused(tiny, tmp_path):
    _, xl_adapter, _ = _with_lora(tiny["sdxl-tiny"])
    xl_file = save_kohya(xl_adapter, tmp_path / "xl.safetensors")
    sd1 = load_base_model(tiny["sd1-tiny"])
    with pytest.raises(LoraFormatError, match=r"xl.safetensors: a LoRA for SDXL, but the base model is SD1.x; use it with a SDXL checkpoint"):
        load_adapter(xl_file, structure_of_base(sd1))
    _, sd2_adapter, _ = _with_lora(tiny["sd2-tiny"])
    sd2_file = save_kohya(sd2_adapter, tmp_path / "sd2.safetensors")
    with pytest.raises(LoraFormatError, match=r"sd2.safetensors: \d+ of 91 LoRA modules match no layer of the SD1.x base"):
        load_adapter(sd2_file, structure_of_base(sd1))


@pytest.mark.parametrize("name", ["../escape.safetensors", "/tmp/abs.safetensors", "sub/dir.safetensors", "", ".."])
def test_output_names_cannot_leave_the_folder(tmp_path, name):
    with pytest.raises(UserError, match="give a plain file name"):
        confined_name(tmp_path, name)
    assert confined_name(tmp_path, "ok.safetensors") == (tmp_path / "ok.safetensors").resolve()


def test_bad_lora_files(tmp_path, tiny):
    structure = structure_of_base(load_base_model(tiny["sd1-tiny"]))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "notes.safetensors").write_text("not a model\n" * 10)
    (tmp_path / "old.pt").write_bytes(b"\x80\x02}q\x00.")
    cases = {"empty.safetensors": "the file is empty", "notes.safetensors": "not a readable safetensors file",
             "old.pt": "only .safetensors LoRA files are read", "missing.safetensors": "no such file"}
    for file, phrase in cases.items():
        with pytest.raises(LoraFormatError, match=phrase):
            load_adapter(tmp_path / file, structure)
    with pytest.raises(LoraFormatError, match="a full checkpoint, not a LoRA"):
        load_adapter(tiny["sd1-tiny"], structure)


def test_interrupted_write_leaves_no_file(tmp_path, tiny, monkeypatch):
    _, adapter, _ = _with_lora(tiny["sd1-tiny"])
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_kohya(adapter, tmp_path / "lora.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- LoHa, LoKr, DoRA ------------------------------------------------------------------

from dreambooth_lora.fixtures.adapters import ALGORITHMS, add_random_adapter, algorithm_config  # noqa: E402

# exports that rewrite tensors so every loader computes the same delta
REWRITTEN = {"lokr-full": "PEFT's alpha/r folded into lokr_w1 (loaders use scale 1 without a decomposed factor)",
             "lokr-tucker": "lokr_t2 folded into a full lokr_w2 (ComfyUI 0.3.75 fails on Tucker LoKr)"}


def _peft_layers(module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)}


def with_adapter(path, algorithm):
    model = load_base_model(path)
    peft = {}
    modules = [("unet", model.unet, UNET_ATTENTION + UNET_CONV)] + [
        (c, e, TEXT) for c, e in zip(families.family(model.family).components[1:], model.text_encoders)]
    for seed, (component, module, targets) in enumerate(modules):
        config = add_random_adapter(module, algorithm_config(algorithm, targets), seed)
        peft[component] = (peft_state(module), config)
    adapter = from_peft(model.family, unet_layout_of(model.unet.config), peft)
    return model, adapter, peft, modules


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_round_trips(tiny, tmp_path, name, algorithm):
    model, adapter, peft, modules = with_adapter(tiny[name], algorithm)
    path = save_kohya(adapter, tmp_path / "x.safetensors", dtype="fp32")
    back = load_adapter(path, structure_of_base(model))
    assert back.modules.keys() == adapter.modules.keys()
    expected_algo = algorithm.split("-")[0].replace("dora", "lora")
    assert {m.algorithm for m in back.modules.values()} == {expected_algo}
    if algorithm not in REWRITTEN:  # tensors come back bit for bit
        for component, (state, _) in peft.items():
            round_state, _ = to_peft(back, component, _model_paths(model, component))
            assert round_state.keys() == state.keys(), component
            for key, tensor in state.items():
                assert torch.equal(round_state[key], tensor), key
    if algorithm == "dora":
        return  # DoRA also renormalises W: its delta is not additive (checked against ComfyUI elsewhere)
    # and every layer's delta equals PEFT's own get_delta_weight
    for component, module, _ in modules:
        for layer_path, layer in _peft_layers(module).items():
            ours = back.modules[(component, keys.canonical_path(component, layer_path))]
            theirs = layer.get_delta_weight("default").detach().float()
            error = float((ours.delta(tuple(theirs.shape)) - theirs).norm() / theirs.norm())
            assert error < 1e-5, (layer_path, error)


def test_lycoris_metadata(tiny, tmp_path):
    for algorithm, module_name, args in [("loha", "lycoris.kohya", {"algo": "loha"}), ("dora", "networks.lora", {"dora_wd": "True"})]:
        _, adapter, _, _ = with_adapter(tiny["sd1-tiny"], algorithm)
        path = save_kohya(adapter, tmp_path / f"{algorithm}.safetensors")
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
            if algorithm == "dora":
                scales = [k for k in handle.keys() if k.endswith(".dora_scale")]
                assert scales and all(handle.get_tensor(k).dtype == torch.float32 for k in scales)
                assert all(handle.get_tensor(k).shape[1:] in ((1,), (1, 1, 1)) for k in scales)  # output axis
        assert meta["ss_network_module"] == module_name
        assert {k: v for k, v in json.loads(meta["ss_network_args"]).items() if k in args} == args


# --- files written by other tools ----------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1-tiny", "sdxl-tiny"])
def test_reads_diffusers_save_lora_weights_with_its_adapter_metadata(tiny, tmp_path, name, capsys):
    """A file from diffusers' own save_lora_weights: alpha ≠ rank survives through its
    lora_adapter_metadata, and convert turns it into the same kohya file we would write."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model, adapter, peft = _with_lora(tiny[name])
    layers = {"unet_lora_layers": peft["unet"][0], "text_encoder_lora_layers": peft["text_encoder"][0]}
    meta = {"unet_lora_adapter_metadata": peft["unet"][1], "text_encoder_lora_adapter_metadata": peft["text_encoder"][1]}
    if model.family == "sdxl":
        layers["text_encoder_2_lora_layers"] = peft["text_encoder_2"][0]
        meta["text_encoder_2_lora_adapter_metadata"] = peft["text_encoder_2"][1]
    pipeline = StableDiffusionXLPipeline if model.family == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(str(tmp_path), weight_name="diffusers.safetensors", **layers, **meta)

    back = load_adapter(tmp_path / "diffusers.safetensors", structure_of_base(model))
    assert back.modules.keys() == adapter.modules.keys()
    for key, module in adapter.modules.items():
        assert back.modules[key].scale == pytest.approx(module.scale, rel=1e-6), key  # 2/4, 3/4, 8/4: not 1
        assert torch.equal(back.modules[key].tensors["lora_up"], module.tensors["lora_up"]), key
    assert main(["convert", str(tmp_path / "diffusers.safetensors"), str(tmp_path / "k.safetensors"),
                 "--base", str(tiny[name]), "--dtype", "fp32"]) == 0
    ours = save_kohya(adapter, tmp_path / "ours.safetensors", dtype="fp32")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as a, safe_open(str(ours), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_reads_sd1_files_with_ldm_names_and_te1_prefix(tiny, tmp_path):
    """Some tools write SD1 LoRAs with LDM block names or lora_te1_; ComfyUI and A1111 accept
    them, so we read them onto the same layers."""
    from safetensors.torch import save_file

    model, adapter, _ = _with_lora(tiny["sd1-tiny"])
    renamed = {}
    for key, tensor in to_kohya(adapter, torch.float32).items():
        module, _, rest = key.partition(".")
        for component, path in adapter.modules:
            if keys.kohya_name("sd1", component, path, adapter.unet_layout) == module:
                if component == "unet":
                    module = "lora_unet_" + keys.ldm_module_path(path, adapter.unet_layout).replace(".", "_")
                else:
                    module = module.replace("lora_te_", "lora_te1_")
        renamed[f"{module}.{rest}"] = tensor
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in renamed)
    save_file(renamed, str(tmp_path / "ldm.safetensors"))
    back = load_adapter(tmp_path / "ldm.safetensors", structure_of_base(model))
    assert back.modules.keys() == adapter.modules.keys()
    for key, module in adapter.modules.items():
        assert torch.equal(back.modules[key].tensors["lora_down"], module.tensors["lora_down"])


def test_inject_puts_the_same_lora_back_into_a_model(tiny):
    """An adapter read from a file, injected into a fresh base, computes what the original PEFT model did."""
    model, adapter, _ = _with_lora(tiny["sd1-tiny"])
    fresh = load_base_model(tiny["sd1-tiny"])
    inject(adapter, "unet", fresh.unet)
    inject(adapter, "text_encoder", fresh.text_encoders[0])
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    ids = model.tokenizers[0]("a photo of sks dog", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model.unet(latents, 500, context).sample, fresh.unet(latents, 500, context).sample, atol=1e-6)
        assert torch.allclose(model.text_encoders[0](ids).last_hidden_state, fresh.text_encoders[0](ids).last_hidden_state, atol=1e-6)
    _, loha, _, _ = with_adapter(tiny["sd1-tiny"], "loha")
    with pytest.raises(LoraFormatError, match="applied by merging"):
        inject(loha, "unet", load_base_model(tiny["sd1-tiny"]).unet)

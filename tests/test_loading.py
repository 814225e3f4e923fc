"""Loading base models offline: detection, configs from shapes, exact weights, dtypes, folders."""

from __future__ import annotations

import socket

import pytest
import torch

from dreambooth_lora.fixtures import checkpoints as fx
from dreambooth_lora.models.inspect import inspect
from dreambooth_lora.models.load import load_base_model
from dreambooth_lora.models.save import save_diffusers_folder

EXPECTED = {  # fixture → (family, prediction type, native resolution)
    "sd1-tiny": ("sd1", "epsilon", 512),
    "sd2-tiny": ("sd2", "epsilon", 512),
    "sd2v-tiny": ("sd2", "v_prediction", 768),
    "sdxl-tiny": ("sdxl", "epsilon", 1024),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_detects_family_prediction_and_resolution(tiny, name):
    info = inspect(tiny[name])
    assert (info.family, info.prediction_type, info.resolution) == EXPECTED[name]
    assert info.variant == "standard"
    assert not info.matches_reference_sizes  # tiny widths are reported as non-standard
    assert [s.name for s in info.text_encoders] == (["text_encoder", "text_encoder_2"] if info.family == "sdxl" else ["text_encoder"])


@pytest.mark.parametrize("name", EXPECTED)
def test_loaded_weights_are_exactly_the_written_ones(tiny, name):
    """Writer (diffusers → single file) and loader (single file → diffusers) are inverse."""
    family = EXPECTED[name][0]
    expected = fx.build_state_dicts(family, tiny=True, seed=0)
    model = load_base_model(tiny[name], dtype="fp32")
    loaded = {"unet": model.unet.state_dict(), "vae": model.vae.state_dict()}
    for spec, encoder in zip(model.info.text_encoders, model.text_encoders):
        loaded[spec.name] = encoder.state_dict()
    for component, state in loaded.items():
        reference = expected[component]
        if component.startswith("text_encoder") and family == "sd2":
            # the file holds one more OpenCLIP layer than SD2 uses; the loader must drop it
            reference = {k: v for k, v in reference.items() if ".layers.2." not in k}
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        assert state.keys() == reference.keys(), component
        if name == "sd2v-tiny":  # the v marker overwrote one bias on purpose
            state = {k: v for k, v in state.items() if "norm1.bias" not in k}
        for key, tensor in state.items():
            assert torch.equal(tensor, reference[key]), f"{component}.{key}"


@pytest.mark.parametrize("name", EXPECTED)
def test_derived_configs_match_the_builders(tiny, name):
    family = EXPECTED[name][0]
    unet_cfg, vae_cfg, texts = fx.component_configs(family, tiny=True)
    model = load_base_model(tiny[name])
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "attention_head_dim"):
        assert model.unet.config[key] == (list(unet_cfg[key]) if isinstance(unet_cfg[key], list) else unet_cfg[key]), key
    assert model.unet.config.use_linear_projection == (family != "sd1")
    assert list(model.vae.config.block_out_channels) == vae_cfg["block_out_channels"]
    assert model.vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert model.noise_scheduler.config.prediction_type == EXPECTED[name][1]
    for entry, encoder in zip(texts, model.text_encoders):
        assert type(encoder).__name__ == entry["model_class"]
        assert encoder.config.hidden_act == entry["config"]["hidden_act"]
    if family == "sdxl":
        assert model.unet.config.addition_embed_type == "text_time"
        assert model.unet.config.transformer_layers_per_block == [1, 2]
        assert model.unet.config.projection_class_embeddings_input_dim == 32 + 6 * 8


@pytest.mark.parametrize("name", EXPECTED)
def test_loaded_model_runs_a_denoising_step(tiny, name):
    model = load_base_model(tiny[name])
    tokens = [tok("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
              for tok in model.tokenizers]
    with torch.no_grad():
        outputs = [enc(ids, output_hidden_states=True) for enc, ids in zip(model.text_encoders, tokens)]
        if model.family == "sdxl":
            context = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
            added = {"text_embeds": outputs[1].text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        else:
            context, added = outputs[0].last_hidden_state, None
        latents = model.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        assert latents.shape == (1, 4, 8, 8)
        out = model.unet(latents, torch.tensor([500]), encoder_hidden_states=context,
                         added_cond_kwargs=added).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_tokenizer_is_the_real_clip_vocabulary(tiny):
    sd1 = load_base_model(tiny["sd1-tiny"])
    sd2 = load_base_model(tiny["sd2-tiny"])
    ids = sd1.tokenizers[0]("a photo of sks dog").input_ids
    assert ids == [49406, 320, 1125, 539, 48136, 1929, 49407]  # ids of the public CLIP BPE
    assert sd2.tokenizers[0]("a photo of sks dog").input_ids == ids
    # SD1 pads with <|endoftext|>, OpenCLIP (SD2, SDXL's second encoder) with "!" (id 0)
    assert sd1.tokenizers[0].pad_token_id == 49407
    assert sd2.tokenizers[0].pad_token_id == 0


@pytest.mark.parametrize("dtype,expected", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32),
                                            ("auto", torch.float32)])
def test_dtype_is_selectable(tiny, dtype, expected):
    model = load_base_model(tiny["sdxl-tiny"], dtype=dtype)
    for module in (model.unet, model.vae, *model.text_encoders):
        assert {p.dtype for p in module.parameters()} == {expected}


@pytest.mark.parametrize("marker,evidence", [("key", "v_pred"), ("metadata", "modelspec"), ("stats", "statistics")])
def test_v_prediction_markers(tmp_path, marker, evidence):
    path = fx.build_checkpoint(tmp_path / f"{marker}.safetensors", "sd2", prediction_type="v_prediction", v_marker=marker)
    info = inspect(path)
    assert info.prediction_type == "v_prediction" and evidence in info.prediction_evidence
    assert info.resolution == 768
    assert load_base_model(path).unet.config.upcast_attention is True
    # the user can always override what the file suggests
    overridden = inspect(path, prediction_type="epsilon")
    assert overridden.prediction_type == "epsilon" and overridden.resolution == 512


def test_sdxl_v_pred_key(tmp_path):
    path = fx.build_checkpoint(tmp_path / "xl-v.safetensors", "sdxl", prediction_type="v_prediction", v_marker="key")
    assert inspect(path).prediction_type == "v_prediction"


def test_ckpt_pickle_loads_like_safetensors(tiny, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(tiny["sd1-tiny"]))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 470000}, ckpt)  # the layout of real .ckpt files
    a = load_base_model(tiny["sd1-tiny"])
    b = load_base_model(ckpt)
    assert b.info.file_format == "pickle"
    for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["sd1-tiny", "sdxl-tiny"])
def test_diffusers_folder_round_trip(tiny, tmp_path, name):
    model = load_base_model(tiny[name])
    folder = save_diffusers_folder(model, tmp_path / "folder")
    again = load_base_model(folder)
    assert again.info.source == "diffusers-folder" and again.family == model.family
    assert again.info.param_counts == model.info.param_counts
    for a, b in [(model.unet, again.unet), (model.vae, again.vae), *zip(model.text_encoders, again.text_encoders)]:
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert again.tokenizers[-1].pad_token == model.tokenizers[-1].pad_token


def test_loading_never_touches_the_network(tiny, monkeypatch):
    """No download, no hub call: any attempt to open a socket fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for path in tiny.values():
        load_base_model(path)


def test_old_sd1_text_encoder_layout_without_text_model_level(tiny, tmp_path):
    """Some early SD1 files store the CLIP text encoder as cond_stage_model.transformer.encoder.…"""
    from safetensors.torch import load_file, save_file

    prefix = "cond_stage_model.transformer."
    tensors = {(prefix + k[len(prefix + "text_model."):] if k.startswith(prefix + "text_model.") else k): v
               for k, v in load_file(str(tiny["sd1-tiny"])).items()}
    assert not any(k.startswith(prefix + "text_model.") for k in tensors)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old))
    a = load_base_model(tiny["sd1-tiny"]).text_encoders[0].state_dict()
    b = load_base_model(old).text_encoders[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Files that are not a base model get one sentence naming the file and what it is instead."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth_lora.cli import main
from dreambooth_lora.errors import CheckpointError
from dreambooth_lora.models.load import load_base_model


def _save(tmp_path: Path, name: str, tensors: dict) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled unsafely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_bad_files(tmp_path: Path, sd1: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, the phrase its error must contain)."""
    good = load_file(str(sd1))
    raw = sd1.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    cases = {}

    def case(name, path, phrase):
        cases[name] = (path, phrase)

    (tmp_path / "empty.safetensors").write_bytes(b"")
    case("empty", tmp_path / "empty.safetensors", "the file is empty (0 bytes)")
    (tmp_path / "readme.safetensors").write_text("This model was trained on...\nDownload it from the link below.\n" * 3)
    case("text renamed", tmp_path / "readme.safetensors", "this is a text file, not a model (it starts with 'This model was trained on")
    (tmp_path / "half.safetensors").write_bytes(raw[: len(raw) // 2])
    case("truncated", tmp_path / "half.safetensors", "truncated: its tensors need")
    (tmp_path / "stub.safetensors").write_bytes(raw[: header_len // 2])
    case("truncated header", tmp_path / "stub.safetensors", "truncated: its header alone needs")
    (tmp_path / "garbled.safetensors").write_bytes(raw[:8] + b"\xff" * header_len + raw[8 + header_len:])
    case("corrupt header", tmp_path / "garbled.safetensors", "corrupt safetensors header (not valid JSON)")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    case("too short", tmp_path / "tiny.safetensors", "too short to be a safetensors file")

    r = torch.randn
    case("kohya lora", _save(tmp_path, "lora.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": r(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": r(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": r(4, 32)}), "a LoRA (4 tensors), not a base model")
    case("peft lora", _save(tmp_path, "peft.safetensors", {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": r(4, 32),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": r(32, 4)}), "a LoRA (2 tensors)")
    vae = {k[len("first_stage_model."):]: v for k, v in good.items() if k.startswith("first_stage_model.")}
    case("standalone vae", _save(tmp_path, "vae.safetensors", vae), "a standalone VAE, not a full checkpoint")
    case("embedding", _save(tmp_path, "emb.safetensors", {"emb_params": r(2, 768)}), "a textual-inversion embedding")
    case("sdxl embedding", _save(tmp_path, "emb_xl.safetensors", {"clip_l": r(2, 768), "clip_g": r(2, 1280)}),
         "a textual-inversion embedding")
    unet_only = {k: v for k, v in good.items() if k.startswith("model.diffusion_model.")}
    case("unet only", _save(tmp_path, "unet.safetensors", unet_only), "has a UNet but no text encoder")
    no_vae = {k: v for k, v in good.items() if not k.startswith("first_stage_model.")}
    case("no vae", _save(tmp_path, "novae.safetensors", no_vae), "a sd1 checkpoint without a VAE")
    refiner = {**unet_only, "conditioner.embedders.0.model.ln_final.weight": r(32)}
    case("sdxl refiner", _save(tmp_path, "refiner.safetensors", refiner), "an SDXL *refiner*")
    case("flux-like", _save(tmp_path, "flux.safetensors", {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": r(8, 8)}),
         "SD3/Flux-style")
    case("controlnet", _save(tmp_path, "cn.safetensors", {"control_model.input_hint_block.0.weight": r(16, 3, 3, 3)}),
         "a ControlNet, not a base model")
    case("unrelated", _save(tmp_path, "resnet.safetensors", {"fc.weight": r(10, 4), "fc.bias": r(10)}),
         "not a Stable Diffusion checkpoint: none of its 2 tensors (e.g. 'fc.bias', 'fc.weight')")
    missing = dict(good)
    del missing["model.diffusion_model.middle_block.1.proj_out.weight"]
    case("missing tensor", _save(tmp_path, "missing.safetensors", missing), "the UNet is missing 1 weights")
    reshaped = dict(good)
    reshaped["model.diffusion_model.middle_block.0.in_layers.2.weight"] = r(64, 64, 1, 1)
    case("wrong shape", _save(tmp_path, "reshaped.safetensors", reshaped), "the UNet weights do not fit a standard model")
    incomplete = dict(good)
    del incomplete["model.diffusion_model.out.2.weight"]
    case("incomplete", _save(tmp_path, "incomplete.safetensors", incomplete),
         "looks like sd1 but lacks the tensor 'model.diffusion_model.out.2.weight'")

    with (tmp_path / "evil.ckpt").open("wb") as handle:
        pickle.dump({"state_dict": {"x": _RunsCode(tmp_path / "PWNED")}}, handle, protocol=2)
    case("code-running pickle", tmp_path / "evil.ckpt", "refused to load: it holds Python objects")
    torch.save({"state_dict": good}, tmp_path / "full.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "full.ckpt").read_bytes()[:100_000])
    case("truncated ckpt", tmp_path / "cut.ckpt", "corrupt or truncated PyTorch file")
    (tmp_path / "notes.ckpt").write_text("hello\n" * 20)
    case("text ckpt", tmp_path / "notes.ckpt", "this is a text file, not a model")
    case("missing path", tmp_path / "nope.safetensors", "no such file or folder")
    (tmp_path / "folder").mkdir()
    case("plain folder", tmp_path / "folder", "a folder without model_index.json")
    return cases


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny):
    return make_bad_files(tmp_path_factory.mktemp("bad"), tiny["sd1-tiny"])


CASES = ["empty", "text renamed", "truncated", "truncated header", "corrupt header", "too short", "kohya lora",
         "peft lora", "standalone vae", "embedding", "sdxl embedding", "unet only", "no vae", "sdxl refiner",
         "flux-like", "controlnet", "unrelated", "missing tensor", "wrong shape", "incomplete",
         "code-running pickle", "truncated ckpt", "text ckpt", "missing path", "plain folder"]


@pytest.mark.parametrize("case", CASES)
def test_bad_file_gets_one_clear_sentence(bad_files, case):
    path, phrase = bad_files[case]
    with pytest.raises(CheckpointError) as raised:
        load_base_model(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: "), message  # names the file first
    assert phrase in message, message
    assert "\n" not in message


def test_all_cases_are_covered(bad_files):
    assert sorted(bad_files) == sorted(CASES)


def test_pickle_payload_never_runs(bad_files):
    path, _ = bad_files["code-running pickle"]
    with pytest.raises(CheckpointError):
        load_base_model(path)
    assert not (path.parent / "PWNED").exists()


@pytest.mark.parametrize("case", ["truncated", "kohya lora", "standalone vae", "code-running pickle"])
def test_cli_prints_one_line_and_exits_2(bad_files, case, capsys):
    path, phrase = bad_files[case]
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and phrase in err


def test_cli_subprocess_has_no_traceback(bad_files):
    path, phrase = bad_files["empty"]
    result = subprocess.run([sys.executable, "-m", "dreambooth_lora.cli", "inspect", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: the file is empty (0 bytes); the download or copy failed, fetch it again."
    assert "Traceback" not in result.stderr + result.stdout

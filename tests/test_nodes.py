"""The ComfyUI nodes in-process, as ComfyUI runs them (under torch.inference_mode): schemas,
then base → photos → train → sample → grid on a tiny model, and Cancel mid-training."""

from __future__ import annotations

import inspect
import shutil

import numpy as np
import pytest
import torch


@pytest.fixture
def comfy_dirs(comfy, tmp_path, tiny):
    """ComfyUI's model and output folders pointed at a temporary base directory."""
    import folder_paths

    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("checkpoints", "loras", "embeddings")}
    saved_output, saved_temp = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    saved_input = folder_paths.get_input_directory()
    for kind in ("checkpoints", "loras", "embeddings"):
        (tmp_path / kind).mkdir()
        folder_paths.folder_names_and_paths[kind] = ([str(tmp_path / kind)], {".safetensors"})
    shutil.copyfile(tiny["sd1-tiny"], tmp_path / "checkpoints" / "tiny.safetensors")
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    folder_paths.set_input_directory(str(tmp_path / "input"))
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()
    yield tmp_path
    for kind, value in saved.items():
        folder_paths.folder_names_and_paths[kind] = value
    folder_paths.set_output_directory(saved_output)
    folder_paths.set_temp_directory(saved_temp)
    folder_paths.set_input_directory(saved_input)
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()


def test_every_node_schema_builds_with_tooltips(comfy, comfy_dirs):
    from dreambooth_lora.nodes import NODES

    ids = []
    for node in NODES:
        schema = node.GET_SCHEMA()
        ids.append(schema.node_id)
        assert schema.node_id.startswith("DBLoRA_") and schema.category == "DreamBooth LoRA"
        missing = [i.id for i in schema.inputs if not i.tooltip] + [o.display_name for o in schema.outputs if not o.tooltip]
        assert not missing, f"{schema.node_id}: no tooltip on {missing}"
        parameters = inspect.signature(node.execute).parameters
        takes_rest = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
        named = {name for name, p in parameters.items() if p.kind != p.VAR_KEYWORD}
        assert named <= {i.id for i in schema.inputs}, schema.node_id
        assert takes_rest or named == {i.id for i in schema.inputs}, schema.node_id
    assert len(set(ids)) == len(ids)


def defaults(node, **given) -> dict:
    """Every input's default, as the UI would send it, then ``given``."""
    values = {}
    for item in node.GET_SCHEMA().inputs:
        default = getattr(item, "default", None)
        if default is not None:
            values[item.id] = default
    values.update(given)
    return values


def run(node, **inputs):
    with torch.inference_mode():  # ComfyUI runs every node like this
        return node.execute(**inputs)


def test_base_photos_train_sample_grid(comfy_dirs):
    from dreambooth_lora.nodes.data import InstanceImages, LoadBaseModel
    from dreambooth_lora.nodes.sampling import LoRAGrid, LoRASampler
    from dreambooth_lora.nodes.training import TrainDreamBoothLoRA

    base = run(LoadBaseModel, ckpt_name="tiny.safetensors", dtype="auto", prediction_type="auto").args[0]
    rng = np.random.default_rng(0)
    photos = torch.from_numpy(rng.random((4, 72, 80, 3)).astype(np.float32))
    masks = torch.zeros(4, 72, 80)  # a MASK batch, as the mask editor or a segmenter gives it: 1 = subject
    masks[:, 10:60, 20:70] = 1.0
    out = run(InstanceImages, **defaults(InstanceImages, folder="", images=photos, masks=masks, resolution=64))
    dataset, report = out.args
    assert "4 image(s) usable" in report and dataset["identifier"] == "sks"
    assert report.count("mask covers") == 4 and all(item.mask is not None for item in dataset["dataset"].images)
    trained = run(TrainDreamBoothLoRA, base=base, dataset=dataset,
                  **defaults(TrainDreamBoothLoRA, lora_name="sks_dog", steps=4, rank=4, alpha=4,
                             prior_preservation="base_model", save_every=2, learning_rate=1e-3))
    name, curve, embedding = trained.args
    assert name == "sks_dog.safetensors" and (comfy_dirs / "loras" / name).is_file() and embedding == ""
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert not list((comfy_dirs / "loras").glob(".*"))  # no temporary file left in the loras folder
    sample = dict(steps=2, width=64, height=64, prompt="a photo of sks dog", seed=5)
    images, parameters = run(LoRASampler, base=base, **defaults(LoRASampler, lora_name=name, **sample)).args
    assert images.shape == (1, 64, 64, 3) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert "<lora:sks_dog:te=1:unet=1>" in parameters and "Seed: 5" in parameters
    plain, _ = run(LoRASampler, base=base, **defaults(LoRASampler, lora_name="(none)", **sample)).args
    assert not torch.equal(plain, images)
    again, _ = run(LoRASampler, base=base, **defaults(LoRASampler, lora_name=name, **sample)).args
    assert torch.equal(again, images)  # the cached model underneath is the clean base every time
    grid = run(LoRAGrid, base=base, **defaults(LoRAGrid, lora_name=name, x="unet-scale=0,1", y="seed=1",
                                               **{k: v for k, v in sample.items() if k != "seed"})).args[0]
    assert grid.shape[0] == 1 and grid.shape[2] > 2 * 64
    assert LoRAGrid.validate_inputs(x="colour=1", y="seed=1") is not True
    # the LoRA of checkpoint step 2, saved under its own name for the stock loader
    from dreambooth_lora.nodes.training import SaveLoRAStep

    saved = run(SaveLoRAStep, lora_name=name, step=2, save_as="sks_dog_step2").args[0]
    assert (comfy_dirs / "loras" / saved).read_bytes() == (
        comfy_dirs / "output" / "dreambooth_lora" / "sks_dog.state" / "step-000002" / "lora.safetensors").read_bytes()
    # a changed photo folder is a different input for ComfyUI's cache; an unchanged one is not
    folder = comfy_dirs / "input" / "photos"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"1")
    first = InstanceImages.fingerprint_inputs(folder=str(folder))
    assert InstanceImages.fingerprint_inputs(folder=str(folder)) == first
    (folder / "b.png").write_bytes(b"2")
    assert InstanceImages.fingerprint_inputs(folder=str(folder)) != first


def test_style_with_new_tokens_writes_lora_and_embedding_the_sampler_uses(comfy_dirs):
    """Pivotal tuning from the node: the LoRA into models/loras, the embedding into models/embeddings
    under the same name; the sampler resolves embedding:NAME in its prompt from that folder."""
    from dreambooth_lora.nodes.data import InstanceImages, LoadBaseModel
    from dreambooth_lora.nodes.sampling import LoRASampler
    from dreambooth_lora.nodes.training import TrainDreamBoothLoRA

    base = run(LoadBaseModel, ckpt_name="tiny.safetensors", dtype="auto", prediction_type="auto").args[0]
    photos = torch.from_numpy(np.random.default_rng(3).random((4, 72, 80, 3)).astype(np.float32))
    dataset = run(InstanceImages, **defaults(InstanceImages, folder="", images=photos, resolution=64,
                                              instance_prompt="a red square")).args[0]
    options = dict(lora_name="red_style", steps=3, rank=4, alpha=4, learning_rate=1e-3, mode="style", new_tokens=2,
                   token_init="painting")
    assert TrainDreamBoothLoRA.validate_inputs(**defaults(TrainDreamBoothLoRA, **options)) is True
    name, _, embedding = run(TrainDreamBoothLoRA, base=base, dataset=dataset,
                             **defaults(TrainDreamBoothLoRA, **options)).args
    assert (name, embedding) == ("red_style.safetensors", "red_style.safetensors")
    assert (comfy_dirs / "loras" / name).is_file() and (comfy_dirs / "embeddings" / embedding).is_file()
    sample = dict(steps=2, width=64, height=64, seed=1, lora_name="(none)")
    styled, text = run(LoRASampler, base=base, **defaults(LoRASampler, prompt="a car, embedding:red_style",
                                                          **sample)).args
    tokens, _ = run(LoRASampler, base=base, **defaults(LoRASampler, prompt="a car, <s1><s2>",
                                                       embedding_name=embedding, **sample)).args
    plain, _ = run(LoRASampler, base=base, **defaults(LoRASampler, prompt="a car, red_style_x", **sample)).args
    assert torch.equal(styled, tokens) and not torch.equal(styled, plain)
    assert text.startswith("a car, red_style\n") and "TI hashes" in text
    # textual inversion alone: only the embedding, no LoRA
    name, _, embedding = run(TrainDreamBoothLoRA, base=base, dataset=dataset, **defaults(
        TrainDreamBoothLoRA, **{**options, "lora_name": "red_ti", "train_unet": False})).args
    assert name == "" and embedding == "red_ti.safetensors" and not (comfy_dirs / "loras" / "red_ti.safetensors").exists()


def test_cancel_stops_training_keeps_a_checkpoint_and_queueing_again_resumes(comfy_dirs):
    import comfy.model_management

    from dreambooth_lora.nodes.data import InstanceImages, LoadBaseModel
    from dreambooth_lora.nodes.training import TrainDreamBoothLoRA
    from dreambooth_lora.trainer.checkpoint import list_checkpoints

    base = run(LoadBaseModel, ckpt_name="tiny.safetensors", dtype="auto", prediction_type="auto").args[0]
    photos = torch.from_numpy(np.random.default_rng(1).random((3, 64, 64, 3)).astype(np.float32))
    dataset = run(InstanceImages, **defaults(InstanceImages, folder="", images=photos, resolution=64)).args[0]
    settings = defaults(TrainDreamBoothLoRA, lora_name="cut", steps=6, rank=4, alpha=4,
                        prior_preservation="off", save_every=0)
    comfy.model_management.interrupt_current_processing(True)  # the user pressed Cancel
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(TrainDreamBoothLoRA, base=base, dataset=dataset, **settings)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    state = comfy_dirs / "output" / "dreambooth_lora" / "cut.state"
    assert [p.name for p in list_checkpoints(state)] == ["step-000001"]  # stopped within one step, saved
    assert not (comfy_dirs / "loras" / "cut.safetensors").exists()
    name = run(TrainDreamBoothLoRA, base=base, dataset=dataset, **settings).args[0]
    assert (comfy_dirs / "loras" / name).is_file()
    rows = (state / "log.jsonl").read_text().splitlines()
    assert len(rows) == 6  # steps 1-6: the first from before the cancel, the rest resumed


def test_base_model_from_a_diffusers_folder(comfy_dirs, tiny):
    from dreambooth_lora.models.load import load_base_model
    from dreambooth_lora.models.save import save_diffusers_folder
    from dreambooth_lora.nodes.data import LoadBaseModel
    from dreambooth_lora.nodes.sampling import LoRASampler

    folder = save_diffusers_folder(load_base_model(tiny["sd1-tiny"]), comfy_dirs / "checkpoints" / "diffusers_model")
    assert "model_index.json" in LoadBaseModel.validate_inputs(ckpt_name="x", dtype="auto", prediction_type="auto",
                                                               diffusers_folder=str(comfy_dirs / "checkpoints"))
    base = run(LoadBaseModel, ckpt_name="tiny.safetensors", dtype="auto", prediction_type="auto",
               diffusers_folder=str(folder)).args[0]
    assert base["path"] == str(folder)
    images = run(LoRASampler, base=base, **defaults(LoRASampler, lora_name="(none)", steps=2, width=64,
                                                    height=64)).args[0]
    assert images.shape == (1, 64, 64, 3)


def test_identifier_and_evaluate_nodes(comfy_dirs):
    import transformers

    from dreambooth_lora.nodes.data import SuggestIdentifier
    from dreambooth_lora.nodes.sampling import Evaluate

    identifier, report = run(SuggestIdentifier, count=3, class_word="dog", min_token_id=20000).args
    assert identifier and len(report.splitlines()) == 3 and f"{identifier} " in report and " id " in report
    torch.manual_seed(0)
    dino = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                        num_attention_heads=2, image_size=32, patch_size=8),
                                 add_pooling_layer=False)
    dino.save_pretrained(comfy_dirs / "checkpoints" / "dino")
    rng = np.random.default_rng(2)
    generated = torch.from_numpy(rng.random((3, 48, 48, 3)).astype(np.float32))
    real = torch.from_numpy(rng.random((2, 40, 56, 3)).astype(np.float32))
    report = run(Evaluate, **defaults(Evaluate, generated=generated, real=real, prompt="a sks dog",
                                      dino=str(comfy_dirs / "checkpoints" / "dino"))).args[0]
    assert report.splitlines()[0].split() == ["metric", "value", "real", "images"]
    assert report.splitlines()[1].startswith("DINO")


def test_path_inputs_stay_inside_comfyuis_folders_unless_the_operator_allows_any(comfy_dirs, monkeypatch):
    from dreambooth_lora.nodes.data import InstanceImages, LoadBaseModel
    from dreambooth_lora.nodes.sampling import Evaluate

    (comfy_dirs / "input" / "my_dog").mkdir(parents=True)
    outside = comfy_dirs / "elsewhere"
    outside.mkdir()
    (comfy_dirs / "input" / "sneaky").symlink_to(outside)  # a link out of input/ is outside too
    monkeypatch.delenv("DBLORA_ALLOW_ANY_PATH", raising=False)
    for value in ("/etc", "../../", str(outside), "sneaky", "my_dog/../../elsewhere"):
        problem = InstanceImages.validate_inputs(folder=value)
        assert problem is not True and "outside ComfyUI's input, output and models folders" in problem, value
        assert "DBLORA_ALLOW_ANY_PATH=1" in problem
        assert "outside" in LoadBaseModel.validate_inputs(ckpt_name="tiny.safetensors", dtype="auto",
                                                          prediction_type="auto", diffusers_folder=value)
        assert "outside" in Evaluate.validate_inputs(dino=value, clip="")
        assert InstanceImages.fingerprint_inputs(folder=value) == ""  # not even listed
    assert InstanceImages.validate_inputs(folder="my_dog") is True  # relative names are under input/
    assert InstanceImages.validate_inputs(folder=str(comfy_dirs / "input" / "my_dog")) is True
    assert InstanceImages.validate_inputs(folder=str(comfy_dirs / "output")) is True
    monkeypatch.setenv("DBLORA_ALLOW_ANY_PATH", "1")  # the server's operator, not the workflow
    assert InstanceImages.validate_inputs(folder="/etc") is True

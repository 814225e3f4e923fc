"""Masked training: where masks come from (a <name>.mask.png, the alpha channel, a ComfyUI MASK
batch), what a bad mask is told, how a mask weights the loss, and what it does to training: an
all-white mask trains bit for bit like no mask, a mask with nothing on it teaches nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth_lora.data.core import load_batch, load_folder
from dreambooth_lora.data.masks import latent_mask, loss_weights
from dreambooth_lora.errors import UserError
from dreambooth_lora.trainer.loss import dreambooth_loss
from dreambooth_lora.trainer.loop import train
from dreambooth_lora.trainer.step import mask_weights

from test_trainer import adapter_tensors, assert_same_weights, make_photos, tiny_job


def save_mask(path, size, box=None, value=255):
    """A black mask with a white (``value``) rectangle ``box``, or all ``value`` without a box."""
    mask = Image.new("L", size, 0 if box else value)
    if box:
        mask.paste(value, box)
    mask.save(path)


def test_sidecar_masks_are_read_fitted_and_never_taken_for_photos(tmp_path):
    photos = make_photos(tmp_path / "photos", count=3)
    save_mask(photos / "photo_0.mask.png", (80, 72), (16, 16, 56, 56))
    save_mask(photos / "photo_1.mask.png", (80, 72))  # all white: usable, says so
    data = load_folder(photos, "a photo of {id} {class}", "sks", "dog", resolution=64)
    assert [item.source.rsplit("/", 1)[-1] for item in data.images] == ["photo_0.png", "photo_1.png", "photo_2.png"]
    first, second, third = data.images
    assert first.mask is not None and first.mask.size == first.image.size and first.mask.mode == "L"
    assert third.mask is None, "a photo without a mask file counts fully everywhere"
    assert any(note.startswith("mask covers") for note in first.notes)
    assert [source.rsplit("/", 1)[-1] for source, _ in data.warnings] == ["photo_1.png"]
    assert "all white" in data.warnings[0][1]
    off = load_folder(photos, "x", resolution=64, mask_source="off")
    assert all(item.mask is None for item in off.images) and len(off.images) == 3


def test_bad_masks_are_named_with_the_fix(tmp_path):
    photos = make_photos(tmp_path / "photos", count=2)
    save_mask(photos / "photo_0.mask.png", (40, 40))
    with pytest.raises(UserError, match=r"photo_0\.mask\.png: the mask is 40×40 but photo_0\.png is 80×72; save the "
                                        r"mask at the photo's size"):
        load_folder(photos, "x", resolution=64)
    (photos / "photo_0.mask.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"photo_0\.mask\.png: not a readable image"):
        load_folder(photos, "x", resolution=64)
    (photos / "photo_0.mask.png").unlink()
    save_mask(photos / "photo_1.mask.png", (80, 72), value=0)  # empty: a warning, not an error
    data = load_folder(photos, "x", resolution=64)
    assert "empty" in data.warnings[0][1]


def test_alpha_and_exif_rotated_masks(tmp_path):
    folder = tmp_path / "cutouts"
    folder.mkdir()
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (8, 8, 40, 56))
    rgba.save(folder / "cutout.png")
    assert load_folder(folder, "x", resolution=64).images[0].mask is None, "alpha is a mask only when asked"
    item = load_folder(folder, "x", resolution=64, mask_source="alpha").images[0]
    values = np.asarray(item.mask)
    assert values[20, 20] == 255 and values[4, 4] == 0 and values[60, 60] == 0
    # a photo stored 80×40 with EXIF "rotate 90°" shows 40×80; a mask drawn on the stored pixels is turned too
    rotated = tmp_path / "rotated"
    rotated.mkdir()
    photo = Image.new("RGB", (80, 40), (10, 10, 10))
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(rotated / "p.jpg", exif=exif.tobytes())
    save_mask(rotated / "p.mask.png", (80, 40), (0, 0, 20, 40))  # the stored image's left quarter
    item = load_folder(rotated, "x", resolution=64).images[0]
    assert item.image.size == item.mask.size and item.image.size[0] < item.image.size[1]
    turned = np.asarray(item.mask) > 127
    assert turned[:turned.shape[0] // 4].mean() > 0.9 and turned[turned.shape[0] // 2:].mean() < 0.05


def test_a_mask_batch_from_comfyui():
    pictures = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
    masks = np.zeros((2, 64, 64), np.float32)
    masks[:, 16:48, 16:48] = 1.0
    data = load_batch(torch.from_numpy(pictures), None, "x", resolution=64, masks=torch.from_numpy(masks))
    assert all(np.asarray(item.mask)[32, 32] == 255 and np.asarray(item.mask)[0, 0] == 0 for item in data.images)
    shared = load_batch(pictures, None, "x", resolution=64, masks=masks[:1])  # one mask for all
    assert all(item.mask is not None for item in shared.images)
    with pytest.raises(UserError, match="masks: 3 masks for 2 images"):
        load_batch(pictures, None, "x", resolution=64, masks=np.zeros((3, 64, 64), np.float32))
    with pytest.raises(UserError, match="masks: the mask of image 1 of 2 is 32×32 but the photo is 64×64"):
        load_batch(pictures, None, "x", resolution=64, masks=np.zeros((2, 32, 32), np.float32))


def test_latent_masks_average_each_cell_and_weights_keep_ones_exact():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 4, 8))  # half of the first 8×8 cell
    grid = latent_mask(mask, (0, 0, 64, 64), False, (8, 8))
    assert grid.shape == (8, 8) and grid[0, 0] == 0.5 and grid.sum() == 0.5
    assert latent_mask(mask, (0, 0, 64, 64), True, (8, 8))[0, 7] == 0.5, "mirrored with the pixels"
    weights = loss_weights(np.array([0.0, 0.5, 1.0], np.float32), 0.1)
    assert weights.dtype == np.float32 and weights[2] == 1.0
    assert weights[0] == pytest.approx(0.1) and weights[1] == pytest.approx(0.55)


def test_masked_loss_ignores_what_is_off_the_subject_and_ones_change_nothing():
    torch.manual_seed(0)
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    target, timesteps, abar = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.linspace(0.99, 0.01, 1000)
    subject = torch.zeros(1, 8, 8)
    subject[:, 2:6, 2:6] = 1.0
    rows = [{"mask": subject, "prior": False}, {"mask": None, "prior": True}]
    weights = mask_weights(rows, 1, 0.0, False)
    assert weights[1].eq(1).all(), "prior rows are not masked unless asked"
    masked = dreambooth_loss(prediction, target, timesteps, 1, abar, weights=weights)
    changed = prediction.detach().clone()
    changed[0, :, 0, 0] += 100.0  # off the subject, weight 0
    again = dreambooth_loss(changed, target, timesteps, 1, abar, weights=weights)
    assert torch.equal(masked.instance, again.instance)
    changed[0, :, 3, 3] += 1.0  # on the subject
    assert not torch.equal(masked.instance, dreambooth_loss(changed, target, timesteps, 1, abar, weights=weights).instance)
    # an all-ones mask: the same numbers and the same gradient, bit for bit
    ones = mask_weights([{"mask": torch.ones(1, 8, 8), "prior": False}, rows[1]], 1, 0.1, True)
    plain = dreambooth_loss(prediction, target, timesteps, 1, abar, prior_weight=0.7)
    (grad_plain,) = torch.autograd.grad(plain.total, prediction)
    weighted = dreambooth_loss(prediction, target, timesteps, 1, abar, prior_weight=0.7, weights=ones)
    (grad_weighted,) = torch.autograd.grad(weighted.total, prediction)
    assert torch.equal(plain.total, weighted.total) and torch.equal(grad_plain, grad_weighted)


def test_all_white_masks_train_exactly_like_no_masks(tmp_path):
    options = {"steps": 4, "prior_preservation": "base_model", "train_text_encoder": True, "mask_prior": True}
    plain = train(tiny_job(tmp_path / "a", "plain", **options))
    job = tiny_job(tmp_path / "b", "white", **options)
    for photo in sorted((tmp_path / "b" / "photos").glob("photo_*.png")):
        save_mask(photo.with_name(photo.stem + ".mask.png"), (80, 72))
    white = train(job)
    assert_same_weights(adapter_tensors(plain.state_dir), adapter_tensors(white.state_dir))
    assert [r["loss"] for r in plain.log] == [r["loss"] for r in white.log]


def test_masks_with_nothing_on_them_teach_nothing(tmp_path, capsys):
    """Floor 0 and every mask empty: the instance loss is 0, no gradient reaches the adapter, and
    its up-projections stay at their initial zeros — the LoRA leaves the model's loss on the
    subject exactly as the base has it."""
    job = tiny_job(tmp_path, "empty", steps=3, prior_preservation="off", mask_floor=0.0)
    for photo in sorted((tmp_path / "photos").glob("photo_*.png")):
        save_mask(photo.with_name(photo.stem + ".mask.png"), (80, 72), value=0)
    result = train(job)
    assert "its mask is empty" in capsys.readouterr().out
    assert all(row["loss_instance"] == 0.0 for row in result.log)
    lora = load_file(str(result.lora))
    ups = [k for k in lora if "lora_up" in k]
    assert ups and all(not lora[k].any() for k in ups)
    # with a floor the same photos and masks do teach (the test above is not vacuous)
    floored = tiny_job(tmp_path / "floor", "floor", steps=3, prior_preservation="off", mask_floor=0.5)
    for photo in sorted((tmp_path / "floor" / "photos").glob("photo_*.png")):
        save_mask(photo.with_name(photo.stem + ".mask.png"), (80, 72), value=0)
    taught = train(floored)
    assert all(row["loss_instance"] > 0 for row in taught.log)
    assert any(load_file(str(taught.lora))[k].any() for k in ups)

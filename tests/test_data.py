"""Instance images: the odd files phones and editors produce come out as the right RGB tensors."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lora.cli import main
from dreambooth_lora.data import core as data

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _pixels(example) -> np.ndarray:
    """CHW [-1, 1] → HWC 0..255."""
    return (example["pixels"].transpose(1, 2, 0) + 1.0) * 127.5


def _halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    image = Image.new("RGB", (width, height), left)
    image.paste(Image.new("RGB", (width - width // 2, height), right), (width // 2, 0))
    return image


def test_exif_rotated_photo_is_turned_upright(tmp_path):
    # A phone stores the sensor's landscape frame plus "rotate 90° clockwise to view" (EXIF 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves(128, 64).save(tmp_path / "IMG_0042.jpg", quality=95, exif=exif)
    dataset = data.load_folder(tmp_path, "a photo of {id} {class}", "sks", "dog", resolution=64)
    item = dataset.images[0]
    assert item.notes == ["rotated 90° (EXIF)"] and item.original_size == (128, 64)
    assert item.image.size == (64, 128)  # upright: portrait
    pixels = _pixels(dataset.example(0))
    assert pixels.shape == (64, 64, 3)
    # clockwise turn: the left (red) half of the sensor frame is now on top
    assert np.allclose(pixels[:24].mean(axis=(0, 1)), RED, atol=12)
    assert np.allclose(pixels[-24:].mean(axis=(0, 1)), BLUE, atol=12)


def test_rgba_is_composited_on_the_chosen_background(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (32, 64), (*RED, 255)), (0, 0))
    rgba.save(tmp_path / "cutout.png")
    for background, value in (("white", 255), ("black", 0)):
        dataset = data.load_folder(tmp_path, "x", resolution=64, background=background)
        pixels = _pixels(dataset.example(0))
        assert dataset.images[0].notes == [f"transparency composited on {background}"]
        assert np.allclose(pixels[:, :32], RED, atol=1) and np.allclose(pixels[:, 32:], value, atol=1)


def test_undersized_image_is_upscaled_with_a_warning(tmp_path):
    _halves(48, 40).save(tmp_path / "small.png")
    dataset = data.load_folder(tmp_path, "x", resolution=64)
    assert dataset.images[0].notes == ["upscaled 40→64 (warning: below training size)"]
    pixels = _pixels(dataset.example(0))
    assert pixels.shape == (64, 64, 3)
    assert np.allclose(pixels[:, :20].mean(axis=(0, 1)), RED, atol=3)
    assert np.allclose(pixels[:, -20:].mean(axis=(0, 1)), BLUE, atol=3)


@pytest.mark.parametrize("mode,make,note,expected", [
    ("L", lambda: Image.new("L", (64, 64), 100), "grayscale → RGB", (100, 100, 100)),
    ("CMYK", lambda: Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "CMYK → RGB", (255, 0, 0)),
    ("I;16", lambda: Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)), "16-bit → 8-bit", (255, 255, 255)),
    ("P", lambda: Image.new("RGB", (64, 64), BLUE).convert("P"), None, BLUE),
])
def test_every_mode_becomes_rgb(tmp_path, mode, make, note, expected):
    image = make()
    suffix = ".jpg" if mode == "CMYK" else ".png"
    image.save(tmp_path / f"x{suffix}", **({"quality": 100} if mode == "CMYK" else {}))
    dataset = data.load_folder(tmp_path, "x", resolution=64)
    assert dataset.images[0].image.mode == "RGB"
    if note:
        assert note in dataset.images[0].notes
    assert np.allclose(_pixels(dataset.example(0)).mean(axis=(0, 1)), expected, atol=4)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG signature and header claiming width×height: what a decompression bomb looks like."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_bad_folder(folder: Path) -> dict[str, str]:
    """file name → the reason it must be skipped with."""
    _halves(80, 80).save(folder / "good.png")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("hello, this is not a picture")
    (folder / "noise.png").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(600)))
    buffer = folder / "full.jpg"
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, quality=90)
    (folder / "cut.jpg").write_bytes(buffer.read_bytes()[:3000])
    buffer.unlink()
    _png_header_only(folder / "bomb.png", 30000, 30000)  # PIL's own bomb check refuses this one
    _png_header_only(folder / "big.png", 9000, 8000)  # under PIL's limit, over ours
    return {
        "zero.jpg": "empty file (0 bytes)",
        "notes.jpg": "not an image (it starts with 'hello, this is not a pic')",
        "noise.png": "not an image (unknown content)",
        "cut.jpg": "corrupt or truncated image (image file is truncated",
        "bomb.png": "900 megapixels, over the 67 MP limit; downscale it first",
        "big.png": "9000×8000 is 72 megapixels, over the 67 MP limit; downscale it first",
    }


def test_bad_files_are_skipped_with_their_reason_and_good_ones_kept(tmp_path):
    expected = make_bad_folder(tmp_path)
    dataset = data.load_folder(tmp_path, "a photo of {id} {class}", "sks", "dog", resolution=64)
    assert [Path(i.source).name for i in dataset.images] == ["good.png"]
    skipped = {Path(source).name: why for source, why in dataset.skipped}
    assert skipped.keys() == expected.keys()
    for name, reason in expected.items():
        assert skipped[name].startswith(reason), (name, skipped[name])
    report = dataset.report()
    assert "1 image(s) usable, 6 skipped" in report and f"skipped {tmp_path / 'bomb.png'}: 900 megapixels" in report


def test_no_usable_image_is_one_clear_error(tmp_path):
    with pytest.raises(data.DatasetError, match=rf"^{tmp_path}: no usable image; add photos of the subject"):
        data.load_folder(tmp_path, "x")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(data.DatasetError, match=r"no usable image \(zero.png: empty file \(0 bytes\)\)"):
        data.load_folder(tmp_path, "x")
    with pytest.raises(data.DatasetError, match="no such folder; point --instance-dir"):
        data.load_folder(tmp_path / "missing", "x")


def test_images_are_held_in_memory_after_loading(tmp_path):
    """Checked at load time, so nothing that happens to the files later can stop training."""
    _halves(40, 40).save(tmp_path / "a.png")
    dataset = data.load_folder(tmp_path, "x", resolution=64, repeats=3)
    (tmp_path / "a.png").unlink()
    assert len(dataset) == 3 and all(dataset.example(i)["pixels"].shape == (3, 64, 64) for i in range(3))


def test_captions_from_sidecar_files_with_templates(tmp_path):
    _halves(40, 40).save(tmp_path / "a.png")
    _halves(40, 40).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a photo of {id} {class} on a beach\n")
    dataset = data.load_folder(tmp_path, "a photo of {id} {class}", "ktn", "cat", resolution=64)
    assert [i.caption for i in dataset.images] == ["a photo of ktn cat on a beach", "a photo of ktn cat"]


def test_random_crop_and_flip_vary_center_does_not(tmp_path):
    _halves(128, 64).save(tmp_path / "wide.png")
    center = data.load_folder(tmp_path, "x", resolution=64)
    rng = random.Random(0)
    assert len({center.example(0, rng)["crop_top_left"] for _ in range(10)}) == 1
    varied = data.load_folder(tmp_path, "x", resolution=64, crop="random", flip=True)
    examples = [varied.example(0, rng) for _ in range(20)]
    assert len({e["crop_top_left"] for e in examples}) > 3
    # the left edge of the window is red unless the example was mirrored
    left_edges = {bool(_pixels(e)[32, 0, 0] > 128) for e in examples}
    assert left_edges == {True, False}


def test_buckets_keep_the_aspect_ratio(tmp_path):
    _halves(1200, 600).save(tmp_path / "wide.png")
    dataset = data.load_folder(tmp_path, "x", resolution=512, buckets=True)
    width, height = dataset.images[0].target_size
    buckets = data.bucket_sizes(512)
    # sides step by 64, so no bucket is exactly 2:1; the chosen one is the closest in aspect
    closest = min(abs(np.log(w / h) - np.log(2.0)) for w, h in buckets)
    assert abs(np.log(width / height) - np.log(2.0)) == closest and abs(width / height - 2.0) < 0.25
    assert width % 64 == 0 and height % 64 == 0 and 0.85 < width * height / 512 ** 2 <= 1.0
    example = dataset.example(0)
    assert example["pixels"].shape == (3, height, width)
    # 1200×600 scaled to cover 704×320 is 704×352: the centred window starts 16 rows down
    assert example["target_size"] == (height, width) and example["crop_top_left"] == ((352 - height) // 2, 0)
    assert all(max(w / h, h / w) <= 4 for w, h in data.bucket_sizes(1024))


def test_comfyui_image_batch_with_alpha_and_captions():
    batch = torch.zeros(2, 24, 24, 4)
    batch[..., 0] = 1.0  # red
    batch[0, :, 12:, 3] = 1.0  # first image: right half opaque, left transparent
    batch[1, ..., 3] = 1.0
    dataset = data.load_batch(batch, ["{id} {class} portrait", ""], "a photo of {id} {class}", "sks", "dog", resolution=64)
    assert [i.caption for i in dataset.images] == ["sks dog portrait", "a photo of sks dog"]
    assert [i.source for i in dataset.images] == ["image 1 of 2", "image 2 of 2"]
    first = _pixels(dataset.example(0))
    assert np.allclose(first[:, :28], 255, atol=2) and np.allclose(first[:, -28:], (255, 0, 0), atol=2)
    assert dataset.images[0].notes[0] == "transparency composited on white"


def test_dataset_command_prints_the_report(tmp_path, capsys):
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves(384, 300).save(tmp_path / "IMG_0042.jpg", exif=exif)
    assert main(["dataset", str(tmp_path), "--resolution", "512", "--identifier", "ktn", "--class-word", "cat"]) == 0
    out = capsys.readouterr().out
    assert "IMG_0042.jpg: rotated 90° (EXIF), upscaled 300→512 (warning: below training size) → 512×512; caption: 'a photo of ktn cat'" in out

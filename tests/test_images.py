"""privdiff.io.images: every pixel mode loads as a person sees it, hostile folders and files get one-line errors."""

from __future__ import annotations

import logging
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import privdiff.io.images as images
from privdiff.errors import PrivdiffError
from privdiff.io.images import (
    MAX_RESOLUTION,
    check_image,
    check_resolution,
    list_images,
    load_image,
    load_image_folder,
    load_private_dataset,
    to_float_rgb,
)

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "SIGALRM"), reason="needs POSIX")


def _gray(path: Path, value: float = 0.5, size: int = 16) -> Path:
    Image.new("L", (size, size), round(value * 255)).save(path)
    return path


def _loaded(path: Path, resolution: int = 8) -> torch.Tensor:
    out = load_image(path, resolution)
    assert out.shape == (3, resolution, resolution) and out.dtype == torch.float32
    return out


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR declares width x height (valid CRCs, no real pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(("mode", "value", "want"), [
    ("1", 1, (1, 1, 1)),
    ("L", 128, (128 / 255,) * 3),
    ("LA", (0, 0), (1, 1, 1)),  # fully transparent black: white
    ("LA", (0, 255), (0, 0, 0)),
    ("RGB", (255, 0, 0), (1, 0, 0)),
    ("RGBA", (0, 0, 255, 0), (1, 1, 1)),
    ("RGBA", (0, 0, 255, 255), (0, 0, 1)),
    ("RGBX", (0, 255, 0, 0), (0, 1, 0)),
    ("CMYK", (0, 0, 0, 0), (1, 1, 1)),
    ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
    ("YCbCr", (255, 128, 128), (1, 1, 1)),
    ("HSV", (0, 0, 255), (1, 1, 1)),
    ("LAB", (255, 128, 128), (1, 1, 1)),
    ("I;16", 32768, (32768 / 65535,) * 3),
    ("I;16B", 32768, (32768 / 65535,) * 3),
    ("I;16L", 65535, (1, 1, 1)),
    ("I;16N", 16384, (16384 / 65535,) * 3),
    ("I", 32768, (32768 / 65535,) * 3),  # 16-bit data stored as 32-bit integers
    ("I", -5, (0, 0, 0)),
    ("I", 2**30, (2**30 / (2**31 - 1),) * 3),  # 32-bit data
    ("F", 0.25, (0.25,) * 3),
])
def test_every_mode_as_a_person_sees_it(mode, value, want):
    rgb = to_float_rgb(Image.new(mode, (3, 2), value))
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb, np.broadcast_to(want, rgb.shape), atol=0.02)


def test_palette_with_and_without_transparency():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    np.testing.assert_allclose(to_float_rgb(image)[0, 0], (1, 0, 0))
    image.info["transparency"] = 1
    np.testing.assert_allclose(to_float_rgb(image)[0, 0], (1, 1, 1))


def test_float_out_of_range_is_scaled_by_its_maximum_with_one_warning(caplog):
    image = Image.fromarray(np.array([[-1.0, 2.0], [4.0, 1.0]], dtype=np.float32))
    with caplog.at_level(logging.WARNING, logger="privdiff"):
        rgb = to_float_rgb(image, "x.tif")
    np.testing.assert_allclose(rgb[..., 0], [[0, 0.5], [1, 0.25]])
    assert len(caplog.records) == 1 and "x.tif" in caplog.text and "-1..4" in caplog.text
    with pytest.raises(PrivdiffError, match="x.tif.*NaN"):
        to_float_rgb(Image.fromarray(np.full((2, 2), np.nan, np.float32)), "x.tif")


def test_files_of_every_depth_load_as_seen(tmp_path):
    Image.new("I;16", (16, 16), 32768).save(tmp_path / "gray16.png")
    Image.new("I;16B", (16, 16), 32768).save(tmp_path / "gray16b.tif")
    Image.new("I", (16, 16), 32768).save(tmp_path / "int32.tif")
    Image.new("I;16", (16, 16), 16384).save(tmp_path / "signed16.tif", tiffinfo={339: 2})  # SampleFormat: signed
    Image.new("F", (16, 16), 0.25).save(tmp_path / "float.tif")
    Image.new("CMYK", (16, 16), (0, 0, 0, 255)).save(tmp_path / "cmyk.jpg")
    Image.new("LAB", (16, 16), (255, 128, 128)).save(tmp_path / "lab.tif")  # L 100, a = b = 0: white
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    rgba.save(tmp_path / "clear.webp")
    Image.new("1", (16, 16), 1).save(tmp_path / "bits.bmp")
    want = {"gray16.png": 0.5, "gray16b.tif": 0.5, "int32.tif": 0.5, "signed16.tif": 0.5, "float.tif": 0.25,
            "cmyk.jpg": 0.0, "lab.tif": 1.0, "clear.png": 1.0, "clear.webp": 1.0, "bits.bmp": 1.0}
    for name, value in want.items():
        out = _loaded(tmp_path / name)
        assert abs(float(out.mean()) - value) < 0.02, name
        assert float(out.max() - out.min()) < 0.02, name


def test_multi_frame_images_use_the_first_frame(tmp_path):
    frames = [Image.new("L", (16, 16), 255), Image.new("L", (16, 16), 0)]
    for name in ("anim.gif", "pages.tif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        with Image.open(tmp_path / name) as image:
            assert image.n_frames == 2
        assert float(_loaded(tmp_path / name).min()) > 0.98


def test_exif_orientation_makes_photos_upright(tmp_path):
    stored = Image.new("RGB", (32, 16), (0, 0, 0))
    stored.paste((255, 255, 255), (16, 0, 32, 16))  # stored: left black, right white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: upright, top black, bottom white
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    out = _loaded(tmp_path / "photo.jpg")
    assert float(out[:, 0].mean()) < 0.1 and float(out[:, -1].mean()) > 0.9
    assert float(out[:, :, 0].mean()) == pytest.approx(float(out[:, :, -1].mean()), abs=0.1)


def test_centre_crop_and_resize_keep_the_existing_behaviour(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    files, out = load_image_folder(tmp_path, 32)
    assert files == [tmp_path / "a.png"] and out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out[0], torch.from_numpy(pixels[:, 8:40] / 255.0).float().permute(2, 0, 1))
    small = load_private_dataset(tmp_path, 8)
    want = Image.fromarray(pixels[:, 8:40]).resize((8, 8), Image.Resampling.BICUBIC)  # the 8-bit resize, as before
    torch.testing.assert_close(small.images[0], torch.from_numpy(np.asarray(want) / 255.0).float().permute(2, 0, 1))
    assert len(small) == 1 and small.files == files


def test_resized_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (32, 32), (255, 0, 0, 128)).save(tmp_path / "half.png")
    Image.new("LA", (32, 32), (0, 64)).save(tmp_path / "gray.png")
    np.testing.assert_allclose(_loaded(tmp_path / "half.png")[:, 0, 0], (1, 127 / 255, 127 / 255), atol=0.01)
    np.testing.assert_allclose(_loaded(tmp_path / "gray.png")[:, 0, 0], (191 / 255,) * 3, atol=0.01)


def test_a_declared_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = _bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(PrivdiffError, match=r"bomb\.png: declares 100000x100000 pixels, over the limit") as info:
        check_image(bomb)
    assert "\n" not in str(info.value)
    with pytest.raises(PrivdiffError, match="100000x100000"):
        load_image(bomb, 8)


def test_the_pixel_limit_is_a_module_constant_and_respects_a_lower_pil_limit(tmp_path, monkeypatch):
    path = _gray(tmp_path / "a.png", size=20)
    assert check_image(path) == (20, 20)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(PrivdiffError, match=r"a\.png: declares 20x20 pixels, over the limit of 399 pixels$"):
        check_image(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # PIL warns (400 > 300) inside Image.open: an error here
    with pytest.raises(PrivdiffError, match=r"declares 20x20 pixels, over the limit of 300 pixels$"):
        load_image(path, 8)


def test_all_headers_are_checked_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    _gray(tmp_path / "a.png")
    _bomb_png(tmp_path / "z.png", 100_000, 100_000)
    decoded = []
    monkeypatch.setattr(images, "to_square_rgb", lambda *args, **kwargs: decoded.append(args))
    with pytest.raises(PrivdiffError, match=r"z\.png"):
        load_image_folder(tmp_path, 8)
    assert decoded == []


@pytest.mark.parametrize(("content", "message"), [
    (b"", "the file is empty"),
    (b"not an image at all", "not a PNG"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a PNG"),  # never handed to Ghostscript
])
def test_bad_files_get_one_line_naming_them(tmp_path, content, message):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(PrivdiffError, match=f"cannot read image .*bad.png: {message}") as info:
        load_image_folder(tmp_path, 8)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_files_get_one_line_naming_them(tmp_path, suffix):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PrivdiffError, match=f"cannot read image .*cut{suffix}: ") as info:
        load_image_folder(tmp_path, 8)
    assert "\n" not in str(info.value)


def test_an_unreadable_file_names_the_file(tmp_path, monkeypatch):
    path = _gray(tmp_path / "secret.png")
    real_open = os.open

    def deny(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(PrivdiffError, match=r"cannot read image .*secret\.png: permission denied$"):
        load_image_folder(tmp_path, 8)


@posix_only
def test_entries_that_are_not_images_are_skipped_with_one_warning(tmp_path, caplog):
    good = _gray(tmp_path / "a.png", 1.0)
    (tmp_path / "sub").mkdir()
    (tmp_path / "x.png").mkdir()  # a folder named like an image
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "link.png").symlink_to(good)  # a link to an image loads normally
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hi")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("a FIFO was opened"))
    signal.alarm(20)
    try:
        with caplog.at_level(logging.WARNING, logger="privdiff"):
            files, out = load_image_folder(tmp_path, 8)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [p.name for p in files] == ["a.png", "link.png"] and float(out.min()) > 0.98
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 6 entries of {tmp_path} that are not image files "
        "(2 folders, 1 broken link, 1 special file, 1 hidden file, 1 non-image file)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="privdiff"):
        listed = list_images(tmp_path, warn=False)
        assert load_image_folder(tmp_path, 8, files=listed)[0] == listed  # an earlier listing: no second warning
        assert caplog.records == []
        (tmp_path / "sub").rmdir()
        (tmp_path / "x.png").rmdir()
        (tmp_path / "gone.png").unlink()
        (tmp_path / "pipe.png").unlink()
        (tmp_path / ".hidden.png").unlink()
        list_images(tmp_path)
    assert caplog.records[0].getMessage().startswith("skipped 1 entry of ") and len(caplog.records) == 1


@posix_only
def test_a_regular_file_check_guards_against_a_swapped_in_fifo(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(PrivdiffError, match=r"pipe\.png: not a regular file"):
        check_image(tmp_path / "pipe.png")


def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(PrivdiffError, match="does not exist or is not a folder"):
        list_images(tmp_path / "nope")
    (tmp_path / "sub").mkdir()
    with pytest.raises(PrivdiffError, match="holds no images"):
        list_images(tmp_path)


@pytest.mark.parametrize(("value", "message"), [
    (4, "resolution 4 is too small \\(at least 8 pixels\\)"),
    (100_000, "resolution 100000 is too large \\(at most 4096 pixels\\)"),
    (True, "resolution True is not a whole number"),
    (512.0, "resolution 512.0 is not a whole number"),
    ("512", "resolution '512' is not a whole number"),
])
def test_bad_resolutions_are_refused_before_reading_anything(tmp_path, value, message):
    with pytest.raises(PrivdiffError, match=message):
        check_resolution(value)
    with pytest.raises(PrivdiffError, match=message):
        load_image_folder(tmp_path / "does-not-exist", value)  # the resolution fails first


def test_good_resolutions():
    assert check_resolution(8) == 8 and check_resolution(np.int64(512)) == 512
    assert check_resolution(MAX_RESOLUTION) == MAX_RESOLUTION == 4096


def test_loading_more_pixels_than_half_the_memory_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(images.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1024}[name])
    with pytest.raises(PrivdiffError, match=r"10 images at resolution 512 need 30 MiB of memory, over half of this "
                                            r"machine's 4 MiB"):
        images.check_memory(10, 512)
    images.check_memory(1, 64)  # 48 KiB of 4 MiB

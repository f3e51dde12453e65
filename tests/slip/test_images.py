"""Image loading: every PIL mode, EXIF rotation, corrupt and hostile files, array inputs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slip.errors import ImageError, ImageTooLargeError
from slip.images import DEFAULT_MAX_PIXELS, image_sha256, load_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width x height`` RGB pixels, with no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def check_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert array.shape == (height, width, 3) and array.dtype == np.uint8
    assert array.flags["C_CONTIGUOUS"] and array.flags["WRITEABLE"]


# --- modes ------------------------------------------------------------------------------------------------


def test_rgb_round_trip_from_path_str_bytes_and_pil(tmp_path: Path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels))
    (tmp_path / "a.png").write_bytes(data)
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), data, bytearray(data), Image.fromarray(pixels)):
        out = load_image(source)
        check_rgb(out, 6, 9)
        assert np.array_equal(out, pixels)


def test_gray_and_bilevel():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(encode(Image.fromarray(gray, mode="L")))
    assert np.array_equal(out, np.repeat(gray[..., None], 3, 2))
    bits = load_image(encode(Image.fromarray(gray > 100).convert("1")))
    assert set(np.unique(bits)) == {0, 255} and np.array_equal(bits[..., 0] == 255, gray > 100)


def test_alpha_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[..., 3] = [[255, 0], [128, 255]]
    out = load_image(encode(Image.fromarray(rgba, mode="RGBA")))
    assert out[0, 0].tolist() == [200, 100, 50] and out[0, 1].tolist() == [0, 0, 0]
    assert out[1, 0].tolist() == [100, 50, 25]  # 128/255 of the colour, rounded
    la = np.stack([np.full((2, 2), 180, np.uint8), np.array([[255, 0], [0, 255]], np.uint8)], -1)
    out = load_image(encode(Image.fromarray(la, mode="LA")))
    assert out[0, 0].tolist() == [180] * 3 and out[0, 1].tolist() == [0, 0, 0]


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    assert load_image(encode(palette)).tolist() == [[[255, 0, 0], [0, 255, 0]]]
    transparent = load_image(encode(palette, transparency=0))
    assert transparent.tolist() == [[[0, 0, 0], [0, 255, 0]]]


def test_cmyk():
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red in CMYK
    for source in (cmyk, encode(cmyk, "JPEG", quality=100), encode(cmyk, "TIFF")):
        out = load_image(source)
        check_rgb(out, 2, 3)
        assert out[..., 0].min() > 240 and out[..., 1:].max() < 15


def test_sixteen_bit_is_scaled_to_eight():
    values = np.array([[0, 257, 257 * 100, 200], [65535, 32896, 128, 65406]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    assert image.mode == "I;16"
    for source in (image, encode(image)):
        out = load_image(source)
        assert out[..., 0].tolist() == [[0, 1, 100, 1], [255, 128, 0, 254]] and (out == out[..., :1]).all()


def test_thirty_two_bit_int_is_read_as_sixteen_bit_and_clipped():
    values = np.array([[-5, 257 * 7, 70000]], dtype=np.int32)
    image = Image.fromarray(values, mode="I")
    for source in (image, encode(image, "TIFF")):
        assert load_image(source)[..., 0].tolist() == [[0, 7, 255]]


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert load_image(encode(unit, "TIFF"))[..., 0].tolist() == [[0, 128, 255]]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 30.0, np.nan]], dtype=np.float32), mode="F")
    assert load_image(wide)[..., 0].tolist() == [[0, 64, 255, 64]]  # min-max normalised; NaN -> 0 -> 64


def test_exif_orientation_is_applied():
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)  # 10 rows x 20 columns, a bright left edge
    pixels[:, :3] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)
    out = load_image(data)
    check_rgb(out, 20, 10)
    assert out[:3].mean() > 200 and out[-3:].mean() < 50  # the left edge is now the top
    check_rgb(load_image(encode(Image.fromarray(pixels), "JPEG")), 10, 20)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    out = load_image(buffer.getvalue())
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


# --- hostile and broken input -----------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(ImageError, match="no such file") as info:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_truncated_png_names_the_file(tmp_path: Path):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png") as info:
        load_image(path)
    assert not isinstance(info.value, ImageTooLargeError)


def test_random_bytes_and_empty_bytes(tmp_path: Path):
    junk = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not an image"):
        load_image(junk)
    path = tmp_path / "junk.jpg"
    path.write_bytes(junk)
    with pytest.raises(ImageError, match="junk.jpg"):
        load_image(path)
    with pytest.raises(ImageError):
        load_image(b"")


def test_huge_header_is_refused_without_allocating():
    with pytest.raises(ImageTooLargeError):
        load_image(png_header(100_000, 100_000))  # 10^10 pixels: PIL's own bomb guard fires at open


def test_pixel_limit_is_checked_before_decoding():
    """The file has no pixel data: decoding first would fail as 'truncated', not as 'too large'."""
    with pytest.raises(ImageTooLargeError, match="5000x5000"):
        load_image(png_header(5000, 5000), max_pixels=1_000_000)
    with pytest.raises(ImageError, match="corrupt or truncated") as info:
        load_image(png_header(50, 50), max_pixels=1_000_000)
    assert not isinstance(info.value, ImageTooLargeError)


def test_pixel_limit_applies_to_every_source():
    pixels = np.zeros((10, 11, 3), dtype=np.uint8)
    for source in (pixels, Image.fromarray(pixels), encode(Image.fromarray(pixels))):
        with pytest.raises(ImageTooLargeError):
            load_image(source, max_pixels=109)
        check_rgb(load_image(source, max_pixels=110), 10, 11)
    assert DEFAULT_MAX_PIXELS >= 8000 * 8000


def test_arrays():
    pixels = np.random.default_rng(3).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    out = load_image(pixels)
    assert np.array_equal(out, pixels) and out is not pixels
    assert load_image(np.asfortranarray(pixels)).flags["C_CONTIGUOUS"]
    for bad in (pixels[..., 0], pixels.astype(np.float32), np.zeros((5, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageError):
            load_image(bad)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="int"):
        load_image(42)


def test_image_sha256():
    assert image_sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

"""Edges of datasets.io that mutation testing found unguarded: 16-bit (both byte orders), 32-bit and float images
brought to 0..255, inverted 1-bit masks, the header-only `image_size`, and the problems an `ImageReadError` names.

Expected pixels are worked by hand from the documented rules (> 127 is forged; 16-bit values / 257; floats
scaled by 255 when they lie in [0, 1], else taken as 0..255; rounded, clipped to 0..255). The files are written
by Pillow in the layouts it decodes them back to (checked below). See docs/DEVELOPMENT.md for the mutation run."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasets import io
from datasets.io import ImageReadError, image_size, read_image, read_mask

# 16-bit values and their 8-bit readings round(v / 257): 65280 = 255·256 tells /257 (254) from >> 8 (255).
SIXTEEN_BIT = np.array([[0, 300, 32896, 65280, 65535]])
SIXTEEN_BIT_AS_8 = [[0, 1, 128, 254, 255]]


def saved(path, image, mode):
    image.save(path)
    assert Image.open(path).mode == mode, "Pillow reads this layout back differently: the test no longer covers it"
    return path


def gray_of(path):
    """The single grey channel of an image read as RGB (all three equal)."""
    rgb = read_image(path)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    return rgb[..., 0].tolist()


# ---------------------------------------------------------------------------------------------------------- masks
# The 127/128 threshold of every mask layout is held by test_boundaries.py; here what it leaves: `invert` on 1-bit
# masks, whose pixels bypass the 0..255 reading.

def test_1_bit_mask_inverted(tmp_path):
    bits = np.array([[True, False, False], [False, True, True]])
    path = saved(tmp_path / "mask1.png", Image.fromarray(bits), "1")
    assert read_mask(path).dtype == np.bool_
    assert read_mask(path, invert=True).tolist() == (~bits).tolist()


# --------------------------------------------------------------------------------------------- wide and float images

def test_16_bit_images_of_every_byte_order_are_divided_by_257(tmp_path):
    little = saved(tmp_path / "little.png", Image.fromarray(SIXTEEN_BIT.astype(np.uint16)), "I;16")
    big = saved(tmp_path / "big.tif", Image.frombytes("I;16B", (5, 1), SIXTEEN_BIT.astype(">u2").tobytes()),
                "I;16B")
    little_im = saved(tmp_path / "little.im", Image.frombytes("I;16L", (5, 1), SIXTEEN_BIT.astype("<u2").tobytes()),
                      "I;16L")
    for path in (little, big, little_im):
        assert gray_of(path) == SIXTEEN_BIT_AS_8, path.name


def test_32_bit_integer_images(tmp_path):
    def read_int32(name, values):
        return gray_of(saved(tmp_path / name, Image.fromarray(np.array(values, np.int32)), "I"))

    # At most 255: already 8-bit values, kept as they are.
    assert read_int32("eight_bit.tif", [[0, 128, 255]]) == [[0, 128, 255]]
    # Above 255: the 16-bit scale, / 257, rounded and clipped (−514 → −2 → 0; 70000 → 272.4 → 255).
    assert read_int32("sixteen_bit.tif", [[0, 256]]) == [[0, 1]]
    assert read_int32("wide.tif", [[-514, 70000, 32896, 65280]]) == [[0, 255, 128, 254]]


def test_float_images(tmp_path):
    def read_float(name, values):
        return gray_of(saved(tmp_path / name, Image.fromarray(np.array(values, np.float32)), "F"))

    # Peak at most 1: a [0, 1] image, × 255 (0.5 → 127.5 → 128, half to even), clipped below at 0.
    assert read_float("unit.tif", [[0.0, 0.5, 1.0, -3.0]]) == [[0, 128, 255, 0]]
    # Peak above 1, even just 2: already on 0..255, rounded and clipped.
    assert read_float("two.tif", [[0.5, 2.0]]) == [[0, 2]]
    assert read_float("wide.tif", [[0.0, 100.4, 255.0, 300.0, -1.0]]) == [[0, 100, 255, 255, 0]]


# --------------------------------------------------------------------------------------------- sizes and problems

def test_image_size_reads_height_and_width(tmp_path):
    path = saved(tmp_path / "wide.png", Image.new("RGB", (5, 3)), "RGB")
    assert image_size(path) == (3, 5)
    assert image_size(str(path)) == (3, 5)


def problem_of(function, path):
    with pytest.raises(ImageReadError) as error:
        function(path)
    assert error.value.path == str(path)
    assert str(error.value) == f"cannot read '{path}': {error.value.problem}"
    return error.value.problem


def test_each_unusable_file_names_its_problem(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    truncated.write_bytes(whole.read_bytes()[:400])
    assert problem_of(read_image, tmp_path).startswith("is a folder")
    assert problem_of(read_mask, tmp_path / "absent.png") == "no such file"
    assert problem_of(read_image, text) == "not an image file (unknown or corrupt format)"
    assert problem_of(read_mask, truncated).startswith("corrupt or truncated image (")
    assert problem_of(image_size, tmp_path / "absent.png") == "no such file"
    assert problem_of(image_size, text) == "not an image file (unknown or corrupt format)"


def test_a_failed_conversion_names_the_mode(tmp_path, monkeypatch):
    path = saved(tmp_path / "rgba.png", Image.new("RGBA", (2, 2)), "RGBA")

    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError("no converter")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    assert problem_of(read_image, path) == "cannot convert mode RGBA to RGB (no converter)"


# ------------------------------------------------------------------------------------ the pixel limit and its refusal

@pytest.mark.parametrize("text, limit", [("4e8", 400_000_000), ("4E8", 400_000_000), ("1.5e3", 1500), ("2.9", 2),
                                         ("1", 1), ("12345678901234567891", 12345678901234567891)])
def test_pixel_limit_from_the_environment(monkeypatch, text, limit):
    # Integers are taken exactly (a float would round the last one to ...7168); a '.' or an 'e' reads as a float.
    monkeypatch.setattr(io, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setenv(io.MAX_IMAGE_PIXELS_ENV, text)
    assert io.max_image_pixels() == limit


def test_refusal_names_the_claimed_megapixels(tmp_path, monkeypatch):
    # 1050 × 1000 = 1.05 megapixels, printed with one decimal: 1.1 (1.05 is stored as 1.0500000000000000444).
    path = saved(tmp_path / "big.png", Image.new("L", (1050, 1000)), "L")
    monkeypatch.setattr(io, "MAX_IMAGE_PIXELS", 1_000_000)
    assert problem_of(read_image, path) == ("its header claims 1050×1000 pixels (1.1 megapixels), more than the limit "
                                            "of 1 megapixels; not decoded. If the image is genuine, raise the limit: "
                                            "MPC_MAX_IMAGE_PIXELS=<pixels>")


# WebP headers written by hand after the RIFF/WebP container layout: "RIFF", size, "WEBP", then the first chunk's
# FourCC, size and data. The readers take the canvas from the first 30 bytes, before Pillow sees the file. Each file
# is one Pillow cannot open (a chunk claiming more bytes than the file holds, or no image data), so only that
# pre-check can name the size.

def riff(form: bytes, chunk: bytes, data: bytes, tail: bytes = b"", declared: int | None = None) -> bytes:
    size = len(data) if declared is None else declared
    body = form + chunk + size.to_bytes(4, "little") + data + tail
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def vp8x(width: int, height: int) -> bytes:
    """Extended format: flags and reserved bytes, then width − 1 and height − 1 in 24 bits each."""
    return bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")


def vp8(width: int, height: int) -> bytes:
    """Lossy key frame: 3-byte frame tag, start code 9d 01 2a, then 14-bit width and height, each with 2 scale bits
    on top (set here: the reader must mask them off)."""
    start = b"\x10\x02\x00\x9d\x01\x2a"
    return start + (width | 1 << 14).to_bytes(2, "little") + (height | 3 << 14).to_bytes(2, "little")


def vp8l(width: int, height: int) -> bytes:
    """Lossless: signature 0x2f, then 32 bits: width − 1 (14 bits), height − 1 (14 bits), alpha flag, version 0."""
    return b"\x2f" + ((width - 1) | (height - 1) << 14 | 1 << 28).to_bytes(4, "little")


WEBP_HEADERS = {
    # exactly 30 bytes, the whole header the reader looks at; sizes needing all three bytes of each field
    "extended": (riff(b"WEBP", b"VP8X", vp8x(70_000, 300_000)), 70_000, 300_000),
    "lossy": (riff(b"WEBP", b"VP8 ", vp8(300, 200), tail=bytes(16)), 300, 200),
    "lossless": (riff(b"WEBP", b"VP8L", vp8l(300, 200), tail=bytes(16), declared=10_000), 300, 200),
}


@pytest.mark.parametrize("kind", list(WEBP_HEADERS))
def test_webp_canvas_is_refused_from_the_header(tmp_path, monkeypatch, kind):
    data, width, height = WEBP_HEADERS[kind]
    path = tmp_path / f"{kind}.webp"
    path.write_bytes(data)
    monkeypatch.setattr(io, "MAX_IMAGE_PIXELS", 1000)
    for reader in (read_image, image_size):
        assert problem_of(reader, path).startswith(f"its header claims {width}×{height} pixels ("), reader


@pytest.mark.parametrize("data, problem", [
    # another RIFF form whose first chunk happens to read VP8X; a RIFX (not RIFF) container: not WebP at all
    (riff(b"AVI ", b"VP8X", vp8x(70_000, 300_000)), "not an image file (unknown or corrupt format)"),
    (b"RIFX" + riff(b"WEBP", b"VP8X", vp8x(70_000, 300_000))[4:], "not an image file (unknown or corrupt format)"),
    # one byte short of the header: Pillow recognises WebP and fails to decode it
    (riff(b"WEBP", b"VP8X", vp8x(70_000, 300_000))[:29], "corrupt or truncated image ("),
], ids=["avi", "rifx", "short"])
def test_files_that_are_not_a_whole_webp_header_are_left_to_pillow(tmp_path, data, problem):
    path = tmp_path / "odd.webp"
    path.write_bytes(data)
    assert problem_of(read_image, path).startswith(problem)


def test_a_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    path = saved(tmp_path / "a.png", Image.new("L", (2, 2)), "L")

    def unreadable(_path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io, "_webp_canvas", unreadable)
    assert problem_of(read_image, path) == "cannot be opened (Permission denied)"


# -------------------------------------------------------------------------------------------- mask conventions

def test_a_colour_mask_is_refused_counting_what_each_reading_finds(tmp_path):
    # Blue (the rule) marks 2 pixels; red marks 2 the rule misses.
    rgb = np.array([[[0, 0, 200], [0, 0, 255], [200, 0, 0], [255, 0, 0], [0, 0, 0]]], np.uint8)
    path = saved(tmp_path / "red.png", Image.fromarray(rgb), "RGB")
    assert problem_of(read_mask, path).startswith("the mask rule (grey value, or the blue channel of a colour mask, "
                                                  "> 127 = forged) reads 2 forged pixels, but the red channel marks "
                                                  "2 more")


def test_a_faint_mask_is_refused_naming_its_values(tmp_path):
    path = saved(tmp_path / "faint.png", Image.fromarray(np.array([[0, 100, 100]], np.uint8)), "L")
    assert problem_of(read_mask, path).startswith("mask values are only 0 to 100 (2 non-zero pixels)")


def rgba_mask(tmp_path, rgb_value, alphas):
    """A one-row RGBA mask: every pixel the colour (v, v, v), with the given alpha values."""
    pixels = np.zeros((1, len(alphas), 4), np.uint8)
    pixels[..., :3] = rgb_value
    pixels[0, :, 3] = alphas
    return saved(tmp_path / "rgba.png", Image.fromarray(pixels), "RGBA")


def test_alpha_at_127_is_transparent(tmp_path):
    # Black everywhere: the rule reads nothing forged. Alpha 127 is not > 127, so no shape is drawn: read as is.
    path = rgba_mask(tmp_path, 0, [127] * 5 + [0] * 5)
    assert read_mask(path).tolist() == [[False] * 10]


def test_a_single_opaque_pixel_is_a_shape(tmp_path):
    path = rgba_mask(tmp_path, 0, [255] + [0] * 9)
    assert problem_of(read_mask, path).startswith("its alpha channel draws a shape of 1 opaque pixels")


def test_alpha_disagreeing_on_exactly_one_percent_is_tolerated(tmp_path):
    # White everywhere: the rule reads all 100 pixels forged; 99 are opaque. They disagree on 1 of 100: not more
    # than 1 %, so the mask is read; on 2 of 100 it is refused.
    assert read_mask(rgba_mask(tmp_path, 255, [255] * 99 + [0])).all()
    assert problem_of(read_mask, rgba_mask(tmp_path, 255, [255] * 98 + [0, 0])).startswith("its alpha channel")


def palette_mask(tmp_path, transparent_index):
    """Black (0) and white (1) palette colours; the left half white. With `transparent_index`, that colour is
    transparent (a PNG tRNS entry)."""
    image = Image.fromarray(np.array([[1] * 5 + [0] * 5], np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255])
    path = tmp_path / "palette.png"
    image.save(path, **({} if transparent_index is None else {"transparency": transparent_index}))
    assert Image.open(path).mode == "P"
    return path


def test_palette_transparency_is_the_alpha_channel(tmp_path):
    # White made transparent: the opaque shape (the right half) is the opposite of what the rule reads.
    assert problem_of(read_mask, palette_mask(tmp_path, transparent_index=1)).startswith("its alpha channel")
    # Black made transparent: the opaque shape is the white half, which the rule reads forged: no conflict.
    assert read_mask(palette_mask(tmp_path, transparent_index=0)).tolist() == [[True] * 5 + [False] * 5]
    assert read_mask(palette_mask(tmp_path, transparent_index=None)).tolist() == [[True] * 5 + [False] * 5]


def test_grey_transparency_is_ignored(tmp_path):
    # A grey PNG with a transparent grey level (tRNS) has no alpha channel to read: as cv2.imread, ignored.
    path = tmp_path / "grey_trns.png"
    Image.fromarray(np.array([[0, 100, 200, 200]], np.uint8)).save(path, transparency=0)
    assert Image.open(path).mode == "L" and "transparency" in Image.open(path).info
    assert read_mask(path).tolist() == [[False, False, True, True]]


def test_a_failed_mask_conversion_names_the_file(tmp_path, monkeypatch):
    path = saved(tmp_path / "rgba_mask.png", Image.new("RGBA", (2, 2)), "RGBA")

    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError("no converter")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    for reader in (read_mask, io.read_mask_pixels):
        assert problem_of(reader, path) == "cannot convert mode RGBA to RGB (no converter)"

"""Reading images and masks of any layout into the arrays the pipeline expects.

Images come back as RGB uint8 H×W×3, masks as bool H×W (True = forged). Grayscale, palette, RGBA, 1-bit, 16-bit
and CMYK files are converted; a missing, unreadable or truncated file raises `ImageReadError` naming it.
Pillow decodes (it detects truncated files, which OpenCV silently pads with grey); its JPEG decoder is the same
libjpeg-turbo OpenCV uses, so pixels equal the official `cv2.imread` result for ordinary 8-bit files.

Hostile files are refused before anything is decoded: a path that is not a regular file (a folder, a named pipe, a
device, a socket) is never opened, and a header claiming more than `max_image_pixels()` pixels is not decoded. A mask
in another convention than the mask rule (see `read_mask`) is refused rather than read as all-authentic.
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import UserError
from utils.files import not_a_regular_file

# Pillow's own bomb check (a warning above 89 MP, an error above 179 MP, only after its WebP decoder has already
# allocated the canvas) is replaced by ours, applied by every reader here to the size the header claims, before
# anything is decoded.
Image.MAX_IMAGE_PIXELS = None
# 200 megapixels. Forensic images are large but far below it: NIST16 probes are 4000×3264 (13 MP), the largest
# photographs users bring are 12000×9000 (108 MP). The reader's peak is about 10 bytes per pixel for RGB files and 13
# for RGBA (measured on 50 MP files), so 2-2.7 GB at the limit, which a workstation survives; a small file claiming a
# 65535×65535 canvas (4.3 gigapixels, 13 GB as RGB) is refused instead of taking the machine's memory.
DEFAULT_MAX_IMAGE_PIXELS = 200_000_000
MAX_IMAGE_PIXELS_ENV = "MPC_MAX_IMAGE_PIXELS"  # raises (or lowers) the limit for a run, worker processes included
MAX_IMAGE_PIXELS: int | None = None  # set in code to override the environment variable and the default

MASK_THRESHOLD = 127  # the official binarisation of masks and predicted maps on 0-255: > 127 is forged
# What the readers accept by name when looking through folders (a file named directly is always tried).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm",
                              ".jp2"})


class ImageReadError(UserError, ValueError):
    """A file that cannot be used as an image or a mask; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot read '{self.path}': {problem}")


def max_image_pixels() -> int:
    """The largest width × height the readers decode: `MAX_IMAGE_PIXELS` when set, else the environment variable
    `MPC_MAX_IMAGE_PIXELS`, else `DEFAULT_MAX_IMAGE_PIXELS` (200 megapixels)."""
    if MAX_IMAGE_PIXELS is not None:
        return int(MAX_IMAGE_PIXELS)
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(float(text)) if any(c in text.lower() for c in ".e") else int(text)  # 4e8 is accepted
    except (ValueError, OverflowError):
        limit = 0
    if limit <= 0:
        raise UserError(f"{MAX_IMAGE_PIXELS_ENV}={text!r}: expected a positive number of pixels, e.g. 400000000")
    return limit


def _refuse_oversized(path: str, size: tuple[int, int] | None) -> None:
    if size is None:
        return
    width, height = size
    limit = max_image_pixels()
    if width * height > limit:
        raise ImageReadError(path, f"its header claims {width}×{height} pixels ({width * height / 1e6:.1f} "
                                   f"megapixels), more than the limit of {limit / 1e6:g} megapixels; not decoded. If "
                                   f"the image is genuine, raise the limit: {MAX_IMAGE_PIXELS_ENV}=<pixels>")


def _webp_canvas(path: str) -> tuple[int, int] | None:
    """(width, height) a WebP file's first chunk claims, read by hand: Pillow's WebP decoder allocates the whole
    canvas while opening, before any size check could run. None for other files."""
    with open(path, "rb") as handle:
        head = handle.read(30)
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":  # extended format: 24-bit canvas width - 1 and height - 1
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8 ":  # lossy key frame: 14-bit width and height after the start code
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature byte, then 14-bit width - 1 and height - 1
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _open_header(path) -> Image.Image:
    """The file opened with only its header parsed, after the checks that must come before any decoding."""
    path = os.fspath(path)
    problem = not_a_regular_file(path)
    if problem is not None:
        raise ImageReadError(path, problem)
    try:
        canvas = _webp_canvas(path)
    except OSError as error:
        raise ImageReadError(path, f"cannot be opened ({error.strerror})") from None
    _refuse_oversized(path, canvas)
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"corrupt or truncated image ({error})") from None
    try:
        _refuse_oversized(path, image.size)  # every format's size is known once its header is parsed
    except ImageReadError:
        image.close()
        raise
    return image


def _open(path) -> Image.Image:
    image = _open_header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"corrupt or truncated image ({error})") from None
    return image


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Bring 16- and 32-bit integer or float samples to 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        peak = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        return np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8)
    # Integer data wider than 8 bits: 16-bit files use the full 0..65535 range.
    if array.max(initial=0) > 255:
        return np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    return array.astype(np.uint8)


def _rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        gray = _to_uint8(np.asarray(image))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")  # palette, L, LA, 1, RGBA (alpha dropped, as cv2 does), CMYK, YCbCr
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def read_image(path) -> np.ndarray:
    """RGB uint8 H×W×3 of any image file; raises ImageReadError naming the file."""
    image = _open(path)
    try:
        return _rgb_array(image)
    except (OSError, ValueError) as error:
        raise ImageReadError(path, f"cannot convert mode {image.mode} to RGB ({error})") from None


class MaskPixels(NamedTuple):
    """A mask file's pixels before the mask rule: `rgb` as `read_image` gives it, `alpha` when the file has
    transparency, `single_channel` when the file is grey (its three channels are equal by construction)."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    single_channel: bool


_SINGLE_CHANNEL_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})


def _mask_pixels(image: Image.Image, path) -> MaskPixels:
    try:
        rgb = _rgb_array(image)
        if "A" in image.getbands():
            alpha = np.asarray(image.getchannel("A"))
        elif image.mode == "P" and "transparency" in image.info:
            alpha = np.asarray(image.convert("RGBA").getchannel("A"))
        else:
            alpha = None
    except (OSError, ValueError) as error:
        raise ImageReadError(path, f"cannot convert mode {image.mode} to RGB ({error})") from None
    return MaskPixels(rgb, alpha, image.mode in _SINGLE_CHANNEL_MODES)


def read_mask_pixels(path) -> MaskPixels:
    """A mask file's RGB pixels, alpha and kind, for checks and conversions (`datasets.flist`)."""
    return _mask_pixels(_open(path), path)


# A reading that disagrees with another channel on more than 1 % of the pixels that channel marks is not a rounding
# difference: grey masks stored as JPEG differ between channels by a few levels, on a few border pixels only.
CONVENTION_TOLERANCE = 0.01
CONVERSION_HINT = "rebuild the list with generate_flist.py --mask-convention {} (writes 0/255 copies)"


def mask_convention_problem(pixels: MaskPixels) -> str | None:
    """Why the mask rule would misread this mask, or None.

    The rule (the official reader's): the grey value, or the blue channel of a colour file (OpenCV's first, BGR),
    > 127 is forged; transparency is ignored, as `cv2.imread` ignores it. Misread: values that are all at most 127
    but not all 0 (a 0/1 mask reads all-authentic), another colour channel marking pixels the rule misses (a mask
    drawn in red or green, or a grey mask whose channels differ), an alpha channel drawing a shape the rule does not
    read (a black or white layer whose transparency carries the mask).
    """
    rgb = pixels.rgb
    official = rgb[:, :, 2] > MASK_THRESHOLD
    n_official = int(np.count_nonzero(official))
    if n_official == 0:
        peak = int(rgb.max(initial=0))
        if 0 < peak <= MASK_THRESHOLD:
            values = "0 and 1" if peak == 1 else f"0 to {peak}"
            return (f"mask values are only {values} ({int(np.count_nonzero(rgb.max(axis=2)))} non-zero pixels): the "
                    f"mask rule reads > {MASK_THRESHOLD} as forged, so it reads as all-authentic; if non-zero means "
                    f"forged, {CONVERSION_HINT.format('nonzero')}")
    if not pixels.single_channel:
        marked = rgb > MASK_THRESHOLD
        colour = marked.any(axis=2)
        missed = int(np.count_nonzero(colour & ~official))
        if missed > CONVENTION_TOLERANCE * np.count_nonzero(colour):
            channels = " and ".join(name for index, name in ((0, "red"), (1, "green"))
                                    if np.any(marked[:, :, index] & ~official))
            return (f"the mask rule (grey value, or the blue channel of a colour mask, > {MASK_THRESHOLD} = forged) "
                    f"reads {n_official} forged pixels, but the {channels} channel marks {missed} more: a mask drawn "
                    f"in colour, or a grey mask whose channels differ; if any colour means forged, "
                    f"{CONVERSION_HINT.format('colour')}")
    if pixels.alpha is not None:
        shape = pixels.alpha > MASK_THRESHOLD
        n_shape = int(np.count_nonzero(shape))
        if 0 < n_shape < shape.size:  # a constant alpha carries nothing (CASIA v2 masks are opaque RGBA)
            differ = int(np.count_nonzero(shape ^ official))
            if differ > CONVENTION_TOLERANCE * np.count_nonzero(shape | official):
                return (f"its alpha channel draws a shape of {n_shape} opaque pixels that the mask rule (which "
                        f"ignores transparency, as OpenCV does) reads differently ({n_official} forged pixels, "
                        f"{differ} disagree); if the opaque part is the forged region, "
                        f"{CONVERSION_HINT.format('alpha')}")
    return None


def read_mask(path, invert: bool = False) -> np.ndarray:
    """Binary mask (True = forged) of any mask file, at its stored size.

    As the official code, a colour mask is read as 3 channels and the first channel of OpenCV's BGR order (blue)
    is thresholded at > 127; for gray, palette and 1-bit masks that is simply the gray value. A mask that this rule
    would misread (`mask_convention_problem`: a 0/1 mask, a mask drawn in colour, a shape carried by transparency)
    raises `ImageReadError` saying what was found and how to convert it, instead of being scored as all-authentic.
    `invert` is for sets whose masks mark forged pixels black (NIST16); such masks are read as they are.
    """
    image = _open(path)
    if image.mode == "1":
        mask = np.asarray(image, dtype=bool)
    else:
        pixels = _mask_pixels(image, path)
        if not invert:
            problem = mask_convention_problem(pixels)
            if problem is not None:
                raise ImageReadError(path, problem)
        mask = pixels.rgb[:, :, 2] > MASK_THRESHOLD
    return ~mask if invert else mask


def image_size(path) -> tuple[int, int]:
    """(height, width) read from the header only (refused above `max_image_pixels()`, like every reader here)."""
    path = os.fspath(path)
    with _open_header(path) as image:
        width, height = image.size
    return height, width

"""Reading images and masks of any layout into the arrays the pipeline expects.

Images come back as RGB uint8 H×W×3, masks as bool H×W (True = forged). Grayscale, palette, RGBA, 1-bit, 16-bit
and CMYK files are converted; a missing, unreadable or truncated file raises `ImageReadError` naming it.
Pillow decodes (it detects truncated files, which OpenCV silently pads with grey); its JPEG decoder is the same
libjpeg-turbo OpenCV uses, so pixels equal the official `cv2.imread` result for ordinary 8-bit files.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Forensic datasets hold large images (NIST16 probes are 4000×3264, some are larger); they are not bombs.
Image.MAX_IMAGE_PIXELS = None

MASK_THRESHOLD = 127  # the official binarisation: > 127 is forged


class ImageReadError(ValueError):
    """A file that cannot be used as an image or a mask; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot read '{self.path}': {problem}")


def _open(path) -> Image.Image:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageReadError(path, "no such file")
    if os.path.isdir(path):
        raise ImageReadError(path, "is a folder, not an image")
    try:
        image = Image.open(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unknown or corrupt format)") from None
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


def read_mask(path, invert: bool = False) -> np.ndarray:
    """Binary mask (True = forged) of any mask file, at its stored size.

    As the official code, a colour mask is read as 3 channels and the first channel of OpenCV's BGR order (blue)
    is thresholded at > 127; for gray, palette and 1-bit masks that is simply the gray value. `invert` is for sets
    whose masks mark forged pixels black (NIST16).
    """
    image = _open(path)
    if image.mode == "1":
        mask = np.asarray(image, dtype=bool)
    else:
        mask = _rgb_array(image)[:, :, 2] > MASK_THRESHOLD
    return ~mask if invert else mask


def image_size(path) -> tuple[int, int]:
    """(height, width) read from the header only."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageReadError(path, "no such file")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"not a readable image ({error})") from None
    return height, width

"""Writing files so that a crash never leaves half of one: a temporary file beside the target, flushed and fsync'd,
then renamed over it. Every result, list, mask, plot and checkpoint of the project is written this way."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import cv2
import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates its file readable by its owner only; the finished file gets the mode open() would have given it.
FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_output(path) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:  # owns the descriptor from here: closed whatever happens
            os.fchmod(stream.fileno(), FILE_MODE)
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_output(path) as stream:
        stream.write(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_png(path, image: np.ndarray) -> Path:
    """An RGB (H×W×3) or gray (H×W) uint8 image as a PNG, atomically."""
    if image.ndim == 3:
        image = image[:, :, ::-1]  # OpenCV writes BGR
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise RuntimeError(f"OpenCV could not PNG-encode an image of shape {image.shape} for {path}")
    return atomic_write_bytes(path, encoded.tobytes())

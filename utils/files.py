"""Writing files so that a crash never leaves half of one: a temporary file beside the target, flushed and fsync'd,
then renamed over it. Every result, list, mask, plot and checkpoint of the project is written this way.

A write that fails (disk full, a file-size limit, a folder that is read-only or gone) raises `OutputWriteError`
naming the output; the temporary is removed and an earlier file at that path stays whole.
"""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import cv2
import numpy as np

from utils.errors import UserError


class OutputWriteError(UserError, OSError):
    """An output file that could not be written; `path` is the output, `errno`/`strerror` the system's reason."""

    def __init__(self, path, reason: str, errno: int | None = None):
        super().__init__(errno, reason)
        self.path = str(path)

    def __str__(self) -> str:
        return f"cannot write '{self.path}': {self.strerror}"

    def __reduce__(self):
        return type(self), (self.path, self.strerror, self.errno)


def _write_error(path, error: OSError) -> OutputWriteError:
    return OutputWriteError(path, error.strerror or str(error), error.errno)


class _WatchedStream:
    """The temporary file as the caller's block sees it, remembering the first failed write: torch.save reports a
    failed write as an unrelated RuntimeError ("unexpected pos ..."), so the cause is taken from here."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self.failure: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._stream.write(data)
        except OSError as error:
            self.failure = self.failure or error
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_a_regular_file(path) -> str | None:
    """Why `path` cannot be read as a file ("no such file", or what it is instead), found with `stat`, without
    opening it (opening a named pipe blocks until someone writes to it; reading a device never ends); None for a
    regular file or a link to one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return f"cannot be examined ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "a special file")
    return f"is {kind}, not a regular file (refused without opening it)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates its file readable by its owner only; the finished file gets the mode open() would have given it.
FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_output(path) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` only when the block finishes without error.

    The block should only write to the stream: a write that fails there, or a failure to create, flush, sync or
    rename the temporary, raises `OutputWriteError` naming `path`; any other error of the block passes unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _write_error(path, error) from error
    block_failed = False
    try:
        with os.fdopen(handle, "wb") as stream:  # owns the descriptor from here: closed whatever happens
            os.fchmod(stream.fileno(), FILE_MODE)
            watched = _WatchedStream(stream)
            try:
                yield watched
            except BaseException as error:
                block_failed = True
                if watched.failure is None:
                    raise
                raise _write_error(path, watched.failure) from error
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if block_failed or isinstance(error, OutputWriteError):
            raise
        raise _write_error(path, error) from error
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass  # renamed into place
        except OSError:
            pass  # the folder turned read-only after the temporary was made: nothing more can be done here


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

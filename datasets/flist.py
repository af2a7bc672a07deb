"""File lists in the official format: a NumPy `.npy` of shape (N, 2) holding (image path, mask path) strings,
an empty mask path meaning an authentic image, named `<name>_<N>.npy`. Lists made by the authors' script load
unchanged; nothing is ever unpickled."""
from __future__ import annotations

import os
import tempfile

import numpy as np


class FileListError(ValueError):
    """A file list that cannot be used; the message names the file and the problem."""


def read_flist(path) -> np.ndarray:
    """The (N, 2) array of str rows of a `.npy` file list."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileListError(f"file list '{path}' does not exist (make one with generate_flist.py)")
    try:
        rows = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise FileListError(f"'{path}' holds Python objects, not a file list of strings ({error})") from None
    except Exception as error:
        raise FileListError(f"'{path}' is not a readable .npy file list ({error})") from None
    if rows.ndim != 2 or rows.shape[1] != 2 or rows.dtype.kind not in "US":
        raise FileListError(f"'{path}' is not a file list: expected an (N, 2) array of path strings, "
                            f"found shape {rows.shape} of dtype {rows.dtype}")
    if len(rows) == 0:
        raise FileListError(f"'{path}' is an empty file list")
    return rows.astype(str)


def write_flist(rows, out_dir, name: str) -> str:
    """Write `rows` as `<out_dir>/<name>_<N>.npy` atomically; returns the path."""
    array = np.asarray([(str(image), str(mask)) for image, mask in rows], dtype=str).reshape(-1, 2)
    if len(array) == 0:
        raise FileListError(f"refusing to write an empty file list '{name}'")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), f"{name}_{len(array)}.npy")
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".npy.tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path

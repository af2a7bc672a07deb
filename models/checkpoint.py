"""The one owner of this project's checkpoint files: the format tag and version, writing, reading, release copies.

Every weights file is read here with ``torch.load(weights_only=True)`` after the registry check of released files, and
every failure is a ``CheckpointError`` naming the file. Our checkpoints are plain dicts of tensors and primitives:
``format`` ("mpc-reimpl"), ``version`` (the layout of this dict, ``FORMAT_VERSION``), ``stage``, ``model``
(state_dict), ``config`` (the resolved YAML, which carries its own ``VERSION``), ``step``, ``best_score`` and, in
training checkpoints, what a resume needs: ``optimizer``, ``scheduler``, ``scaler``, ``sampler``, ``rng``,
``skipped_nonfinite``, ``skipped_samples``.

A ``.safetensors`` release (``models.export.export_safetensors``; any file whose header is a safetensors header)
holds the state_dict's tensors only, with string metadata: ``format`` (``SAFETENSORS_FORMAT``), ``format_version``,
``backbone``, ``head``, ``stage``, ``input_size``, ``source_format``, and for our models ``config`` (the YAML). It
is read into the layout above (ours) or as a bare state_dict (official weights, or a safetensors file of plain
tensors written elsewhere), so everything that loads a ``.pth`` loads it. Nothing is unpickled: safetensors stores
raw tensor bytes behind a JSON header.
"""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from utils.files import atomic_output, not_a_regular_file

from .errors import CheckpointError
from .registry import verify_weights

__all__ = ["FORMAT_VERSION", "OUR_FORMAT", "RELEASE_KEYS", "SAFETENSORS_FORMAT", "SAFETENSORS_VERSION",
           "CheckpointError", "check_weights_file", "export_weights", "is_safetensors", "read_checkpoint",
           "read_training_checkpoint",
           "safetensors_metadata", "save_checkpoint"]

OUR_FORMAT = "mpc-reimpl"  # value of the "format" key in checkpoints written by this project
# Layout of our checkpoint dict. 1: the files written before the key existed (read as 1); 2: adds "version" and
# "skipped_samples". Bump it when a key changes meaning, and teach read_training_checkpoint the older layouts.
FORMAT_VERSION = 2
RELEASE_KEYS = ("format", "version", "stage", "model", "config", "step", "best_score")
SAFETENSORS_FORMAT = "mpc-reimpl-safetensors"  # value of the "format" metadata of our .safetensors releases
# Layout of that metadata. 1: format, format_version, stage, backbone, head, input_size, source_format, [config].
SAFETENSORS_VERSION = 1
SAFETENSORS_SUFFIX = ".safetensors"
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


def _weights_only_reason(error: Exception) -> str:
    """The useful part of torch's long weights_only error text."""
    text = " ".join(str(error).split())
    reason = text.partition("WeightsUnpickler error:")[2].partition(" Check the documentation")[0]
    reason = reason.partition(" Please use")[0].strip()  # drop torch's advice to allow-list the class
    return (reason or text)[:300]


def read_checkpoint(path, map_location="cpu", mmap: bool = False) -> object:
    """A weights file's contents, read with ``weights_only=True`` after the registry check (size and SHA-256 of
    released files). ``mmap`` maps the tensors instead of copying them where the format allows (the legacy non-zip
    format cannot be mapped and is then read normally). A floating-point tensor holding NaN or infinity refuses the
    file. Every failure is a ``CheckpointError`` naming the file (and the tensor)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx" and not_a_regular_file(path) is None:
        raise CheckpointError(f"{path}: an ONNX model, not PyTorch weights; run it with ONNX Runtime "
                              "(stage2/infer.py --backend onnxruntime, models.onnx_backend.load_onnx_model)")
    check_weights_file(path)
    if is_safetensors(path):
        contents = _load_safetensors(path, map_location)
    else:
        contents = _load(path, map_location, mmap)
    _refuse_nonfinite(contents, path)
    return contents


def check_weights_file(path) -> None:
    """What every weights reader checks before opening a file: that it is a regular file, and that a released file
    matches its registry entry (size and SHA-256). A ``CheckpointError`` naming the file otherwise."""
    problem = not_a_regular_file(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {'file not found' if problem == 'no such file' else problem}")
    verify_weights(path)


def _floating_tensors(value, name: str = ""):
    """(dotted name, tensor) of every floating-point tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floating_tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _floating_tensors(item, f"{name}.{index}" if name else str(index))


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(tensor.detach().numpy()).all())  # several times faster than torch.isfinite on CPU
    return bool(torch.isfinite(tensor).all())


def _refuse_nonfinite(contents, path) -> None:
    """A weights file holding NaN or infinity (a diverged run, a corrupt copy) is refused here, naming the tensor,
    rather than failing later with an unrelated message. One vectorised pass per tensor."""
    for name, tensor in _floating_tensors(contents):
        if _all_finite(tensor):
            continue
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        found = " and ".join(part for part in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} infinite" if n_inf else "")
                             if part)
        raise CheckpointError(f"{path}: tensor '{name}' holds {found} value(s) out of {tensor.numel()}; the weights "
                              "are numerically broken (a diverged run or a damaged copy) and are refused")


def _load(path: Path, map_location, mmap: bool) -> object:
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not (mmap and "mmap" in str(error)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _weights_only_reason(error)
        if "Unsupported global" in reason:
            raise CheckpointError(
                f"{path}: holds Python objects that need code to unpickle; only plain tensors and containers "
                f"are accepted (torch.load weights_only=True): {reason}"
            ) from error
        raise CheckpointError(f"{path}: not a PyTorch weights file, or corrupt: {reason}") from error
    except Exception as error:  # torch.load signals truncated/corrupt files with many exception types
        raise CheckpointError(
            f"{path}: cannot be read ({type(error).__name__}: {_first_sentence(error)}); the file is truncated, "
            f"corrupt or not a PyTorch checkpoint"
        ) from error




def is_safetensors(path) -> bool:
    """Whether a file is (or claims by its name to be) a safetensors file: the ``.safetensors`` extension, or the
    format's header (an 8-byte little-endian length, then a JSON object of that length that fits in the file)
    under any name. A zip (``torch.save``) or pickle file never passes the header test: its first 8 bytes read as a
    length far beyond the file."""
    path = Path(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return True
    try:
        with path.open("rb") as stream:
            start = stream.read(9)
    except OSError:
        return False
    if len(start) < 9:
        return False
    (length,) = struct.unpack("<Q", start[:8])
    return start[8:9] == b"{" and length <= min(path.stat().st_size - 8, _SAFETENSORS_MAX_HEADER)


def safetensors_metadata(path) -> dict[str, str] | None:
    """The string metadata of a safetensors file (``{}`` when it has none); None for any other file."""
    path = Path(path)
    if not is_safetensors(path):
        return None
    return _safetensors_header(path).get("__metadata__") or {}


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked the way the format defines it; a ``CheckpointError`` naming
    the file otherwise (a truncated download, another format under the name, a damaged header)."""
    try:
        with path.open("rb") as stream:
            start = stream.read(8)
            if len(start) < 8:
                raise CheckpointError(f"{path}: not a safetensors file: {len(start)} bytes, shorter than the "
                                      "8-byte header length (an empty or truncated file)")
            (length,) = struct.unpack("<Q", start)
            size = path.stat().st_size
            if length > min(size - 8, _SAFETENSORS_MAX_HEADER):
                raise CheckpointError(f"{path}: not a safetensors file, or truncated: its header claims {length:,} "
                                      f"bytes and the file holds {size:,}")
            text = stream.read(length)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from error
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a safetensors file, or corrupt: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file: its header is a {type(header).__name__}")
    return header


def _load_safetensors(path: Path, map_location) -> object:
    """A safetensors file as read_checkpoint's callers expect it: our checkpoint layout when its metadata carries our
    config, a bare state_dict otherwise (exported official weights, whose backbone ``safetensors_metadata`` gives, or
    plain tensors written elsewhere)."""
    from safetensors import SafetensorError, safe_open

    metadata = _safetensors_header(path).get("__metadata__") or {}
    ours = metadata.get("format") == SAFETENSORS_FORMAT
    if ours:
        _check_safetensors_version(path, metadata)
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as stream:
            state = {name: stream.get_tensor(name) for name in stream.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a safetensors file, or truncated or corrupt: "
                              f"{_first_sentence(error)}") from error
    if not (ours and metadata.get("config")):  # official weights (their backbone is in the metadata) or foreign
        return state
    try:
        stage = int(metadata.get("stage", 2))
    except ValueError:
        raise CheckpointError(f"{path}: its metadata names no readable stage ({metadata.get('stage')!r})") from None
    return {"format": OUR_FORMAT, "version": FORMAT_VERSION, "stage": stage, "model": state,
            "config": metadata["config"]}


def _check_safetensors_version(path: Path, metadata: dict) -> None:
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"{path}: its metadata names no readable format_version "
                              f"({metadata.get('format_version')!r})") from None
    if version > SAFETENSORS_VERSION:
        raise CheckpointError(f"{path}: written by a newer version of this project (safetensors release format "
                              f"{version}, this code reads up to {SAFETENSORS_VERSION})")


def _first_sentence(error: Exception, limit: int = 200) -> str:
    """The start of an error's text, cut at a sentence end rather than mid-word."""
    text = " ".join(str(error).split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind("; "))
    return (cut[:end + 1] if end > 0 else cut.rsplit(" ", 1)[0]) + " ..."


def save_checkpoint(contents: dict, path) -> Path:
    """Write one of our checkpoints atomically (a crash leaves the previous file whole), tagged with the format and
    its version."""
    tagged = {"format": OUR_FORMAT, "version": FORMAT_VERSION, **contents}
    with atomic_output(path) as stream:
        torch.save(tagged, stream)
    return Path(path)


def is_ours(contents: object) -> bool:
    return isinstance(contents, dict) and contents.get("format") == OUR_FORMAT


def read_training_checkpoint(path, map_location="cpu") -> dict:
    """One of our checkpoints, for resuming or exporting; anything else is a ``CheckpointError`` naming the file."""
    contents = read_checkpoint(path, map_location)
    if not is_ours(contents):
        raise CheckpointError(f"{path}: not a checkpoint of this project (no format '{OUR_FORMAT}'); to start from "
                              "other weights use MODEL.IMAGENET_WEIGHTS or MODEL.STAGE1_WEIGHTS")
    version = int(contents.get("version", 1))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer version of this project (checkpoint format {version}, "
                              f"this code reads up to {FORMAT_VERSION})")
    contents.setdefault("version", version)
    contents.setdefault("skipped_samples", 0)  # format 1 did not keep the count
    return contents


def export_weights(checkpoint_path, out_path) -> Path:
    """A release copy of a training checkpoint: the model, its config, step and score, without the optimiser,
    scheduler and RNG states a resume needs. It loads wherever the full checkpoint does (test, infer,
    ``models.load_checkpoint``)."""
    contents = read_training_checkpoint(checkpoint_path)
    return save_checkpoint({key: contents[key] for key in RELEASE_KEYS if key in contents}, out_path)

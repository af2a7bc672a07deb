"""The one owner of this project's checkpoint files: the format tag and version, writing, reading, release copies.

Every weights file is read here with ``torch.load(weights_only=True)`` after the registry check of released files, and
every failure is a ``CheckpointError`` naming the file. Our checkpoints are plain dicts of tensors and primitives:
``format`` ("mpc-reimpl"), ``version`` (the layout of this dict, ``FORMAT_VERSION``), ``stage``, ``model``
(state_dict), ``config`` (the resolved YAML, which carries its own ``VERSION``), ``step``, ``best_score`` and, in
training checkpoints, what a resume needs: ``optimizer``, ``scheduler``, ``scaler``, ``sampler``, ``rng``,
``skipped_nonfinite``, ``skipped_samples``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from utils.files import atomic_output, not_a_regular_file

from .errors import CheckpointError
from .registry import verify_weights

__all__ = ["FORMAT_VERSION", "OUR_FORMAT", "RELEASE_KEYS", "CheckpointError", "export_weights", "read_checkpoint",
           "read_training_checkpoint", "save_checkpoint"]

OUR_FORMAT = "mpc-reimpl"  # value of the "format" key in checkpoints written by this project
# Layout of our checkpoint dict. 1: the files written before the key existed (read as 1); 2: adds "version" and
# "skipped_samples". Bump it when a key changes meaning, and teach read_training_checkpoint the older layouts.
FORMAT_VERSION = 2
RELEASE_KEYS = ("format", "version", "stage", "model", "config", "step", "best_score")


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
    problem = not_a_regular_file(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {'file not found' if problem == 'no such file' else problem}")
    verify_weights(path)
    contents = _load(path, map_location, mmap)
    _refuse_nonfinite(contents, path)
    return contents


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

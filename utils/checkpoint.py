"""Training checkpoints: written atomically, read with `weights_only=True`, carrying everything a resume needs.

A checkpoint is a plain dict of tensors and Python primitives, so `torch.load(..., weights_only=True)` reads it:
`format`, `model` (state_dict), `optimizer`, `scheduler`, `scaler`, `step`, `samples_seen`, `sampler`, `rng`,
`best_score`, `config` (the resolved YAML), `stage`. `models.load_checkpoint` recognises the `format` key.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from utils.files import atomic_output

CHECKPOINT_FORMAT = "mpc-reimpl"


def atomic_torch_save(obj, path: str) -> None:
    with atomic_output(path) as stream:
        torch.save(obj, stream)


def capture_rng_state() -> dict:
    """Every random stream the training step draws from, as tensors and primitives."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_checkpoint(path: str, map_location="cpu") -> dict:
    """Read one of our checkpoints for resuming; errors name the file."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at '{path}'") from None
    except Exception as error:  # truncated, corrupt or foreign pickle: weights_only refuses code
        raise RuntimeError(f"cannot read checkpoint '{path}': {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"'{path}' is not a training checkpoint of this project (no format '{CHECKPOINT_FORMAT}'); "
                           "to start from other weights use MODEL.IMAGENET_WEIGHTS or MODEL.STAGE1_WEIGHTS")
    return checkpoint


RELEASE_KEYS = ("format", "stage", "model", "config", "step", "best_score")


def export_weights(checkpoint_path: str, out_path: str) -> str:
    """A release copy of a training checkpoint: the model, its config, step and score, without the optimiser,
    scheduler and RNG states a resume needs. It loads wherever the full checkpoint does (test, infer,
    `models.load_checkpoint`)."""
    checkpoint = load_training_checkpoint(checkpoint_path)
    atomic_torch_save({key: checkpoint[key] for key in RELEASE_KEYS}, out_path)
    return out_path

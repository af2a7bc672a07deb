"""Load official MPC / HRFormer checkpoints and our own into our models, through one explicit key map.

Every load reports what was loaded, missing, unexpected, mis-shaped and rebuilt (derived buffers the file lacks).
A required tensor that is missing or mis-shaped is an error (the official loader's silent skip, docs/MPC_SPEC.md §9.1,
cannot happen here), and so is a derived buffer that differs from its construction.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import OUR_FORMAT, CheckpointError, read_checkpoint

__all__ = ["LoadReport", "load_checkpoint"]

_DDP_PREFIX = "module."
_PARTS = ("encoder.", "decoder.")
_PROJECTION_PREFIX = "convs."  # MPC's output projections: absent from ImageNet classification checkpoints
# Rebuilt from the window size at construction, so a file without it loses nothing.
_DERIVED_SUFFIXES = ("relative_position_index",)
_LIST_LIMIT = 20
log = logging.getLogger(__name__)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    more = f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
    return f"{len(keys)}: {shown}{more}"


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did: keys are the model's names (``unexpected`` keeps the file's)."""

    source: str
    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    # Derived buffers the file lacks (``relative_position_index``): they keep the value built from the window size,
    # which is all they ever hold, so nothing is lost and they are not "missing".
    rebuilt: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.source} ({self.source_format}): loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"  missing (kept at initialisation) {_listing(self.missing)}")
        if self.rebuilt:
            lines.append(f"  rebuilt (derived buffers the file lacks, as constructed) {_listing(self.rebuilt)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored) {_listing(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} expected {list(e)} found {list(f)}" for k, e, f in self.mismatched]
            lines.append(f"  mis-shaped (not loaded) {_listing(shown)}")
        return "\n".join(lines)

    __str__ = summary


def _unwrap(obj: object, source: str) -> tuple[Mapping, str]:
    """The tensor dict inside a checkpoint and a name for its format."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: not a state dict (the file holds a {type(obj).__name__})")
    if obj.get("format") == OUR_FORMAT:
        state, kind = obj.get("model"), OUR_FORMAT
    elif isinstance(obj.get("model"), Mapping):
        state, kind = obj["model"], "hrformer-imagenet"
    else:
        state, kind = obj, "state_dict"
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{source}: holds no state dict ({kind} checkpoint without tensors)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{source}: not a state dict: entry {key!r} holds a {type(value).__name__}, not a tensor"
            )
    return state, kind


def _map_keys(file_keys: list[str], model_keys: list[str]) -> tuple[dict[str, str], str]:
    """The key map file key -> model key, and a note on the prefix rules applied.

    Rules: drop DDP's ``module.``; add ``encoder.`` to bare backbone keys when the model has an encoder
    (official stage-1 and ImageNet files into a Stage1/Stage2Model); drop ``encoder.`` when the model is a
    bare backbone.
    """
    notes = []
    mapping = {}
    if any(k.startswith(_DDP_PREFIX) for k in file_keys):
        notes.append("'module.' stripped")
    stripped = {k: k[len(_DDP_PREFIX) :] if k.startswith(_DDP_PREFIX) else k for k in file_keys}
    model_has_parts = any(k.startswith(_PARTS) for k in model_keys)
    file_has_parts = any(k.startswith(_PARTS) for k in stripped.values())
    for file_key, key in stripped.items():
        if model_has_parts and not file_has_parts:
            key = "encoder." + key
        elif not model_has_parts and key.startswith("encoder."):
            key = key[len("encoder.") :]
        mapping[file_key] = key
    if model_has_parts and not file_has_parts:
        notes.append("bare backbone keys -> 'encoder.'")
    elif not model_has_parts and file_has_parts:
        notes.append("'encoder.' stripped")
    return mapping, ", ".join(notes)


def _required(model_keys: list[str], require: tuple[str, ...] | None, kind: str) -> set[str]:
    if require is None:
        required = set(model_keys)
    else:
        parts = {k.split(".", 1)[0] for k in model_keys}
        unknown = set(require) - parts
        if unknown:
            raise ValueError(f"require names parts {sorted(unknown)} the model lacks; it has {sorted(parts)}")
        required = {k for k in model_keys if k.split(".", 1)[0] in require}
    required = {k for k in required if not k.endswith(_DERIVED_SUFFIXES)}
    if kind == "hrformer-imagenet":
        required = {k for k in required if not k.removeprefix("encoder.").startswith(_PROJECTION_PREFIX)}
    return required


def load_checkpoint(
    model: nn.Module,
    path: str | Path | Mapping,
    require: tuple[str, ...] | None = None,
    map_location="cpu",
) -> LoadReport:
    """Load weights into ``model`` by name and return a ``LoadReport``.

    ``path`` is a file or an already-loaded dict. Accepted: the official stage-2 state_dict
    (``encoder.*``, ``decoder.classifier.*``), the official stage-1 backbone (bare or ``encoder.``-prefixed),
    HRFormer's ImageNet ``{"model": ...}`` (partial: the projections ``convs.*`` stay at init), our training
    checkpoints (``{"format": "mpc-reimpl", "model": ...}``), each optionally with DDP's ``module.`` prefix.
    ``require`` lists the top-level parts (e.g. ``("encoder",)``) that must be fully set; None = all of them.
    A required tensor missing or mis-shaped, or a derived buffer (``relative_position_index``) that differs from
    the one built from the window size, raises ``CheckpointError`` and leaves the model untouched.
    """
    if isinstance(path, Mapping):
        source, obj = "<state dict>", path
    else:
        source = str(path)
        obj = read_checkpoint(path, map_location)
    state, kind = _unwrap(obj, source)

    model_state = model.state_dict()
    mapping, notes = _map_keys(list(state), list(model_state))
    by_model_key = {model_key: state[file_key] for file_key, model_key in mapping.items() if model_key in model_state}
    report = LoadReport(source, f"{kind}; {notes}" if notes else kind)
    report.unexpected = [file_key for file_key, model_key in mapping.items() if model_key not in model_state]
    for key, target in model_state.items():
        if key not in by_model_key:
            (report.rebuilt if key.endswith(_DERIVED_SUFFIXES) else report.missing).append(key)
        elif by_model_key[key].shape != target.shape:
            report.mismatched.append((key, tuple(target.shape), tuple(by_model_key[key].shape)))
        else:
            report.loaded.append(key)

    required = _required(list(model_state), require, kind)
    bad_missing = [k for k in report.missing if k in required]
    bad_shapes = [f"{k} (expected {list(e)}, found {list(f)})" for k, e, f in report.mismatched if k in required]
    # A derived buffer that differs from the one built from the window size comes from code with another layout:
    # the file's bias table is indexed by it, so neither keeping ours nor taking it would be safe. Refuse.
    bad_derived = [k for k in report.loaded if k.endswith(_DERIVED_SUFFIXES)
                   and not torch.equal(by_model_key[k].to(model_state[k]), model_state[k])]
    if bad_missing or bad_shapes or bad_derived:
        problems = []
        if bad_missing:
            problems.append(f"required tensors missing {_listing(bad_missing)}")
        if bad_shapes:
            problems.append(f"required tensors mis-shaped {_listing(bad_shapes)}")
        if bad_derived:
            problems.append(f"derived buffers differ from the ones built from the window size "
                            f"{_listing(bad_derived)}")
        raise CheckpointError(
            f"{source} ({report.source_format}) does not fit {type(model).__name__}: " + "; ".join(problems)
        )

    model.load_state_dict({k: by_model_key[k] for k in report.loaded}, strict=False)
    log.info("%s", report.summary())
    return report

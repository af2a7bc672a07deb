"""The training mixture (file lists with repeat factors) and a held-out validation split drawn from it.

The official CATNet protocol: tampCOCO sp/cm/bcm ×1, CASIAv2 ×40, IMD2020 ×20 = 843,991 samples per epoch.
Repeats are an index map into the unique rows, so an epoch costs one int per sample, not a copy of its paths.
"""
from __future__ import annotations

import os

import numpy as np

from datasets.flist import RepeatedRows, read_flist


def load_rows(source) -> np.ndarray:
    """An (N, 2) str array from a file-list path or from rows given directly."""
    if isinstance(source, (str, os.PathLike)):
        return read_flist(source)
    rows = np.asarray(source, dtype=str)
    if rows.ndim != 2 or rows.shape[1] != 2:
        raise ValueError(f"rows must be (N, 2) pairs of (image path, mask path), got shape {rows.shape}")
    return rows


def _check_repeat(repeat, source) -> int:
    if int(repeat) != repeat or repeat < 1:
        name = source if isinstance(source, (str, os.PathLike)) else "rows"
        raise ValueError(f"repeat factor of {name} must be a positive integer, got {repeat!r}")
    return int(repeat)


def build_training_rows(entries) -> RepeatedRows:
    """One epoch's samples from [(file list path or rows, repeat factor), ...], in list order."""
    if not entries:
        raise ValueError("no training lists given")
    all_rows, index, offset = [], [], 0
    for source, repeat in entries:
        repeat = _check_repeat(repeat, source)
        rows = load_rows(source)
        all_rows.append(rows)
        index.append(np.tile(np.arange(offset, offset + len(rows), dtype=np.int64), repeat))
        offset += len(rows)
    return RepeatedRows(np.concatenate(all_rows), np.concatenate(index))


def _proportional_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Split `total` into integers proportional to `weights` (largest remainder)."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def split_holdout(entries, n_val: int, seed: int) -> tuple[list[tuple[np.ndarray, int]], np.ndarray]:
    """Hold out `n_val` validation rows from the unique rows of the training lists, before repeats.

    Each list gives a share proportional to its samples per epoch (rows × repeat), so the validation set has
    the mixture of a training epoch. Rows are drawn without replacement with `numpy.random.default_rng(seed)`.
    Every row whose image is held out leaves every list (duplicates across lists too), so no validation image
    is ever trained on. Returns (training entries as (rows, repeat), validation rows (n_val, 2)).
    """
    loaded = [(load_rows(source), _check_repeat(repeat, source)) for source, repeat in entries]
    unique = [np.unique(rows, axis=0) if len(rows) else rows for rows, _ in loaded]
    available = sum(len(rows) for rows in unique)
    if not 0 < n_val < available:
        raise ValueError(f"n_val must be between 1 and {available - 1} (unique training rows), got {n_val}")
    weights = np.array([len(rows) * repeat for rows, (_, repeat) in zip(unique, loaded)], dtype=np.float64)
    counts = np.minimum(_proportional_counts(weights, n_val), [len(rows) for rows in unique])
    # Lists too small for their share give the rest to the largest list that can take it.
    while counts.sum() < n_val:
        spare = np.array([len(rows) for rows in unique]) - counts
        counts[int(np.argmax(spare))] += 1
    rng = np.random.default_rng(seed)
    picks = [rows[np.sort(rng.choice(len(rows), size=count, replace=False))]
             for rows, count in zip(unique, counts)]
    validation = np.concatenate(picks)
    held_out = set(validation[:, 0].tolist())
    training = [(rows[[path not in held_out for path in rows[:, 0]]], repeat) for rows, repeat in loaded]
    return training, validation

"""The forgery-localization dataset: read, binarise, (augment), squash-resize, as the official `MyDataset`.

Rows are (image path, mask path) pairs; an empty mask path means an authentic image (all-zero mask). Paths are
used exactly as given: absolute, or relative to the current working directory (the file-list tools write
absolute paths by default).
"""
from __future__ import annotations

import random
import warnings

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from datasets.io import MASK_THRESHOLD, ImageReadError, read_image, read_mask
from datasets.mixture import RepeatedRows

MODES = ("train", "val", "test")


def as_rows(rows) -> np.ndarray | RepeatedRows:
    """Validate a list of pairs: an (N, 2) array of str, or a lazily repeated `RepeatedRows`."""
    if isinstance(rows, RepeatedRows):
        return rows
    array = np.asarray(rows, dtype=str)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"rows must be (N, 2) pairs of (image path, mask path), got shape {array.shape}")
    return array


class ForgeryDataset(Dataset):
    """Items are dicts: `image` float32 3×S×S in [0, 1] (RGB, /255), `mask` float32 (train: 1×S/r×S/r,
    val/test: 1×H×W at the original size), `path`, `size` (original H, W), `index`.

    `augment` (default: on for train only) is the official pipeline of `datasets.augment`, seeded by `seed`.
    `perturb` is applied to the RGB uint8 image before anything else (robustness tests); the mask is untouched.
    With `skip_bad`, an unreadable item returns None (use `collate_skip_bad`/`collate_test`) and is recorded
    in `self.skipped` as (path, problem) of the worker that met it.
    """

    def __init__(self, rows, mode: str = "train", input_size: int = 512, gt_ratio: int = 4, augment=None,
                 perturb=None, skip_bad: bool = False, seed: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if input_size % gt_ratio:
            raise ValueError(f"input_size {input_size} is not a multiple of gt_ratio {gt_ratio}")
        self.rows = as_rows(rows)
        self.mode = mode
        self.input_size = input_size
        self.gt_ratio = gt_ratio
        self.perturb = perturb
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []
        self.augmenter = None
        if augment is None:
            augment = mode == "train"
        if augment:
            from datasets.augment import OfficialAugmentation  # albumentations is heavy: import only when used

            self.augmenter = OfficialAugmentation(input_size, seed=seed)

    def __len__(self) -> int:
        return len(self.rows)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream (called per DataLoader worker by `seed_worker`)."""
        if self.augmenter is not None:
            self.augmenter.reseed(seed)

    def __getitem__(self, index: int):
        image_path, mask_path = (str(p) for p in self.rows[index])
        try:
            return self._load(index, image_path, mask_path)
        except ImageReadError as error:
            if not self.skip_bad:
                raise
            self.skipped.append((error.path, error.problem))
            warnings.warn(f"skipping item {index}: {error}", stacklevel=2)
            return None

    def _load(self, index: int, image_path: str, mask_path: str) -> dict:
        image = read_image(image_path)
        height, width = image.shape[:2]
        if mask_path:
            mask = read_mask(mask_path)
            if mask.shape != (height, width):
                raise ImageReadError(mask_path, f"mask is {mask.shape[0]}×{mask.shape[1]} but its image "
                                                f"'{image_path}' is {height}×{width}")
        else:
            mask = np.zeros((height, width), dtype=bool)
        if self.perturb is not None:
            image = self.perturb(image)
        mask = mask.astype(np.uint8) * 255
        if self.augmenter is not None:
            image, mask = self.augmenter(image, mask)

        size = self.input_size
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        if self.mode == "train":
            # As the official: the 0/255 mask is resized bilinearly, then re-thresholded.
            small = size // self.gt_ratio
            mask = cv2.resize(mask, (small, small), interpolation=cv2.INTER_LINEAR)
        return {
            # /255 in numpy on a CHW copy: cheaper than torch converting a permuted view, which also competes for
            # intra-op threads inside DataLoader workers.
            "image": torch.from_numpy(np.divide(image.transpose(2, 0, 1), np.float32(255), dtype=np.float32)),
            "mask": torch.from_numpy(mask > MASK_THRESHOLD).float().unsqueeze(0),
            "path": image_path,
            "size": torch.tensor([height, width]),
            "index": index,
        }


def _drop_bad(batch: list) -> tuple[list, int]:
    kept = [item for item in batch if item is not None]
    return kept, len(batch) - len(kept)


def collate_skip_bad(batch: list) -> dict:
    """Default collation of the readable items, plus `n_skipped` (items that returned None).

    When every item was bad the batch is just {"n_skipped": n}.
    """
    kept, n_skipped = _drop_bad(batch)
    collated = default_collate(kept) if kept else {}
    collated["n_skipped"] = n_skipped
    return collated


def collate_test(batch: list) -> dict:
    """Val/test batches whose masks keep their original, different sizes: masks become a list."""
    kept, n_skipped = _drop_bad(batch)
    if not kept:
        return {"n_skipped": n_skipped}
    return {
        "image": torch.stack([item["image"] for item in kept]),
        "mask": [item["mask"] for item in kept],
        "path": [item["path"] for item in kept],
        "size": torch.stack([item["size"] for item in kept]),
        "index": torch.tensor([item["index"] for item in kept]),
        "n_skipped": n_skipped,
    }


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed numpy, `random` and the worker's augmentation stream.

    PyTorch gives worker k the seed base_seed + k, where base_seed is drawn from the torch generator of the
    DataLoader (or the global one), so a run seeded with `torch.manual_seed` sees the same augmentations.
    """
    info = get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = info.dataset
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)

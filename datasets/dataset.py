"""The forgery-localization dataset: read, binarise, (augment), squash-resize, as the official `MyDataset`.

Rows are (image path, mask path) pairs; an empty mask path means an authentic image (all-zero mask). Paths are
used exactly as given: absolute, or relative to the current working directory (the file-list tools write
absolute paths by default).
"""
from __future__ import annotations


import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from datasets.io import MASK_THRESHOLD, ImageReadError, read_image, read_mask
from datasets.flist import as_rows

MODES = ("train", "val", "test")


class ForgeryDataset(Dataset):
    """Items are dicts: `image` float32 3×S×S in [0, 1] (RGB, /255), `mask` float32 (train: 1×S/r×S/r,
    val/test: 1×H×W at the original size), `tampered` (the row names a mask: scored as tampered even when the mask is
    empty, as the official test does), `path`, `size` (original H, W), `index`; with `keep_original` also
    `original`, the RGB uint8 image as read (what inference draws its heat map over, without reading it twice).

    `input_size=None` (test mode only): the image at its own size, as uint8 3×H×W (a view of the pixels read; the
    predictor divides by 255 tile by tile, `utils.evaluation.prediction.native_probability`), nothing resized.

    `augment` (default: on for train only) is the official pipeline of `datasets.augment`, seeded by `seed`.
    `perturb` is applied to the RGB uint8 image before anything else (robustness tests); the mask is untouched.
    An unreadable image or mask raises `ImageReadError` naming the file (wrap in `CatchReadErrors` to collect them).
    """

    def __init__(self, rows, mode: str = "train", input_size: int = 512, gt_ratio: int = 4, augment=None,
                 perturb=None, seed: int | None = None, keep_original: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if input_size is None and mode != "test":
            raise ValueError("input_size=None (native resolution) is for test mode only")
        if input_size is not None and input_size % gt_ratio:
            raise ValueError(f"input_size {input_size} is not a multiple of gt_ratio {gt_ratio}")
        self.rows = as_rows(rows)
        self.mode = mode
        self.input_size = input_size
        self.gt_ratio = gt_ratio
        self.perturb = perturb
        self.keep_original = keep_original
        self.augmenter = None
        if augment is None:
            augment = mode == "train"
        if augment:
            from datasets.augment import OfficialAugmentation  # albumentations is heavy: import only when used

            self.augmenter = OfficialAugmentation(input_size, seed=seed)

    def __len__(self) -> int:
        return len(self.rows)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream (called per item by `utils.training.sampling.SeededItems`)."""
        if self.augmenter is not None:
            self.augmenter.reseed(seed)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = (str(p) for p in self.rows[index])
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
        original = image
        mask = mask.astype(np.uint8) * 255
        if self.augmenter is not None:
            image, mask = self.augmenter(image, mask)

        size = self.input_size
        if size is None:  # native resolution: the uint8 pixels as they are
            pixels = torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)
        else:
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
            # /255 in numpy on a CHW copy: cheaper than torch converting a permuted view, which also competes for
            # intra-op threads inside DataLoader workers.
            pixels = torch.from_numpy(np.divide(image.transpose(2, 0, 1), np.float32(255), dtype=np.float32))
        if self.mode == "train":
            # As the official: the 0/255 mask is resized bilinearly, then re-thresholded.
            small = size // self.gt_ratio
            mask = cv2.resize(mask, (small, small), interpolation=cv2.INTER_LINEAR)
        item = {
            "image": pixels,
            "mask": torch.from_numpy(mask > MASK_THRESHOLD).float().unsqueeze(0),
            "tampered": bool(mask_path),
            "path": image_path,
            "size": torch.tensor([height, width]),
            "index": index,
        }
        if self.keep_original:
            item["original"] = original
        return item


class CatchReadErrors(Dataset):
    """Wraps a dataset so that an unreadable item comes back as `{"error": problem, "bad_file": the file at fault}`
    instead of raising inside a DataLoader worker, where the exception would lose its type and its message. The
    main process decides: raise it (`ImageReadError(item["bad_file"], item["error"])`), or skip and count it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except ImageReadError as error:
            return {"error": error.problem, "bad_file": error.path}


def is_read_error(item: dict) -> bool:
    return "error" in item


def collate_readable(batch: list[dict]) -> dict:
    """Default collation of the readable items of a `CatchReadErrors` batch, plus `bad_items`: (file, problem) of
    the others. When every item was bad the batch is just {"bad_items": [...]}."""
    kept = [item for item in batch if not is_read_error(item)]
    collated = default_collate(kept) if kept else {}
    collated["bad_items"] = [(item["bad_file"], item["error"]) for item in batch if is_read_error(item)]
    return collated

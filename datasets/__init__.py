"""File lists, the dataset class, the training mixture, robustness distortions and synthetic tampering.

Imported here: the light modules (numpy, torch, OpenCV, Pillow). `datasets.augment` (albumentations) is imported by
the dataset only when augmentation is on; `datasets.synthetic` and `datasets.flist` are imported by name.
"""
from datasets.dataset import CatchReadErrors, ForgeryDataset, collate_readable
from datasets.io import ImageReadError, read_image, read_mask
from datasets.mixture import RepeatedRows, build_training_rows, split_holdout
from datasets.perturb import ROBUSTNESS_GRID, make_perturbation, parse_perturbations

__all__ = [
    "CatchReadErrors", "ForgeryDataset", "collate_readable",
    "ImageReadError", "read_image", "read_mask",
    "RepeatedRows", "build_training_rows", "split_holdout",
    "ROBUSTNESS_GRID", "make_perturbation", "parse_perturbations",
]

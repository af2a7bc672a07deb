"""Scoring a predictor on a file list by the MPC protocol (METRICS.md), one image at a time.

`predict` maps a 1×3×S×S image batch to a 1×h×w probability map in [0, 1] (the stage-2 head's sigmoid, or the
stage-1 k-means mask). The map is resized to the ground truth's original size as the official `test.py` does, then
every pixel metric is accumulated on tampered images and the image-level metrics on all of them.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.metrics import ImageMetrics, PixelMetrics, upsample_probability


def _single(batch):
    return batch[0]


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], dataset, device: torch.device, num_workers: int = 0,
             desc: str = "evaluating", progress: bool = True, on_image: Callable | None = None) -> dict:
    """Metrics of `predict` on `dataset` (test/val mode: masks at their original size).

    `on_image(item, prob_255)` is called for every image with the map at the original size (saving masks, probability
    maps, logging a few predictions). Returns the merged pixel and image metrics plus `per_image` rows.
    """
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_single)
    pixel, image_level = PixelMetrics(), ImageMetrics()
    for item in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        prob = predict(item["image"].unsqueeze(0).to(device))[0].float().cpu()
        gt = item["mask"].numpy() > 0.5
        prob_255 = upsample_probability(prob, gt.shape)
        tampered = bool(gt.any())
        if tampered:  # pixel metrics on tampered images only, as in MPC
            pixel.update(prob_255, gt, name=item["path"])
        image_level.update(float(prob_255.max()), int(tampered))
        if on_image is not None:
            on_image(item, prob_255)
    results = {**pixel.compute(), **image_level.compute()}
    results["per_image"] = pixel.per_image()
    return results


def mpc_score(results_per_set: dict[str, dict]) -> float:
    """The official validation score: the mean of F1 and IoU over the validation sets (MPC_SPEC §3)."""
    values = [r[key] for r in results_per_set.values() for key in ("f1_fixed", "iou")]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else 0.0

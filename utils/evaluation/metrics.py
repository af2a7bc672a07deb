"""Forgery-localization metrics: the MPC protocol plus every common variant (see docs/METRICS.md).

Scale convention: every probability map and image score in this module is on the **0-255 scale**, the scale at
which the official MPC `test.py` thresholds (a pixel is predicted forged when its value is `> 127`, i.e.
`int(0.5 * 255)`). `upsample_probability` turns the model's [0, 1] map at 1/4 resolution into such a map at the
ground truth's size, exactly as the official code does.

Everything is computed from one image at a time: per image the probabilities of the forged and pristine pixels
are sorted once, and F1 at the fixed threshold, the best F1 over all thresholds and the exact ROC-AUC
(Mann-Whitney, ties counted as half) all follow from the two sorted arrays by binary search. Only `auc_pooled`
is approximate: it is computed from per-class histograms with `POOLED_AUC_BINS` bins (see `PixelMetrics`).
"""
import functools
import math

import cv2
import numpy as np
import torch

from datasets.io import MASK_THRESHOLD

FIXED_THRESHOLD_255 = MASK_THRESHOLD  # official int(0.5 * 255); "forged" means strictly greater
POOLED_AUC_BINS = 65536  # bin width 255 / 65535 = 1/257: every integer 0..255 falls on its own bin centre


def to_numpy(array):
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def upsample_probability(prob, size):
    """Official post-processing: a [0, 1] map (H'xW', numpy or torch) -> float32 map on the 0-255 scale at
    `size` = (H, W), resized bilinearly with OpenCV semantics."""
    prob = to_numpy(prob).astype(np.float32, copy=False)
    if prob.ndim != 2:
        raise ValueError(f"upsample_probability: expected a 2-D probability map, got shape {prob.shape}")
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"upsample_probability: target size must be positive, got {size}")
    if not (prob.min() >= 0.0 and prob.max() <= 1.0):
        raise ValueError("upsample_probability: probabilities must lie in [0, 1] (got "
                         f"min {prob.min()}, max {prob.max()})")
    return cv2.resize(prob * np.float32(255), (width, height), interpolation=cv2.INTER_LINEAR)


def binarize(prob_255):
    """Predicted forged mask (bool) from a 0-255 map, with the official `> 127` rule."""
    return to_numpy(prob_255) > FIXED_THRESHOLD_255


def binary_f1(tp, fp, fn):
    """F1 of the positive class with scikit-learn semantics: 0 when there are no true and no predicted positives."""
    denominator = 2 * tp + fp + fn
    return 2.0 * tp / denominator if denominator > 0 else 0.0


def official_iou(tp, fp, fn):
    """The official `metric_iou`: |P and G| / (|P or G| + 1e-6), and 1 when both masks are empty."""
    union = tp + fp + fn
    return 1.0 if union == 0 else tp / (union + 1e-6)


def _map_size(prob, what):
    shape = np.shape(prob)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"{what}: expected a non-empty 2-D map, got shape {shape}")
    return int(shape[0]), int(shape[1])


def _sorted_by_class(scores, labels, what):
    """Flatten and split `scores` by the boolean `labels`; return (positive scores, negative scores), sorted."""
    scores = to_numpy(scores)
    labels = to_numpy(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"{what}: prediction shape {scores.shape} differs from ground-truth shape {labels.shape}")
    if labels.dtype != np.bool_:
        if not ((labels == 0) | (labels == 1)).all():
            raise ValueError(f"{what}: ground truth must be boolean or 0/1")
        labels = labels.astype(bool)
    if scores.size == 0:
        raise ValueError(f"{what}: no values to score")
    scores, labels = scores.ravel(), labels.ravel()
    positives, negatives = np.sort(scores[labels]), np.sort(scores[~labels])
    extremes = [a[i] for a in (positives, negatives) if a.size for i in (0, -1)]
    # NaN sorts last, so it fails the upper-bound test too.
    if not (min(extremes) >= 0 and max(extremes) <= 255):
        raise ValueError(f"{what}: predictions must lie in [0, 255] (the 0-255 scale of this module), "
                         f"got min {min(extremes)}, max {max(extremes)}")
    return positives, negatives


def _count_above(sorted_values, threshold):
    return sorted_values.size - int(np.searchsorted(sorted_values, threshold, side="right"))


def _auc_and_best_f1(positives, negatives):
    """Exact ROC-AUC (NaN without both classes) and best F1 over all thresholds `score >= t`, from sorted arrays."""
    n_pos, n_neg = positives.size, negatives.size
    if n_pos == 0:
        return math.nan, 0.0
    negatives_below = np.searchsorted(negatives, positives, side="left")
    # The best F1 is reached at a threshold equal to some positive score: lowering the threshold to any value
    # between two positive scores only adds false positives. Evaluate once per distinct positive score.
    run_starts = np.flatnonzero(np.diff(positives, prepend=positives[0] - 1))
    true_pos = n_pos - run_starts
    false_pos = n_neg - negatives_below[run_starts]
    best_f1 = float(np.max(2.0 * true_pos / (true_pos + false_pos + n_pos)))
    if n_neg == 0:
        return math.nan, best_f1
    negatives_at_or_below = np.searchsorted(negatives, positives, side="right")
    pairs_won_twice = int(negatives_below.sum()) + int(negatives_at_or_below.sum())
    return pairs_won_twice / (2.0 * n_pos * n_neg), best_f1


class ImageCounts:
    """One image at the fixed threshold: confusion counts and the per-class sorted scores every metric starts from."""

    def __init__(self, positives, negatives):
        self.positives, self.negatives = positives, negatives
        self.tp = _count_above(positives, FIXED_THRESHOLD_255)
        self.fp = _count_above(negatives, FIXED_THRESHOLD_255)
        self.fn = positives.size - self.tp
        self.tn = negatives.size - self.fp

    @functools.cached_property
    def auc_and_best_f1(self):
        return _auc_and_best_f1(self.positives, self.negatives)


def _f1_permuted(counts):
    """The better of the mask and its inverse (the inverted mask's TP are the FN, its FP the TN)."""
    return max(binary_f1(counts.tp, counts.fp, counts.fn), binary_f1(counts.fn, counts.tn, counts.tp))


# Per-image pixel metrics in column order: name -> (function of the image's `ImageCounts`, the dataset key of its
# mean over the images, NaN values left out). A new metric is one function and one entry here: it then appears in
# the per-image CSV, the dataset results, metrics.json, the printed table and the robustness table.
PER_IMAGE_METRICS = {
    "f1_fixed": (lambda c: binary_f1(c.tp, c.fp, c.fn), "f1_fixed"),
    "iou": (lambda c: official_iou(c.tp, c.fp, c.fn), "iou"),
    "f1_best": (lambda c: c.auc_and_best_f1[1], "f1_best"),
    "f1_permuted": (_f1_permuted, "f1_permuted"),
    "auc": (lambda c: c.auc_and_best_f1[0], "auc_mean"),  # NaN when the ground truth has a single class
}
POOLED_KEYS = ("f1_pooled", "auc_pooled")  # from the counts of every pixel of the list
IMAGE_KEYS = ("img_auc", "img_f1", "img_bacc")  # image-level detection (`ImageMetrics`)
# Dataset metrics in table order: the per-image means (MPC's numbers first), the pooled ones, then image level.
DATASET_METRICS = tuple(key for _, key in PER_IMAGE_METRICS.values()) + POOLED_KEYS + IMAGE_KEYS
PIXEL_KEYS = ("n_images",) + tuple(key for _, key in PER_IMAGE_METRICS.values()) + POOLED_KEYS + ("auc_skipped",)


def _histogram(sorted_values, edges):
    return np.diff(np.searchsorted(sorted_values, edges, side="left"))


def _auc_from_histograms(positive_counts, negative_counts):
    """ROC-AUC from per-class counts over the same ordered bins; pairs inside one bin count as half."""
    positive_counts = positive_counts.astype(np.float64)
    negative_counts = negative_counts.astype(np.float64)
    n_pos, n_neg = positive_counts.sum(), negative_counts.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    negatives_below = np.cumsum(negative_counts) - negative_counts
    return float(np.dot(positive_counts, negatives_below + 0.5 * negative_counts) / (n_pos * n_neg))


def _mean_or_nan(values):
    return float(np.mean(values)) if len(values) else math.nan


class PixelMetrics:
    """Pixel-level localization metrics accumulated one image at a time.

    Call `update` for every image of a *tampered* test list (MPC's protocol: pixel metrics are computed on
    tampered images only; an image whose ground truth happens to be empty is still scored, with F1 = 0 as in
    the official code). `auc_pooled` uses per-class histograms of `POOLED_AUC_BINS` bins over [0, 255] instead of
    every pixel of the dataset: a forged and a pristine pixel that fall in the same bin count as a tie (half).
    The error is at most half the fraction of (forged, pristine) pairs sharing a bin but differing in value,
    about 1e-5 for spread-out maps and exactly 0 for maps quantised to integers. Everything else is exact.
    """

    _BIN_EDGES = (np.arange(POOLED_AUC_BINS + 1) - 0.5) * (255.0 / (POOLED_AUC_BINS - 1))

    def __init__(self):
        self._rows = []
        self._pooled_tp = self._pooled_fp = self._pooled_fn = 0
        self._positive_histogram = np.zeros(POOLED_AUC_BINS, dtype=np.int64)
        self._negative_histogram = np.zeros(POOLED_AUC_BINS, dtype=np.int64)

    def update(self, prob, gt, name=None):
        """Add one image. `prob`: 0-255 map at the ground truth's size; `gt`: bool or 0/1 mask (1 = forged).
        Returns the image's row (see `per_image`)."""
        name = f"image #{len(self._rows)}" if name is None else str(name)
        height, width = _map_size(prob, f"PixelMetrics.update({name})")
        positives, negatives = _sorted_by_class(prob, gt, f"PixelMetrics.update({name})")
        counts = ImageCounts(positives, negatives)
        pixels = positives.size + negatives.size
        self._pooled_tp += counts.tp
        self._pooled_fp += counts.fp
        self._pooled_fn += counts.fn
        self._positive_histogram += _histogram(positives, self._BIN_EDGES)
        self._negative_histogram += _histogram(negatives, self._BIN_EDGES)
        row = {"name": name, "height": height, "width": width, "forged_fraction": positives.size / pixels,
               "predicted_fraction": (counts.tp + counts.fp) / pixels}
        row.update({metric: function(counts) for metric, (function, _) in PER_IMAGE_METRICS.items()})
        self._rows.append(row)
        return row

    def per_image(self):
        """One dict per image, in update order: name, height, width, forged_fraction, predicted_fraction, then
        every metric of `PER_IMAGE_METRICS`."""
        return [dict(row) for row in self._rows]

    def compute(self):
        """Dataset scores: per-image means, pooled F1/AUC, and the number of images skipped by `auc_mean`."""
        if not self._rows:
            raise ValueError("PixelMetrics.compute: no image was added")
        results = {"n_images": len(self._rows)}
        for metric, (_, key) in PER_IMAGE_METRICS.items():
            results[key] = _mean_or_nan([row[metric] for row in self._rows if not math.isnan(row[metric])])
        results["f1_pooled"] = binary_f1(self._pooled_tp, self._pooled_fp, self._pooled_fn)
        results["auc_pooled"] = _auc_from_histograms(self._positive_histogram, self._negative_histogram)
        results["auc_skipped"] = sum(math.isnan(row["auc"]) for row in self._rows)
        return results


class ImageMetrics:
    """Image-level detection: score = max of the image's 0-255 probability map, label 1 = tampered.

    `img_f1` and `img_bacc` call an image tampered when its score is `> 127`, the pixel rule. All three scores
    are NaN unless both authentic and tampered images were added.
    """

    def __init__(self):
        self._scores = []
        self._labels = []

    def update(self, score, label):
        score = float(score)
        if not 0 <= score <= 255:
            raise ValueError(f"ImageMetrics.update: score must lie in [0, 255] (the 0-255 scale), got {score}")
        if label not in (0, 1):
            raise ValueError(f"ImageMetrics.update: label must be 0 (authentic) or 1 (tampered), got {label!r}")
        self._scores.append(score)
        self._labels.append(bool(label))

    def compute(self):
        labels = np.array(self._labels, dtype=bool)
        n_tampered = int(labels.sum())
        n_authentic = labels.size - n_tampered
        result = {"n_authentic": n_authentic, "n_tampered": n_tampered,
                  "img_auc": math.nan, "img_f1": math.nan, "img_bacc": math.nan}
        if n_tampered == 0 or n_authentic == 0:
            return result
        positives, negatives = _sorted_by_class(np.array(self._scores), labels, "ImageMetrics.compute")
        tp = _count_above(positives, FIXED_THRESHOLD_255)
        fp = _count_above(negatives, FIXED_THRESHOLD_255)
        result["img_auc"] = _auc_and_best_f1(positives, negatives)[0]
        result["img_f1"] = binary_f1(tp, fp, n_tampered - tp)
        result["img_bacc"] = 0.5 * (tp / n_tampered + (n_authentic - fp) / n_authentic)
        return result

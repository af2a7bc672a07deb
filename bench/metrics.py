"""Time `utils.evaluation.metrics.PixelMetrics` against per-image scikit-learn calls on synthetic 1024x768 maps.

The scikit-learn baseline per image: `f1_score` at the fixed threshold, the official IoU, the best F1 from
`precision_recall_curve` and `roc_auc_score`. Maps are generated one at a time from a seed (never all held in
memory); only the metric calls are timed. Prints a table: median seconds per run of `--images` maps, the speed-up,
and the largest absolute difference between the two per-image results.

    .venv/bin/python bench/metrics.py [--images 100] [--runs 3] [--size 1024 768]
"""
import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.evaluation.metrics import PixelMetrics  # noqa: E402

METRIC_KEYS = ("f1_fixed", "iou", "f1_best", "auc")


def synthetic_case(seed, width, height):
    """A smooth probability map (0-255 scale, as after the official upsampling) and a GT with ~10-30 % forged."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.standard_normal((6, 8)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    cut = np.quantile(field, 1 - rng.uniform(0.1, 0.3))
    gt = field > cut
    noise = cv2.resize(rng.standard_normal((96, 128)).astype(np.float32), (width, height))
    prob = 1 / (1 + np.exp(-(2.0 * (field - cut) + noise)))
    return (prob * 255).astype(np.float32), gt


def sklearn_row(prob, gt):
    gt, prob = gt.ravel(), prob.ravel()
    pred = prob > 127
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f1 = f1_score(gt, pred)
    intersection, union = np.logical_and(pred, gt).sum(), np.logical_or(pred, gt).sum()
    iou = 1.0 if intersection + union == 0 else intersection / (union + 1e-6)
    precision, recall, _ = precision_recall_curve(gt, prob)
    with np.errstate(invalid="ignore", divide="ignore"):
        best_f1 = np.nan_to_num(2 * precision * recall / (precision + recall)).max()
    return {"f1_fixed": f1, "iou": iou, "f1_best": best_f1, "auc": roc_auc_score(gt, prob)}


def ours_rows(cases):
    metrics = PixelMetrics()
    rows, seconds = [], 0.0
    for prob, gt in cases:
        start = time.perf_counter()
        rows.append(metrics.update(prob, gt))
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    metrics.compute()
    return rows, seconds + time.perf_counter() - start


def sklearn_rows(cases):
    rows, seconds = [], 0.0
    for prob, gt in cases:
        start = time.perf_counter()
        rows.append(sklearn_row(prob, gt))
        seconds += time.perf_counter() - start
    return rows, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 768), metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args()
    width, height = args.size

    def cases():
        return (synthetic_case(seed, width, height) for seed in range(args.images))

    timings = {"utils.evaluation.metrics": [], "scikit-learn": []}
    max_difference = 0.0
    for _ in range(args.runs):
        ours, ours_seconds = ours_rows(cases())
        reference, reference_seconds = sklearn_rows(cases())
        timings["utils.evaluation.metrics"].append(ours_seconds)
        timings["scikit-learn"].append(reference_seconds)
        max_difference = max(max_difference, max(abs(a[key] - b[key])
                                                  for a, b in zip(ours, reference) for key in METRIC_KEYS))

    machine = platform.processor() or platform.machine()
    print(f"machine: {machine} / {platform.node()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"numpy {np.__version__}, threads {torch.get_num_threads()}")
    print(f"{args.images} maps of {width}x{height}, median of {args.runs} runs; metrics: {', '.join(METRIC_KEYS)} "
          "(+ f1_permuted, f1_pooled, auc_pooled for utils.evaluation.metrics)")
    print(f"{'implementation':<16} {'seconds':>9} {'ms/image':>9} {'speed-up':>9}")
    reference_median = float(np.median(timings["scikit-learn"]))
    for name, values in timings.items():
        median = float(np.median(values))
        print(f"{name:<16} {median:9.2f} {1000 * median / args.images:9.1f} {reference_median / median:8.1f}x")
    print(f"max |difference| over per-image values: {max_difference:.3g}")


if __name__ == "__main__":
    main()

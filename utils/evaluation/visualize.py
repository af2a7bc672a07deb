"""Pictures of predictions and results: heat-map overlays, image | GT | prediction grids, robustness curves."""
import math
import numbers
from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.evaluation.metrics import to_numpy
from utils.files import atomic_output

GRID_GAP = 2  # white pixels between the tiles of a prediction grid


def _as_map(values, what):
    """A 2-D float32 map from an H x W or 1 x H x W array/tensor."""
    values = to_numpy(values).astype(np.float32)
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"{what}: expected an H x W map, got shape {values.shape}")
    return values


def _as_rgb_uint8(image, what):
    """H x W x 3 uint8 from either that or a 3 x H x W float image in [0, 1] (a model input)."""
    image = to_numpy(image)
    if image.dtype != np.uint8 and image.ndim == 3 and image.shape[0] == 3:
        image = np.clip(image.transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{what}: expected an H x W x 3 uint8 or 3 x H x W float image, "
                         f"got shape {image.shape} and dtype {image.dtype}")
    return image


def _probability_to_uint8(prob_01):
    return np.clip(prob_01 * 255 + 0.5, 0, 255).astype(np.uint8)


def heatmap_overlay(image_rgb_uint8, prob_01, alpha=0.5):
    """The image blended with a JET colour map of the [0, 1] probability map (resized bilinearly to the image)."""
    image = _as_rgb_uint8(image_rgb_uint8, "heatmap_overlay image")
    prob = _as_map(prob_01, "heatmap_overlay probability")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"heatmap_overlay: alpha must lie in [0, 1], got {alpha}")
    height, width = image.shape[:2]
    if prob.shape != (height, width):
        prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap(_probability_to_uint8(prob), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0)


def prediction_grid(images, gts, probs, tile_size=256):
    """One RGB uint8 panel: a column per sample, rows image | ground truth | predicted probability (grey).

    `images`: H x W x 3 uint8 or 3 x H x W float in [0, 1]; `gts`: bool/0-1 masks; `probs`: [0, 1] maps. Sizes may
    differ between and within samples: every tile is squashed to `tile_size` x `tile_size`.
    """
    if not len(images) == len(gts) == len(probs) or len(images) == 0:
        raise ValueError(f"prediction_grid: need the same non-zero number of images, masks and maps, "
                         f"got {len(images)}, {len(gts)}, {len(probs)}")
    size = (tile_size, tile_size)
    columns = []
    for index, (image, gt, prob) in enumerate(zip(images, gts, probs)):
        image = cv2.resize(_as_rgb_uint8(image, f"prediction_grid image {index}"), size, interpolation=cv2.INTER_AREA)
        gt = cv2.resize(_as_map(gt, f"prediction_grid mask {index}"), size, interpolation=cv2.INTER_NEAREST) > 0.5
        prob = cv2.resize(_as_map(prob, f"prediction_grid map {index}"), size, interpolation=cv2.INTER_LINEAR)
        grey = [np.repeat(tile[..., None], 3, axis=2) for tile in (gt.astype(np.uint8) * 255,
                                                                  _probability_to_uint8(prob))]
        columns.append([image] + grey)
    step = tile_size + GRID_GAP
    panel = np.full((3 * step - GRID_GAP, len(columns) * step - GRID_GAP, 3), 255, dtype=np.uint8)
    for col, tiles in enumerate(columns):
        for row, tile in enumerate(tiles):
            panel[row * step:row * step + tile_size, col * step:col * step + tile_size] = tile
    return panel


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _metric_names(rows):
    names = []
    for row in rows:
        for key, value in row.items():
            if key not in ("distortion", "level", *names) and _is_number(value):
                names.append(key)
    return names


def plot_robustness(rows, out_png, metrics=None):
    """Write a PNG with one subplot per distortion: x = level, one line per metric.

    `rows`: dicts with "distortion", "level" and metric values (e.g. f1_fixed, iou); `metrics` picks the keys to
    draw (default: every numeric key). The file is written to a temporary name and then moved into place.
    """
    if not rows:
        raise ValueError("plot_robustness: no rows to plot")
    for index, row in enumerate(rows):
        if "distortion" not in row or "level" not in row:
            raise ValueError(f"plot_robustness: row {index} lacks 'distortion' or 'level': {row}")
    metrics = list(metrics) if metrics is not None else _metric_names(rows)
    distortions = list(dict.fromkeys(row["distortion"] for row in rows))
    n_cols = min(3, len(distortions))
    n_rows = math.ceil(len(distortions) / n_cols)
    figure = Figure(figsize=(4.5 * n_cols, 3.5 * n_rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, distortion in enumerate(distortions):
        axes = figure.add_subplot(n_rows, n_cols, index + 1)
        points = [row for row in rows if row["distortion"] == distortion]
        numeric = all(_is_number(row["level"]) for row in points)
        if numeric:
            points.sort(key=lambda row: row["level"])
        levels = [row["level"] if numeric else str(row["level"]) for row in points]  # else categorical axis
        for metric in metrics:
            axes.plot(levels, [row.get(metric, math.nan) for row in points], marker="o", label=metric)
        axes.set_title(str(distortion))
        axes.set_xlabel("level")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    out_png = Path(out_png)
    with atomic_output(out_png) as stream:
        figure.savefig(stream, format="png", dpi=100)
    return out_png

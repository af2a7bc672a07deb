"""The one way a model's output becomes a map at the image's own size, as the official test does (MPC protocol).

The head's sigmoid at 1/4 of the squash-resized input is multiplied by 255 and resized bilinearly (OpenCV) to the
image's original size; a pixel is forged when that value is > 127 (the official ``int(0.5 * 255)``). The 0-255 scale
is where the official code thresholds, so ``ProbabilityMap`` keeps it inside and hands out what callers need: the
probability in [0, 1], the binary mask and the image-level score. Test, inference and the stage-2 training previews
all go through ``probability_map``.

Two resolutions (``predict_map``): the protocol's (the image squash-resized to the model's input size, the default
of testing), and the image's own (``Tiling``): padded with zeros at the bottom and right to a multiple of the
backbone's stride, cut into overlapping tiles above a size limit whose maps are blended across the seams, the map
cropped back to the image. The same ``probability_map`` turns either into a ``ProbabilityMap``.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from models.backbones import COARSEST_STRIDE
from utils.evaluation.metrics import FIXED_THRESHOLD_255, upsample_probability
from utils.files import atomic_write_bytes, write_png


@dataclass(frozen=True)
class ProbabilityMap:
    """One image's prediction at its original size."""

    values_255: np.ndarray  # float32 H×W on the official 0-255 scale: what the metrics threshold at > 127

    @property
    def shape(self) -> tuple[int, int]:
        return self.values_255.shape

    def probability(self) -> np.ndarray:
        """float32 in [0, 1] (clipped: bilinear resizing may overshoot 255 by a rounding error)."""
        return np.clip(self.values_255 / np.float32(255.0), 0.0, 1.0).astype(np.float32)

    def mask(self) -> np.ndarray:
        """The predicted forged pixels (bool), by the official > 127 rule."""
        return self.values_255 > FIXED_THRESHOLD_255

    @property
    def score(self) -> float:
        """The image-level score: the map's maximum, in [0, 1]."""
        return min(float(self.values_255.max()) / 255.0, 1.0)


def probability_map(prob, size) -> ProbabilityMap:
    """A [0, 1] map at the model's output resolution (H'×W', numpy or torch) at `size` = (H, W)."""
    return ProbabilityMap(upsample_probability(prob, size))


def probability_predictor(model: torch.nn.Module, fast: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images B×3×H×W in [0, 1] -> B×H/4×W/4 probabilities: the one-logit head's sigmoid, as the official test.

    `fast`: through `models.inference.prepare_for_inference` (BatchNorm folded, channels-last, fused attention; the
    same maps up to float rounding, bench/inference.py), prepared once here on a copy of `model`.
    """
    if fast:
        from models.inference import prepare_for_inference

        model = prepare_for_inference(model)

    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model(images))[:, 0]
    return predict


# Native-resolution inputs are padded to a multiple of the backbone's coarsest stride.
NATIVE_MULTIPLE = COARSEST_STRIDE


@dataclass(frozen=True)
class Tiling:
    """Inference at the image's own resolution. Images whose padded height and width are both at most `tile`
    run whole; larger ones in `tile`×`tile` windows overlapping by `overlap` pixels (0 = never tile). Multiples of
    `multiple` (the backbone's stride)."""

    tile: int = 1024
    overlap: int = 128
    multiple: int = NATIVE_MULTIPLE

    def __post_init__(self):
        if self.tile < 0 or self.tile % self.multiple:
            raise ValueError(f"tile {self.tile} must be 0 (no tiling) or a positive multiple of {self.multiple}")
        if self.overlap < 0 or self.overlap % self.multiple or (self.tile and self.overlap >= self.tile):
            raise ValueError(f"tile overlap {self.overlap} must be a multiple of {self.multiple} below the tile "
                             f"size {self.tile}")

    def starts(self, length: int) -> list[int]:
        """Tile origins along one padded side: a step of tile − overlap, the last tile flush with the end."""
        if not self.tile or length <= self.tile:
            return [0]
        step = self.tile - self.overlap
        count = math.ceil((length - self.tile) / step) + 1
        return sorted({min(i * step, length - self.tile) for i in range(count)})


def dataset_input_size(input_size: int, tiling: Tiling | None) -> int | None:
    """The `input_size` a test-mode `ForgeryDataset` takes for this prediction: the squash-resize size, or None (the
    image at its own size) when predicting at native resolution with `tiling`."""
    return None if tiling is not None else input_size


def _seam_ramp(length: int, ramp: int, rising: bool, falling: bool) -> torch.Tensor:
    """Blending weights along one side of a tile's map: linear from ~0 to 1 over `ramp` cells at a side that
    overlaps a neighbour, 1 at a side on the image's border."""
    weights = torch.ones(length, dtype=torch.float64)
    if ramp:
        edge = (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp
        if rising:
            weights[:ramp] = torch.minimum(weights[:ramp], edge)
        if falling:
            weights[-ramp:] = torch.minimum(weights[-ramp:], edge.flip(0))
    return weights


def _as_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """A native image region (uint8 0-255, or float already in [0, 1]) as float32 in [0, 1], the protocol's /255."""
    return pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels.float()


def native_probability(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tiling: Tiling,
                       device: torch.device) -> torch.Tensor:
    """The [0, 1] map of an image at its own size: 3×H×W (uint8, or float in [0, 1]) -> Hp/4 × Wp/4 float32, where
    Hp, Wp are H, W padded up to `tiling.multiple`; tiles are blended with `_seam_ramp` weights. Only one tile is
    converted to float at a time: memory is the tile's, the image's uint8 pixels and the 1/4-size map."""
    _, height, width = image.shape
    padded_h, padded_w = (math.ceil(n / tiling.multiple) * tiling.multiple for n in (height, width))
    ratio = 4  # the head's output is at 1/4 of its input
    rows, cols = tiling.starts(padded_h), tiling.starts(padded_w)
    tile_h = padded_h if len(rows) == 1 else tiling.tile
    tile_w = padded_w if len(cols) == 1 else tiling.tile
    total = torch.zeros(padded_h // ratio, padded_w // ratio, dtype=torch.float64)
    weight = torch.zeros_like(total)
    ramp = tiling.overlap // ratio
    for top in rows:
        for left in cols:
            region = torch.zeros(1, 3, tile_h, tile_w)
            pixels = image[:, top:top + tile_h, left:left + tile_w]
            region[0, :, :pixels.shape[1], :pixels.shape[2]] = _as_unit_float(pixels)
            with torch.inference_mode():
                prob = predict(region.to(device))[0].double().cpu()
            w = torch.outer(_seam_ramp(tile_h // ratio, ramp, top > 0, top + tile_h < padded_h),
                            _seam_ramp(tile_w // ratio, ramp, left > 0, left + tile_w < padded_w))
            window = (slice(top // ratio, (top + tile_h) // ratio), slice(left // ratio, (left + tile_w) // ratio))
            total[window] += w * prob
            weight[window] += w
    return (total / weight).float()


def protocol_maps(predict: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor], sizes,
                  device: torch.device) -> list[ProbabilityMap]:
    """Pre-processed images (each 3×S×S, squash-resized, in [0, 1]) through `predict` in one stacked batch, each
    map at its original size in `sizes` (the protocol)."""
    with torch.inference_mode():
        probs = predict(torch.stack(images).to(device)).float().cpu()
    return [probability_map(prob, size) for prob, size in zip(probs, sizes)]


def predict_map(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, size,
                device: torch.device, tiling: Tiling | None = None) -> ProbabilityMap:
    """One image through `predict`, as a map at its original `size` = (H, W).

    Without `tiling`: `image` is pre-processed (3×S×S, squash-resized, in [0, 1]), the protocol. With it: `image` is
    the image at its own size (3×H×W, uint8 or [0, 1] float), run by `native_probability`; its padded map is
    resized ×4 (exact alignment) and cropped to H×W.
    """
    if tiling is None:
        return protocol_maps(predict, [image], [size], device)[0]
    height, width = (int(n) for n in size)
    if tuple(image.shape[1:]) != (height, width):
        raise ValueError(f"native inference: the image is {tuple(image.shape[1:])}, the size asked {size}")
    prob = native_probability(predict, image, tiling, device)
    padded = probability_map(prob, (prob.shape[0] * 4, prob.shape[1] * 4))
    return ProbabilityMap(np.ascontiguousarray(padded.values_255[:height, :width]))


def write_mask(path, prediction: ProbabilityMap) -> None:
    """The official binary mask as a 0/255 PNG, atomically."""
    write_png(path, prediction.mask().astype(np.uint8) * 255)


def write_probability(path, prediction: ProbabilityMap) -> None:
    """The probability map in [0, 1] as a float32 `.npy`, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, prediction.probability())
    atomic_write_bytes(str(path), buffer.getvalue())

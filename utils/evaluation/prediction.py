"""The one way a model's output becomes a map at the image's own size, as the official test does (MPC protocol).

The head's sigmoid at 1/4 of the squash-resized input is multiplied by 255 and resized bilinearly (OpenCV) to the
image's original size; a pixel is forged when that value is > 127 (the official ``int(0.5 * 255)``). The 0-255 scale
is where the official code thresholds, so ``ProbabilityMap`` keeps it inside and hands out what callers need: the
probability in [0, 1], the binary mask and the image-level score. Test, inference and the stage-2 training previews
all go through ``probability_map``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

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


def probability_predictor(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images B×3×S×S in [0, 1] -> B×S/4×S/4 probabilities: the one-logit head's sigmoid, as the official test."""
    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model(images))[:, 0]
    return predict


def predict_map(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, size,
                device: torch.device) -> ProbabilityMap:
    """One pre-processed image (3×S×S) through `predict`, at the original `size`."""
    with torch.inference_mode():
        prob = predict(image.unsqueeze(0).to(device))[0].float().cpu()
    return probability_map(prob, size)


def write_mask(path, prediction: ProbabilityMap) -> None:
    """The official binary mask as a 0/255 PNG, atomically."""
    write_png(path, prediction.mask().astype(np.uint8) * 255)


def write_probability(path, prediction: ProbabilityMap) -> None:
    """The probability map in [0, 1] as a float32 `.npy`, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, prediction.probability())
    atomic_write_bytes(str(path), buffer.getvalue())

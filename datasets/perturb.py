"""Robustness distortions (docs/METRICS.md): pure functions of an RGB uint8 image and a level.

They are applied to a test image before anything else; the ground truth is never touched.
"""
from __future__ import annotations

import cv2
import numpy as np

# The docs/METRICS.md robustness grid as data: (name, levels). "osn" has a single, fixed level.
ROBUSTNESS_GRID: list[tuple[str, tuple]] = [
    ("jpeg", (100, 90, 80, 70, 60, 50)),
    ("resize", (0.75, 0.5, 0.25)),
    ("blur", (3, 7, 11, 15, 19, 23)),
    ("noise", (3, 7, 11, 15, 19, 23)),
    ("osn", (None,)),
]


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an RGB uint8 H×W×3 image, got {getattr(image, 'dtype', type(image))} "
                         f"of shape {getattr(image, 'shape', None)}")


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip through OpenCV's encoder at `quality` (0..100)."""
    _check_image(image)
    # OpenCV encodes BGR: swap so that the chroma subsampling sees the true colours.
    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {image.shape}")
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])


def resize(image: np.ndarray, factor: float) -> np.ndarray:
    """Bilinear downscale by `factor` in (0, 1]; the result stays small (the pipeline resizes later)."""
    _check_image(image)
    height, width = image.shape[:2]
    size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def gaussian_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """Gaussian blur with an odd `ksize`; sigma is OpenCV's default for the kernel (sigma=0)."""
    _check_image(image)
    return cv2.GaussianBlur(image, (int(ksize), int(ksize)), 0)


def gaussian_noise(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise, `sigma` on the 0-255 scale; deterministic for a seed; rounded and clipped."""
    _check_image(image)
    noise = np.random.default_rng(seed).normal(0.0, float(sigma), size=image.shape)
    return np.clip(np.rint(image.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def social_network(image: np.ndarray) -> np.ndarray:
    """An online-social-network-like chain: downscale by 0.5, then JPEG at quality 75."""
    return jpeg(resize(image, 0.5), 75)


def _number(name: str, level) -> float:
    try:
        return float(level)
    except (TypeError, ValueError):
        raise ValueError(f"perturbation '{name}' needs a numeric level, got {level!r}") from None


def _integer(name: str, level) -> int:
    value = _number(name, level)
    if value != int(value):
        raise ValueError(f"perturbation '{name}' needs an integer level, got {level!r}")
    return int(value)


def _check_jpeg(level) -> int:
    quality = _integer("jpeg", level)
    if not 0 <= quality <= 100:
        raise ValueError(f"perturbation 'jpeg' needs a quality in 0..100, got {level!r}")
    return quality


def _check_resize(level) -> float:
    factor = _number("resize", level)
    if not 0 < factor <= 1:
        raise ValueError(f"perturbation 'resize' needs a factor in (0, 1], got {level!r}")
    return factor


def _check_blur(level) -> int:
    ksize = _integer("blur", level)
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"perturbation 'blur' needs an odd positive kernel size, got {level!r}")
    return ksize


def _check_noise(level) -> float:
    sigma = _number("noise", level)
    if not sigma >= 0:
        raise ValueError(f"perturbation 'noise' needs a sigma >= 0, got {level!r}")
    return sigma


# name -> (distortion, level validator; None for the fixed-level chain)
_PERTURBATIONS = {
    "jpeg": (jpeg, _check_jpeg),
    "resize": (resize, _check_resize),
    "blur": (gaussian_blur, _check_blur),
    "noise": (gaussian_noise, _check_noise),
    "osn": (social_network, None),
}


class Perturbation:
    """A named distortion at a fixed level: a picklable callable image -> image."""

    def __init__(self, name: str, level=None):
        if name not in _PERTURBATIONS:
            raise ValueError(f"unknown perturbation '{name}'; known: {', '.join(_PERTURBATIONS)}")
        function, check = _PERTURBATIONS[name]
        if check is None and level is not None:
            raise ValueError(f"perturbation '{name}' takes no level, got {level!r}")
        if check is not None:
            if level is None:
                raise ValueError(f"perturbation '{name}' needs a level, e.g. '{name}:{dict(ROBUSTNESS_GRID)[name][0]}'")
            level = check(level)
        self.kind = name
        self.level = level
        self.name = name if level is None else f"{name}:{level:g}"
        self._function = function

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.level is None:
            return self._function(image)
        return self._function(image, self.level)

    def __repr__(self) -> str:
        return f"Perturbation({self.name!r})"


def make_perturbation(name: str, level=None) -> Perturbation:
    """The distortion `name` ("jpeg", "resize", "blur", "noise", "osn") at `level`, as a callable."""
    return Perturbation(name, level)


def parse_perturbations(spec: str) -> list[Perturbation]:
    """Parse "jpeg:70,resize:0.5,blur:7,noise:11,osn" into callables; errors name the bad item."""
    perturbations = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty item in perturbation list '{spec}'")
        name, _, level = item.partition(":")
        try:
            perturbations.append(Perturbation(name.strip(), level.strip() or None))
        except ValueError as error:
            raise ValueError(f"bad perturbation '{item}' in '{spec}': {error}") from None
    return perturbations

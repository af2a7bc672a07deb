"""Synthetic tampering for the demo, the tests and users' pre-training: splicing, copy-move, removal, authentic.

Every image gets a camera-like history (sensor noise, then a JPEG pass). A spliced region comes from another
picture with a different history (more noise, another JPEG quality), a copy-moved region is resampled and
re-noised, a removed region is inpainted (smooth, noiseless): local traces a small network can learn.
`difficulty` in [0, 1] moves the tampered region's history towards the host's (0 = glaring, 1 = subtle).
Everything is drawn from `numpy.random.default_rng([seed, i])` per image, so a seed fixes every byte.

Images are written as lossless PNG (the traces survive), masks as 0/255 PNG, and the file list as
`<out>/<name>_<N>.npy` (authentic rows have an empty mask path). Command line: `generate_flist.py --synthetic N`.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from datasets.flist import write_flist
from datasets.io import IMAGE_EXTENSIONS, ImageReadError, read_image
from datasets.perturb import jpeg
from utils.files import write_png

KINDS = ("splice", "copymove", "removal")
REGION_FRACTION = (0.05, 0.30)  # tampered area as a fraction of the image
# Extra noise sigma (0-255 scale) a tampered region carries over the host's 1-2.5, at difficulty 0 and 1. At 0 it
# must be strong: with sigma 8 (behind a JPEG pass for splices) a 1.7 M-parameter model learnt next to nothing in
# ten CPU minutes (held-out pixel AUC 0.64-0.68); with sigma 20 the same run separates the regions (F1 above 0.9).
EXTRA_NOISE_SIGMA = (20.0, 1.0)
DONOR_JPEG_QUALITY = (83, 93)  # high enough that the JPEG pass keeps most of the donor's extra noise
# Flat shapes drawn into a procedural scene (fewest, most). Their sharp edges are high-frequency content that a
# small model first has to tell apart from the noise trace: with them the demo's 250 CPU steps reached a held-out
# k-means F1 of 0.28, without them ("--shapes 0") 0.93.
SCENE_SHAPES = (3, 8)


def _lerp(easy: float, hard: float, difficulty: float) -> float:
    return easy + (hard - easy) * difficulty


# ----------------------------------------------------------------------------------------------- content


def _procedural_scene(size: int, rng: np.random.Generator, shapes: tuple[int, int] = SCENE_SHAPES) -> np.ndarray:
    """A smooth gradient with low-frequency shading, `shapes` flat shapes and a coarse periodic texture (RGB uint8).

    Nothing finer than a few pixels: as in the flat parts of photos, the camera noise added later is the
    high-frequency content, so a different noise history stands out.
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    start, end = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    scene = start + ramp[:, :, None] * (end - start)
    shading = cv2.resize(rng.uniform(-30, 30, size=(4, 4, 3)).astype(np.float32), (size, size),
                         interpolation=cv2.INTER_CUBIC)
    scene = (scene + shading).astype(np.float32)
    for _ in range(rng.integers(shapes[0], shapes[1] + 1)):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        center = tuple(int(c) for c in rng.integers(0, size, size=2))
        shape = rng.integers(3)
        if shape == 0:
            cv2.circle(scene, center, int(rng.integers(size // 20, size // 5)), colour, -1, cv2.LINE_AA)
        elif shape == 1:
            corner = tuple(int(c) for c in rng.integers(0, size, size=2))
            cv2.rectangle(scene, center, corner, colour, -1, cv2.LINE_AA)
        else:
            points = rng.integers(0, size, size=(int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.fillPoly(scene, [points], colour, cv2.LINE_AA)
    frequency = rng.uniform(2, max(3, size / 24), size=2).astype(np.float32)  # cycles per image
    texture = np.sin(np.float32(2 * np.pi) * (frequency[0] * xs + frequency[1] * ys)) * np.float32(rng.uniform(3, 12))
    scene += texture[:, :, None]
    return np.clip(np.rint(scene), 0, 255).astype(np.uint8)


def _photo_crop(path: Path, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (half to all of the short side) of a user's photo, resized to size×size."""
    photo = read_image(path)
    height, width = photo.shape[:2]
    side = int(rng.integers(max(1, min(height, width) // 2), min(height, width) + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = photo[top:top + side, left:left + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def _content(size: int, rng: np.random.Generator, sources: list[Path], shapes: tuple[int, int]) -> np.ndarray:
    if sources:
        return _photo_crop(sources[int(rng.integers(len(sources)))], size, rng)
    return _procedural_scene(size, rng, shapes)


def _camera(image: np.ndarray, noise_sigma: float, quality: int, rng: np.random.Generator) -> np.ndarray:
    """A camera-like history: additive sensor noise, then a JPEG pass."""
    noisy = image + np.float32(noise_sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    return jpeg(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), quality)


# ----------------------------------------------------------------------------------------------- regions


def _ellipse(size: int, area: float, rng: np.random.Generator) -> np.ndarray:
    ratio = rng.uniform(0.5, 2.0)
    minor = np.sqrt(area / (np.pi * ratio))
    axes = (max(1, int(round(minor * ratio))), max(1, int(round(minor))))
    center = tuple(int(c) for c in rng.integers(size // 4, size - size // 4 + 1, size=2))
    canvas = np.zeros((size, size), np.uint8)
    cv2.ellipse(canvas, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_8)
    return canvas > 0


def _polygon(size: int, area: float, rng: np.random.Generator) -> np.ndarray:
    """A star-shaped polygon, rescaled once so that its area is close to `area`."""
    count = int(rng.integers(5, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=count))
    radii = rng.uniform(0.6, 1.0, size=count)
    center = rng.integers(size // 4, size - size // 4 + 1, size=2)
    scale = np.sqrt(area / np.pi)
    for _ in range(2):
        points = center + scale * radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        canvas = np.zeros((size, size), np.uint8)
        cv2.fillPoly(canvas, [np.rint(points).astype(np.int32)], 255, cv2.LINE_8)
        scale *= np.sqrt(area / max(int(np.count_nonzero(canvas)), 1))
    return canvas > 0


def _blob(size: int, area: float, rng: np.random.Generator) -> np.ndarray:
    """Thresholded smooth noise: one or a few organic blobs covering exactly `area` pixels (up to ties)."""
    cells = int(rng.integers(3, 7))
    field = cv2.resize(rng.random((cells, cells)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return field > np.quantile(field, 1.0 - area / size**2)


def random_region(size: int, rng: np.random.Generator, fraction=REGION_FRACTION) -> np.ndarray:
    """A bool size×size mask: an ellipse, a polygon or blobs covering about `fraction` of the image."""
    shapes = (_ellipse, _polygon, _blob)
    for _ in range(20):
        target = rng.uniform(*fraction) * size**2
        region = shapes[int(rng.integers(len(shapes)))](size, target, rng)
        covered = np.count_nonzero(region) / size**2
        if fraction[0] * 0.8 <= covered <= fraction[1] * 1.2:
            return region
    return _blob(size, np.mean(fraction) * size**2, rng)  # always within range by construction


# ----------------------------------------------------------------------------------------------- tampering


def _splice(host: np.ndarray, region: np.ndarray, donor: np.ndarray) -> np.ndarray:
    return np.where(region[:, :, None], donor, host)


def _copy_move(host: np.ndarray, region: np.ndarray, rng: np.random.Generator, difficulty: float) -> np.ndarray:
    """Paste a resampled, re-noised copy of another part of the image into `region` (optionally feathered)."""
    size = host.shape[0]
    rows, cols = np.nonzero(region)
    target = np.array([cols.mean(), rows.mean()])
    # The source centre keeps the copied patch mostly inside the image, at least size/8 away from the target.
    for _ in range(20):
        source = rng.uniform(0.2 * size, 0.8 * size, size=2)
        if np.linalg.norm(source - target) >= size / 8:
            break
    jitter = _lerp(0.2, 0.05, difficulty)
    matrix = cv2.getRotationMatrix2D((float(source[0]), float(source[1])), float(rng.uniform(-20, 20)),
                                     float(rng.uniform(1 - jitter, 1 + jitter)))
    matrix[:, 2] += target - source
    patch = cv2.warpAffine(host, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    sigma = np.float32(_lerp(*EXTRA_NOISE_SIGMA, difficulty))
    patch = patch + sigma * rng.standard_normal(patch.shape, dtype=np.float32)
    alpha = region.astype(np.float32)
    if rng.random() < 0.5:  # blurred boundary (tampCOCO "bcm"), kept inside the region
        alpha = cv2.GaussianBlur(alpha, (0, 0), rng.uniform(1.0, 3.0)) * alpha
    blended = alpha[:, :, None] * patch + (1 - alpha[:, :, None]) * host.astype(np.float32)
    blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.where(region[:, :, None], blended, host)


def _removal(host: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
    return cv2.inpaint(host, region.astype(np.uint8) * 255, float(rng.integers(2, 5)), method)


def tamper(kind: str, host: np.ndarray, rng: np.random.Generator, sources: list[Path] = (),
           difficulty: float = 0.25, host_sigma: float = 1.5,
           shapes: tuple[int, int] = SCENE_SHAPES) -> tuple[np.ndarray, np.ndarray]:
    """Tamper `host` (RGB uint8, square); returns (image, bool mask). Pixels outside the mask are untouched."""
    size = host.shape[0]
    region = random_region(size, rng)
    if kind == "splice":
        quality = int(rng.integers(DONOR_JPEG_QUALITY[0], DONOR_JPEG_QUALITY[1] + 1))
        sigma = host_sigma + _lerp(*EXTRA_NOISE_SIGMA, difficulty)
        donor = _camera(_content(size, rng, sources, shapes), sigma, quality, rng)
        return _splice(host, region, donor), region
    if kind == "copymove":
        return _copy_move(host, region, rng, difficulty), region
    if kind == "removal":
        return _removal(host, region, rng), region
    raise ValueError(f"unknown tampering kind {kind!r}; known: {', '.join(KINDS)}")


def make_sample(kind: str, size: int, rng: np.random.Generator, sources: list[Path] = (), difficulty: float = 0.25,
                shapes: tuple[int, int] = SCENE_SHAPES) -> tuple[np.ndarray, np.ndarray | None]:
    """One (RGB uint8 image, bool mask; None for "authentic") pair of the given kind."""
    host_sigma = rng.uniform(1.0, 2.5)
    host = _camera(_content(size, rng, sources, shapes), host_sigma, int(rng.integers(88, 98)), rng)
    if kind == "authentic":
        return host, None
    return tamper(kind, host, rng, sources, difficulty, host_sigma, shapes)


# ----------------------------------------------------------------------------------------------- writing


def list_sources(folder) -> list[Path]:
    """Readable-looking image files directly in `folder`, sorted by name (so a seed picks the same ones)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(folder, "sources must be a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ImageReadError(folder, f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder")
    return files


def make_synthetic_set(out_dir, num: int, size: int = 256, seed: int = 0, sources=None, kinds=KINDS,
                       authentic_fraction: float = 0.25, difficulty: float = 0.25, name: str = "synthetic",
                       progress: bool = True, shapes: tuple[int, int] = SCENE_SHAPES) -> Path:
    """Write `num` images (and masks) under `out_dir` and return the path of their file list.

    A fraction `authentic_fraction` (rounded) is authentic; the rest cycles through `kinds`. Paths in the list
    are absolute.
    """
    if num < 1 or size < 32:
        raise ValueError(f"need num >= 1 and size >= 32, got num={num}, size={size}")
    if not 0 <= authentic_fraction <= 1 or not 0 <= difficulty <= 1:
        raise ValueError("authentic_fraction and difficulty must lie in [0, 1]")
    if len(shapes) != 2 or not 0 <= shapes[0] <= shapes[1]:
        raise ValueError(f"shapes must be (fewest, most) with 0 <= fewest <= most, got {tuple(shapes)}")
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")
    source_files = list_sources(sources) if sources is not None else []
    out_dir = Path(out_dir).resolve()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)

    n_authentic = int(round(num * authentic_fraction))
    plan = [kinds[i % len(kinds)] for i in range(num - n_authentic)] + ["authentic"] * n_authentic
    plan = [plan[i] for i in np.random.default_rng(seed).permutation(num)]

    from tqdm import tqdm

    rows = []
    for i, kind in enumerate(tqdm(plan, desc=f"synthetic {name}", unit="img", disable=not progress)):
        image, mask = make_sample(kind, size, np.random.default_rng([seed, i]), source_files, difficulty,
                                  tuple(shapes))
        image_path = out_dir / "images" / f"{i:05d}_{kind}.png"
        write_png(image_path, image)
        mask_path = ""
        if mask is not None:
            mask_path = out_dir / "masks" / f"{i:05d}_{kind}.png"
            write_png(mask_path, mask.astype(np.uint8) * 255)
        rows.append((str(image_path), str(mask_path)))
    return write_flist(rows, out_dir, name)


def parse_shape_range(text: str) -> tuple[int, int]:
    """`N` or `FEWEST,MOST` (non-negative, FEWEST <= MOST) as (fewest, most)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 0 or values[0] > values[-1]:
        raise ValueError(f"expected N or FEWEST,MOST (non-negative integers), got {text!r}")
    return values[0], values[-1]

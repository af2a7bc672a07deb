"""The official MPC/FOCAL training augmentation, written for albumentations 2.x.

The official code ran albumentations 1.3.1; every argument whose 1.3.1 default differs from 2.x is set here
explicitly, and the two steps 2.x cannot express (OpenCV's sigma-from-kernel Gaussian blur and ElasticTransform's
removed `alpha_affine`) are small transforms below. `datasets/AUGMENTATIONS.md` has the call-by-call mapping.
"""
from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

from datasets.io import MASK_THRESHOLD

GATE_PROBABILITY = 0.75  # the official `random.random() < 0.75` around the whole pipeline


class OpenCVGaussianBlur(A.ImageOnlyTransform):
    """1.3.1's GaussianBlur(blur_limit=(3, 7), sigma_limit=0): OpenCV derives sigma from the kernel size.

    2.x builds its own kernel from a sampled sigma and cannot take sigma 0. The kernel size is drawn as 1.3.1
    drew it: an integer in [3, 7], even values bumped to the next odd one (P(3)=1/5, P(5)=P(7)=2/5).
    """

    def __init__(self, blur_limit: tuple[int, int] = (3, 7), p: float = 0.5):
        super().__init__(p=p)
        self.blur_limit = blur_limit

    def get_params(self) -> dict[str, int]:
        low, high = self.blur_limit
        ksize = self.py_random.randint(low, high)
        if ksize % 2 == 0:
            ksize = (ksize + 1) % (high + 1)
        return {"ksize": ksize}

    def apply(self, img: np.ndarray, ksize: int, **params) -> np.ndarray:
        return cv2.GaussianBlur(img, (ksize, ksize), 0)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("blur_limit",)


class ElasticAffineJitter(A.DualTransform):
    """The random affine step that 1.3.1's ElasticTransform ran before its displacement field (`alpha_affine`).

    Three points at ±min(H, W)//3 around the centre are each moved by U(-alpha_affine, alpha_affine) in both
    coordinates; the affine map between the two triangles warps image (bilinear) and mask (nearest) with the
    same border mode. 2.x removed the argument, so it runs here as its own step right before ElasticTransform.
    """

    def __init__(self, alpha_affine: float = 50.0, border_mode: int = cv2.BORDER_REFLECT_101, p: float = 0.5):
        super().__init__(p=p)
        self.alpha_affine = alpha_affine
        self.border_mode = border_mode

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict[str, np.ndarray]:
        height, width = params["shape"][:2]
        # 1.3.1 builds the points from (height, width) pairs; kept as is, it only matters for the point layout.
        center = np.array((height, width), dtype=np.float32) // 2
        half = min(height, width) // 3
        source = np.array([center + half, [center[0] + half, center[1] - half], center - half], dtype=np.float32)
        jitter = self.random_generator.uniform(-self.alpha_affine, self.alpha_affine, size=source.shape)
        return {"matrix": cv2.getAffineTransform(source, (source + jitter).astype(np.float32))}

    def _warp(self, img: np.ndarray, matrix: np.ndarray, interpolation: int) -> np.ndarray:
        height, width = img.shape[:2]
        warped = cv2.warpAffine(img, matrix, (width, height), flags=interpolation, borderMode=self.border_mode)
        return warped.reshape(img.shape)  # OpenCV drops a trailing channel axis of size 1

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params) -> np.ndarray:
        return self._warp(img, matrix, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, matrix: np.ndarray, **params) -> np.ndarray:
        return self._warp(mask, matrix, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("alpha_affine", "border_mode")


def official_transforms(input_size: int = 512) -> list:
    """The official Compose body (docs/MPC_SPEC.md §3), with 1.3.1's effective arguments spelled out for 2.x."""
    reflect = cv2.BORDER_REFLECT_101  # 1.3.1's default border for every geometric step; 2.x defaults to constant
    blur = A.OneOf([
        A.Blur(blur_limit=(3, 7), p=1),
        OpenCVGaussianBlur(blur_limit=(3, 7), p=1),
        A.MedianBlur(blur_limit=(3, 7), p=1),
        A.MotionBlur(blur_limit=(3, 7), allow_shifted=True, p=1),
    ], p=1)
    noise = A.OneOf([
        A.Downscale(scale_range=(0.25, 0.25),
                    interpolation_pair={"downscale": cv2.INTER_NEAREST, "upscale": cv2.INTER_NEAREST}, p=1),
        # 1.3.1 draws the variance from U(10, 50) on the 0-255 scale; 2.x draws the std as a fraction of 255.
        A.GaussNoise(std_range=(np.sqrt(10.0) / 255.0, np.sqrt(50.0) / 255.0), mean_range=(0.0, 0.0),
                     per_channel=True, p=1),
        A.ISONoise(color_shift=(0.01, 0.05), intensity=(0.1, 0.5), p=1),
        A.RandomBrightnessContrast(brightness_limit=(-0.2, 0.2), contrast_limit=(-0.2, 0.2),
                                   brightness_by_max=True, p=1),
        A.RandomGamma(gamma_limit=(80, 120), p=1),
        A.RandomToneCurve(scale=0.1, per_channel=False, p=1),
        A.Sharpen(alpha=(0.2, 0.5), lightness=(0.5, 1.0), method="kernel", p=1),
    ], p=1)
    geometric = A.OneOf([
        A.Sequential([
            ElasticAffineJitter(alpha_affine=50.0, border_mode=reflect, p=1),
            A.ElasticTransform(alpha=120, sigma=120 * 0.05, interpolation=cv2.INTER_LINEAR,
                               mask_interpolation=cv2.INTER_NEAREST, noise_distribution="uniform",
                               approximate=False, same_dxdy=False, border_mode=reflect, p=1),
        ], p=1),
        A.GridDistortion(num_steps=5, distort_limit=(-0.3, 0.3), interpolation=cv2.INTER_LINEAR,
                         mask_interpolation=cv2.INTER_NEAREST, normalized=False, border_mode=reflect, p=1),
    ], p=1)
    return [
        A.RandomScale(scale_limit=(-0.5, 0.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=0.75),
        A.PadIfNeeded(min_height=input_size, min_width=input_size, position="center", border_mode=reflect, p=1.0),
        A.OneOf([A.HorizontalFlip(p=1), A.VerticalFlip(p=1), A.RandomRotate90(p=1), A.Transpose(p=1)], p=0.75),
        A.ImageCompression(compression_type="jpeg", quality_range=(50, 95), p=0.75),
        A.OneOf([blur, noise, geometric], p=0.25),
    ]


class OfficialAugmentation:
    """Callable (RGB uint8 image, uint8 0/255 mask) -> (image, mask), the official train-time pipeline.

    With probability `gate_p` (official: 0.75) the whole pipeline runs, otherwise the pair comes back as is.
    All randomness comes from one numpy and one Python generator shared by every step, seeded by `seed` (None:
    from the OS) and re-seeded per item by `utils.training.sampling.SeededItems`. The mask stays binary
    (re-thresholded > 127).
    """

    def __init__(self, input_size: int = 512, seed: int | None = None, gate_p: float = GATE_PROBABILITY):
        self.compose = A.Compose(official_transforms(input_size), p=gate_p)
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        # Not `Compose(seed=...)`: albumentations 2.0 gives every step its own generator started from that same
        # seed, so the steps' coin flips come out identical (flip applied <=> scale applied). One shared stream
        # keeps the draws independent.
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.compose(image=image, mask=mask)
        binary = np.where(out["mask"] > MASK_THRESHOLD, 255, 0).astype(np.uint8)
        return out["image"], binary

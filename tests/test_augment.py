"""The official augmentation pipeline on albumentations 2.x: shapes, binary aligned masks, gate, seeding."""
import random

import albumentations as A
import cv2
import numpy as np
import pytest

from datasets.augment import ElasticAffineJitter, OfficialAugmentation, OpenCVGaussianBlur, official_transforms

SIZE = 64  # a small input_size keeps the tests fast; the pipeline pads to it as it pads to 512


def red_on_blue(height=60, width=52):
    """Blue image with a red off-centre L-shape; the mask marks the red pixels (asymmetric, so flips show)."""
    mask = np.zeros((height, width), np.uint8)
    mask[6 * height // 60:40 * height // 60, 8 * width // 52:30 * width // 52] = 255
    mask[30 * height // 60:50 * height // 60, 8 * width // 52:44 * width // 52] = 255
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 2] = 255
    image[mask > 0] = (255, 0, 0)
    return image, mask


def seeded(transforms, seed=0):
    compose = A.Compose(transforms)
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return compose


def test_output_shapes_and_binary_masks():
    image, mask = red_on_blue()
    augment = OfficialAugmentation(SIZE, seed=0)
    changed = 0
    for _ in range(40):
        out_image, out_mask = augment(image, mask)
        assert out_image.dtype == np.uint8 and out_mask.dtype == np.uint8
        assert out_image.shape[:2] == out_mask.shape and out_image.shape[2] == 3
        assert set(np.unique(out_mask)) <= {0, 255}
        if out_image.shape[:2] != image.shape[:2]:
            changed += 1
            assert min(out_image.shape[:2]) >= SIZE  # padded up to input_size after the random downscale
    assert changed > 0


def test_mask_follows_the_image_through_every_step():
    """Red (mask) vs blue (background) survives blur, noise, JPEG and colour steps; position must match.

    Within 4 px of the region's edge the image (bilinear) and the mask (nearest) may disagree, and blur,
    4x nearest downscaling and JPEG smear the edge; reflect-padding mirrors such edge pixels into the 4 px
    next to the border. Everywhere else the colour must say what the mask says.
    """
    image, mask = red_on_blue()
    augment = OfficialAugmentation(SIZE, seed=3, gate_p=1.0)
    band_kernel = np.ones((9, 9), np.uint8)
    for _ in range(60):
        out_image, out_mask = augment(image, mask)
        red_wins = out_image[..., 0].astype(int) > out_image[..., 2].astype(int)
        edge = cv2.dilate(out_mask, band_kernel) != cv2.erode(out_mask, band_kernel)
        edge[:4], edge[-4:], edge[:, :4], edge[:, -4:] = True, True, True, True
        agreement = np.mean((red_wins == (out_mask > 0))[~edge])
        assert agreement > 0.995, agreement


@pytest.mark.parametrize("flip, candidates", [
    (A.HorizontalFlip, lambda m: [m[:, ::-1]]),
    (A.VerticalFlip, lambda m: [m[::-1]]),
    (A.Transpose, lambda m: [m.T]),
    (A.RandomRotate90, lambda m: [np.rot90(m, k) for k in range(4)]),
])
def test_dihedral_steps_move_mask_and_image_together(flip, candidates):
    image, mask = red_on_blue()
    for seed in range(4):
        out = seeded([flip(p=1)], seed=seed)(image=image, mask=mask)
        assert any(c.shape == out["mask"].shape and np.array_equal(c, out["mask"]) for c in candidates(mask))
        np.testing.assert_array_equal(out["mask"] > 0, np.all(out["image"] == (255, 0, 0), axis=2))


def test_gate_zero_returns_the_input_unchanged():
    image, mask = red_on_blue()
    augment = OfficialAugmentation(SIZE, seed=0, gate_p=0.0)
    for _ in range(5):
        out_image, out_mask = augment(image, mask)
        np.testing.assert_array_equal(out_image, image)
        np.testing.assert_array_equal(out_mask, mask)


def test_gate_applies_about_three_quarters_of_the_time():
    image, mask = red_on_blue(8, 8)
    augment = OfficialAugmentation(8, seed=0)
    applied = sum(not np.array_equal(augment(image, mask)[0], image) for _ in range(400))
    # Applied steps can still leave the image as is (e.g. nothing drawn after the gate): allow for it.
    assert 0.55 < applied / 400 < 0.8


def test_same_seed_same_augmentations_and_reseed_restarts():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    mask = (rng.random((40, 56)) > 0.7).astype(np.uint8) * 255
    first, second, other = (OfficialAugmentation(SIZE, seed=s) for s in (7, 7, 8))
    run1 = [first(image, mask) for _ in range(10)]
    run2 = [second(image, mask) for _ in range(10)]
    run3 = [other(image, mask) for _ in range(10)]
    for (i1, m1), (i2, m2) in zip(run1, run2):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(m1, m2)
    assert any(i1.shape != i3.shape or not np.array_equal(i1, i3) for (i1, _), (i3, _) in zip(run1, run3))
    first.reseed(7)
    np.testing.assert_array_equal(first(image, mask)[0], run1[0][0])


def test_steps_draw_independent_coins():
    """Two p=0.5 flips seeded through one shared stream must not always agree (albumentations' own
    `Compose(seed=...)` gives each step the same generator state, making them agree every time)."""
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, axis=2)
    augment = OfficialAugmentation(4, seed=0)
    augment.compose = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    augment.reseed(0)
    hflip, vflip = image[:, ::-1], image[::-1]
    both_or_neither = 0
    for _ in range(200):
        out = augment(image, np.zeros((4, 4), np.uint8))[0]
        did_h = np.array_equal(out, hflip) or np.array_equal(out, image[::-1, ::-1])
        did_v = np.array_equal(out, vflip) or np.array_equal(out, image[::-1, ::-1])
        both_or_neither += did_h == did_v
    assert 70 < both_or_neither < 130


def test_opencv_gaussian_blur_uses_sigma_from_kernel_and_131_kernel_draw():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    references = {k: cv2.GaussianBlur(image, (k, k), 0) for k in (3, 5, 7)}
    blur = seeded([OpenCVGaussianBlur(p=1)])
    counts = {3: 0, 5: 0, 7: 0}
    for _ in range(500):
        out = blur(image=image)["image"]
        matches = [k for k, ref in references.items() if np.array_equal(out, ref)]
        assert len(matches) == 1
        counts[matches[0]] += 1
    # 1.3.1 draws k in {3..7} and bumps even values up: P(3) = 0.2, P(5) = P(7) = 0.4.
    assert abs(counts[3] / 500 - 0.2) < 0.06 and abs(counts[5] / 500 - 0.4) < 0.07


def test_affine_jitter_zero_is_identity_and_keeps_masks_aligned():
    image, mask = red_on_blue()
    same = seeded([ElasticAffineJitter(alpha_affine=0.0, p=1)])(image=image, mask=mask)
    np.testing.assert_array_equal(same["image"], image)
    np.testing.assert_array_equal(same["mask"], mask)
    moved = seeded([ElasticAffineJitter(alpha_affine=8.0, p=1)], seed=2)(image=image, mask=mask)
    assert moved["image"].shape == image.shape and set(np.unique(moved["mask"])) <= {0, 255}
    assert not np.array_equal(moved["mask"], mask)
    red_wins = moved["image"][..., 0].astype(int) > moved["image"][..., 2].astype(int)
    assert np.mean(red_wins == (moved["mask"] > 0)) > 0.97


def test_pipeline_carries_the_131_arguments():
    steps = official_transforms(512)
    scale, pad, dihedral, jpeg, degradations = steps
    assert (scale.scale_limit, scale.interpolation, scale.p) == ((-0.5, 0.0), cv2.INTER_LINEAR, 0.75)
    assert (pad.min_height, pad.min_width, pad.border_mode) == (512, 512, cv2.BORDER_REFLECT_101)
    assert dihedral.p == 0.75 and len(dihedral.transforms) == 4
    assert (jpeg.quality_range, jpeg.p) == ((50, 95), 0.75)
    assert degradations.p == 0.25 and [len(group.transforms) for group in degradations.transforms] == [4, 7, 2]
    elastic = degradations.transforms[2].transforms[0].transforms[1]
    assert (elastic.alpha, elastic.sigma, elastic.border_mode) == (120, 6.0, cv2.BORDER_REFLECT_101)
    grid = degradations.transforms[2].transforms[1]
    assert (grid.num_steps, grid.distort_limit, grid.normalized, grid.border_mode) == (
        5, (-0.3, 0.3), False, cv2.BORDER_REFLECT_101)

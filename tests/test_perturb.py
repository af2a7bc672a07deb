"""Robustness distortions against independent computations."""
import cv2
import numpy as np
import pytest
import torch

from datasets.perturb import (ROBUSTNESS_GRID, gaussian_blur, gaussian_noise, jpeg, make_perturbation,
                              parse_perturbations, resize, social_network)


@pytest.fixture
def image():
    rng = np.random.default_rng(1)
    smooth = cv2.resize(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), (50, 40), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(smooth)


def reference_jpeg(rgb, quality):
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("quality", [100, 70, 50])
def test_jpeg_matches_opencv_round_trip_in_bgr(image, quality):
    out = jpeg(image, quality)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, reference_jpeg(image, quality))


def test_jpeg_keeps_colour_order():
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    out = jpeg(red, 90).astype(int)
    assert out[..., 0].min() > 240 and out[..., 2].max() < 15


def test_resize_half_is_the_2x2_mean(image):
    out = resize(image, 0.5)
    assert out.shape == (20, 25, 3)
    # Bilinear downscaling by exactly 2 averages 2x2 blocks (PyTorch's bilinear without antialias does the same).
    expected = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].double(),
                                               size=(20, 25), mode="bilinear", align_corners=False)
    expected = expected[0].permute(1, 2, 0).numpy()
    assert np.abs(out - expected).max() <= 1.0


@pytest.mark.parametrize("factor, shape", [(0.75, (30, 38)), (0.25, (10, 12)), (1.0, (40, 50))])
def test_resize_shape_is_rounded(image, factor, shape):
    assert resize(image, factor).shape[:2] == shape


# OpenCV's getGaussianKernel with sigma <= 0: fixed tables up to 7 taps, else sigma = 0.3((k - 1)/2 - 1) + 0.8.
SMALL_GAUSSIAN_TAPS = {3: [0.25, 0.5, 0.25], 5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
                       7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125]}


@pytest.mark.parametrize("ksize", [3, 7, 11, 23])
def test_blur_is_gaussian_with_opencv_default_sigma(image, ksize):
    if ksize in SMALL_GAUSSIAN_TAPS:
        taps = np.array(SMALL_GAUSSIAN_TAPS[ksize])
    else:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
        taps = np.exp(-0.5 * ((np.arange(ksize) - ksize // 2) / sigma) ** 2)
        taps /= taps.sum()
    padded = np.pad(image.astype(np.float64), ((ksize // 2,) * 2, (ksize // 2,) * 2, (0, 0)), mode="reflect")
    rows = sum(taps[i] * padded[i:i + image.shape[0]] for i in range(ksize))
    expected = sum(taps[j] * rows[:, j:j + image.shape[1]] for j in range(ksize))
    assert np.abs(gaussian_blur(image, ksize).astype(float) - expected).max() <= 1.0


def test_noise_has_the_asked_std_and_is_deterministic():
    gray = np.full((256, 256, 3), 128, np.uint8)
    out = gaussian_noise(gray, 7)
    residual = out.astype(float) - 128
    assert abs(residual.std() - 7) < 0.1 and abs(residual.mean()) < 0.1
    np.testing.assert_array_equal(out, gaussian_noise(gray, 7))
    assert not np.array_equal(out, gaussian_noise(gray, 7, seed=1))
    black = np.zeros_like(gray)
    assert gaussian_noise(black, 23).mean() > 5  # clipped at 0, not wrapped around


def test_social_network_is_half_size_then_jpeg_75(image):
    half = cv2.resize(image, (25, 20), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(social_network(image), reference_jpeg(half, 75))


def test_grid_is_the_metrics_table():
    assert ROBUSTNESS_GRID == [
        ("jpeg", (100, 90, 80, 70, 60, 50)),
        ("resize", (0.75, 0.5, 0.25)),
        ("blur", (3, 7, 11, 15, 19, 23)),
        ("noise", (3, 7, 11, 15, 19, 23)),
        ("osn", (None,)),
    ]
    for name, levels in ROBUSTNESS_GRID:
        for level in levels:
            assert make_perturbation(name, level).kind == name


def test_parse_perturbations_names_and_applies(image):
    chain = parse_perturbations("jpeg:70, resize:0.5,blur:7,noise:11,osn")
    assert [p.name for p in chain] == ["jpeg:70", "resize:0.5", "blur:7", "noise:11", "osn"]
    np.testing.assert_array_equal(chain[0](image), reference_jpeg(image, 70))
    assert chain[1](image).shape == (20, 25, 3)
    np.testing.assert_array_equal(chain[4](image), social_network(image))


@pytest.mark.parametrize("spec, message", [
    ("gamma:2", "unknown perturbation 'gamma'"),
    ("jpeg:abc", "numeric level"),
    ("jpeg:101", "0..100"),
    ("jpeg", "needs a level"),
    ("blur:4", "odd"),
    ("resize:2", "(0, 1]"),
    ("noise:-1", "sigma >= 0"),
    ("osn:3", "takes no level"),
    ("jpeg:70,,blur:3", "empty item"),
])
def test_parse_perturbations_rejects_bad_items(spec, message):
    with pytest.raises(ValueError) as error:
        parse_perturbations(spec)
    assert message in str(error.value)


def test_distortions_reject_non_rgb_uint8():
    with pytest.raises(ValueError, match="RGB uint8"):
        jpeg(np.zeros((4, 4), np.uint8), 90)

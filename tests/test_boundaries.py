"""Every threshold of the data path, the prediction path and the metrics, at its boundary value and one step either
side. Expectations are worked out by hand from the rule each threshold implements (written next to each case), never
read from the code under test.

The rules: a mask or predicted map pixel is forged when its 0-255 value is strictly greater than 127 (the official
`int(0.5 * 255)`); a colour mask is read through the blue channel (OpenCV's BGR channel 0, as the official
`cv2.imread(mask)[:, :, 0]`); 16-bit masks that use more than 0..255 are brought to 0..255 by /257 with rounding.
A mask that rule would misread (only values 1..127, another colour channel marking more than 1 % of the marked
pixels, a shape drawn by transparency) is refused rather than read as all-authentic (`datasets.io`).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datasets.dataset import ForgeryDataset
from datasets.flist import check_rows, mask_values
from datasets.io import ImageReadError, read_mask
from datasets.perturb import Perturbation
from test_flist import kinds_of, noise_image, save
from utils.evaluation import kmeans
from utils.evaluation.metrics import ImageMetrics, PixelMetrics, binarize, upsample_probability
from utils.evaluation.prediction import ProbabilityMap

ABOVE_127 = float(np.nextafter(np.float32(127), np.float32(128)))  # the smallest float32 above the threshold
BELOW_127 = float(np.nextafter(np.float32(127), np.float32(0)))


def row_mask(path) -> list[bool]:
    """A one-row mask file read as the pipeline reads it, as a list."""
    return read_mask(path)[0].tolist()


# ---------------------------------------------------------------------------------------------- mask binarisation

def test_8bit_gray_mask_is_forged_strictly_above_127(tmp_path):
    path = save(np.array([[0, 126, 127, 128, 255]], np.uint8), tmp_path / "gray.png")
    assert Image.open(path).mode == "L"
    assert row_mask(path) == [False, False, False, True, True]


def test_8bit_gray_mask_inverted_is_forged_at_127_and_below(tmp_path):
    # NIST16 marks forged pixels black: the inverted reading is "not > 127", so 127 is forged and 128 is not
    path = save(np.array([[0, 126, 127, 128, 255]], np.uint8), tmp_path / "gray.png")
    assert read_mask(path, invert=True)[0].tolist() == [True, True, True, False, False]


def test_rgb_mask_reads_the_blue_channel_only(tmp_path):
    boundary = [
        (127, 127, 127),  # grey at the threshold: pristine
        (128, 128, 128),  # one step above: forged
        (126, 126, 126),  # one step below: pristine
        (0, 0, 128),      # blue alone one above: forged
        (128, 128, 127),  # red and green above, blue at it: pristine (red is OpenCV's channel 2)
        (255, 0, 0),      # red alone: pristine
    ]
    # 300 white pixels beside them, so that the two pixels only red or green marks stay under the 1 % that a
    # colour-drawn mask would exceed (such a mask is refused, see the tolerance test below)
    pixels = np.array([boundary + [(255, 255, 255)] * 300], np.uint8)
    path = save(pixels, tmp_path / "rgb.png")
    assert Image.open(path).mode == "RGB"
    assert row_mask(path)[:len(boundary)] == [False, True, False, True, False, False]


@pytest.mark.parametrize("red_only, refused", [(1, False), (2, True)])
def test_rgb_mask_marked_in_another_channel_is_refused_above_one_percent(tmp_path, red_only, refused):
    # 100 pixels marked by some channel, `red_only` of them by red alone: the blue rule misses 1 % (tolerated: JPEG
    # grey masks differ between channels on a few border pixels) or 2 % (a mask drawn in colour: refused)
    pixels = np.zeros((1, 150, 3), np.uint8)
    pixels[0, :100 - red_only] = 255
    pixels[0, 100 - red_only:100] = (255, 0, 0)
    path = save(pixels, tmp_path / "colour.png")
    if refused:
        with pytest.raises(ImageReadError, match="red"):
            read_mask(path)
    else:
        assert read_mask(path)[0].tolist() == [True] * (100 - red_only) + [False] * (50 + red_only)


def test_rgba_mask_ignores_a_constant_alpha(tmp_path):
    # cv2.imread drops the alpha channel: fully transparent pixels are read by their blue value
    pixels = np.array([[(0, 0, 128, 0), (0, 0, 127, 0), (0, 0, 126, 0), (255, 255, 255, 0)]], np.uint8)
    path = save(pixels, tmp_path / "rgba.png")
    assert Image.open(path).mode == "RGBA"
    assert row_mask(path) == [True, False, False, True]


def test_palette_mask_reads_the_blue_of_each_palette_colour(tmp_path):
    colours = [(0, 0, 0), (127, 127, 127), (128, 128, 128), (126, 126, 126), (0, 0, 127), (0, 0, 128)]
    image = Image.fromarray(np.arange(len(colours), dtype=np.uint8)[None, :], mode="P")
    image.putpalette([channel for colour in colours for channel in colour])
    path = tmp_path / "palette.png"
    image.save(path)
    assert Image.open(path).mode == "P"
    assert row_mask(path) == [False, False, True, False, False, True]


def test_one_bit_mask_is_read_as_is(tmp_path):
    path = tmp_path / "bits.png"
    Image.fromarray(np.array([[0, 255, 0, 255]], np.uint8)).convert("1").save(path)
    assert Image.open(path).mode == "1"
    assert row_mask(path) == [False, True, False, True]


def _save_16bit(values, path: Path) -> str:
    assert cv2.imwrite(str(path), np.array([values], np.uint16))
    assert Image.open(path).mode.startswith("I")  # a 16-bit gray PNG
    return str(path)


def test_16bit_mask_using_the_full_range_is_scaled_by_257(tmp_path):
    # v / 257 rounded, then > 127: 127*257 = 32639 -> 127 (pristine); 32767 -> 127.498 -> 127 (pristine);
    # 32768 -> 127.502 -> 128 (forged); 128*257 = 32896 -> 128 (forged). 65535 puts the file in the full range.
    path = _save_16bit([0, 127 * 257, 32767, 32768, 128 * 257, 65535], tmp_path / "full.png")
    assert row_mask(path) == [False, False, False, True, True, True]


def test_16bit_mask_with_8bit_values_is_read_unscaled(tmp_path):
    # largest value 255: the samples are taken as 0..255 values, so 127 / 128 straddle the threshold directly
    path = _save_16bit([0, 126, 127, 128, 255], tmp_path / "narrow.png")
    assert row_mask(path) == [False, False, False, True, True]


def test_16bit_mask_just_past_8bit_values_switches_to_the_full_range(tmp_path):
    # largest value 256 (one above 255): every sample is divided by 257, so 128 -> 0.498 -> 0, 255 and 256 -> 1:
    # values of only 0 and 1, which the > 127 rule would read as all-authentic, so the mask is refused (read
    # unscaled, 128 and 255 would have been forged pixels and nothing refused)
    path = _save_16bit([0, 127, 128, 255, 256], tmp_path / "switch.png")
    with pytest.raises(ImageReadError, match="0 and 1"):
        read_mask(path)


def test_float_mask_in_0_1_is_scaled_by_255_with_rounding(tmp_path):
    # x * 255 rounded to the nearest integer (ties to even), then > 127: 0.5 -> 127.5 -> 128 (forged); the float32
    # just below 0.5 -> 127.49998 -> 127 (pristine); 127/255 -> 127 (pristine); 128/255 -> 128 (forged)
    half = np.float32(0.5)
    values = np.array([[0.0, 127 / 255, np.nextafter(half, np.float32(0)), half, 128 / 255, 1.0]], np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    assert Image.open(path).mode == "F"
    assert row_mask(path) == [False, False, False, True, True, True]


# ------------------------------------------------------------------------------- training mask: resize, re-threshold

def test_training_mask_is_resized_bilinearly_then_rethresholded(tmp_path):
    """A 16×16 mask to 4×4 (input 16, ratio 4): OpenCV's bilinear sample of output pixel (r, c) lies at source
    (4r + 1.5, 4c + 1.5), the mean of the 2×2 block of rows and columns 4r+1 and 4r+2 (pixels outside that block do
    not count). With k of those 4 pixels forged the value is 255k/4: 63.75 -> 64 (pristine), 127.5 -> 128 after
    OpenCV's round-half-up fixed point (forged: exactly half covered is the reachable boundary for a 0/255 mask),
    191.25 -> 191 (forged)."""
    mask = np.zeros((16, 16), np.uint8)
    mask[1, 1] = 255                                   # output (0, 0): 1 of 4
    mask[1:3, 5] = 255                                 # output (0, 1): 2 of 4
    mask[1, 9:11] = mask[2, 9] = 255                   # output (0, 2): 3 of 4
    mask[1:3, 13:15] = 255                             # output (0, 3): 4 of 4
    mask[4:8, 4:8] = 255
    mask[5:7, 5:7] = 0                                 # output (1, 1): 12 of 16 forged, none of the sampled 4
    image = save(noise_image(16, 16), tmp_path / "image.png")
    dataset = ForgeryDataset([(image, save(mask, tmp_path / "mask.png"))], mode="train", input_size=16,
                             augment=False)
    expected = np.zeros((4, 4), bool)
    expected[0, 1:] = True
    assert np.array_equal(dataset[0]["mask"][0].numpy() > 0.5, expected)
    assert set(np.unique(dataset[0]["mask"].numpy())) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------------- prediction threshold

def test_probability_map_mask_is_strictly_above_127():
    values = np.array([[126.99, BELOW_127, 127.0, ABOVE_127, 127.01, 128.0]], np.float32)
    expected = [False, False, False, True, True, True]
    assert ProbabilityMap(values).mask()[0].tolist() == expected
    assert binarize(values)[0].tolist() == expected


def test_fixed_threshold_f1_and_iou_count_127_as_pristine():
    # ground truth forged on the first five pixels; predicted forged: > 127, i.e. 127+ε, 128, 255 (tp = 3) and the
    # pristine pixel at 127+ε (fp = 1); 126.99 and 127.0 are missed (fn = 2), the pristine 127.0 is a true negative
    values = np.array([[126.99, 127.0, ABOVE_127, 128.0, 255.0, 127.0, ABOVE_127]], np.float32)
    gt = np.array([[True, True, True, True, True, False, False]])
    row = PixelMetrics().update(values, gt)
    assert row["f1_fixed"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert row["iou"] == pytest.approx(3 / (3 + 1 + 2 + 1e-6))
    assert row["predicted_fraction"] == pytest.approx(4 / 7)


def test_image_level_score_threshold_is_strictly_above_127():
    # tampered scores 127.0 (missed), 127+ε and 200 (found); authentic 127.0 and 126.99 (correct), 127+ε (false
    # alarm): tp 2, fn 1, fp 1, tn 2 -> F1 = 4/6, balanced accuracy = (2/3 + 2/3) / 2
    metrics = ImageMetrics()
    for score, label in [(127.0, 1), (ABOVE_127, 1), (200.0, 1), (127.0, 0), (126.99, 0), (ABOVE_127, 0)]:
        metrics.update(score, label)
    result = metrics.compute()
    assert result["img_f1"] == pytest.approx(2 / 3)
    assert result["img_bacc"] == pytest.approx(2 / 3)


def test_probability_map_score_and_probability_stop_at_one():
    # bilinear resizing may overshoot 255 by a rounding error: the score and the probability are clipped to 1
    overshoot = float(np.nextafter(np.float32(255), np.float32(256)))
    assert ProbabilityMap(np.array([[0.0, 255.0]], np.float32)).score == 1.0
    assert ProbabilityMap(np.array([[0.0, overshoot]], np.float32)).score == 1.0
    assert ProbabilityMap(np.array([[0.0, 127.5]], np.float32)).score == 0.5
    assert ProbabilityMap(np.array([[0.0, overshoot]], np.float32)).probability().max() == 1.0


@pytest.mark.parametrize("value, accepted", [(0.0, True), (-1e-7, False), (1.0, True),
                                             (float(np.nextafter(np.float32(1), np.float32(2))), False)])
def test_upsample_accepts_probabilities_in_0_1_inclusive(value, accepted):
    prob = np.array([[0.5, value]], np.float32)
    if accepted:
        assert upsample_probability(prob, (1, 2))[0, 1] == pytest.approx(255 * value)
    else:
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            upsample_probability(prob, (1, 2))


@pytest.mark.parametrize("value, accepted", [(0.0, True), (-1e-4, False), (255.0, True), (255.001, False)])
def test_metrics_accept_scores_in_0_255_inclusive(value, accepted):
    gt = np.array([[True, False]])
    if accepted:
        PixelMetrics().update(np.array([[value, 0.0]], np.float32), gt)
        ImageMetrics().update(value, 1)
    else:
        with pytest.raises(ValueError, match=r"\[0, 255\]"):
            PixelMetrics().update(np.array([[value, 0.0]], np.float32), gt)
        with pytest.raises(ValueError, match=r"\[0, 255\]"):
            ImageMetrics().update(value, 1)


@pytest.mark.parametrize("ones, forged_label", [(7, 1), (8, 1), (9, 0)])
def test_kmeans_minority_cluster_is_forged_and_a_tie_goes_to_cluster_1(monkeypatch, ones, forged_label):
    # 16 pixels: cluster 1 holding 7 is the minority (forged); holding 8 is a tie, which the official rule gives to
    # cluster 1; holding 9 makes cluster 0 (7 pixels) the minority
    labels = torch.zeros(16, dtype=torch.int64)
    labels[:ones] = 1
    monkeypatch.setattr(kmeans, "cosine_kmeans", lambda features, **options: (labels, None))
    maps = [torch.rand(1, 2, 4 // 2**i or 1, 4 // 2**i or 1) for i in range(4)]
    mask = kmeans.kmeans_forgery_mask(maps)
    assert mask.shape == (1, 4, 4)
    assert torch.equal(mask.flatten(), labels == forged_label)


# ------------------------------------------------------------------------------------------------ file-list checks

def _check_mask(tmp_path, mask: np.ndarray, name: str) -> list[str]:
    """The problem kinds `check_rows` reports for `mask` beside a matching image."""
    image = save(noise_image(*mask.shape), tmp_path / f"{name}_image.png")
    return kinds_of(check_rows([(image, save(mask, tmp_path / f"{name}_mask.png"))]))


@pytest.mark.parametrize("value, ambiguous", [(10, False), (11, True), (244, True), (245, False)])
def test_near_black_and_near_white_are_not_ambiguous(tmp_path, value, ambiguous):
    # 100×100 mask, 20 % white (forged), 2 % at `value`: ambiguous are values in 11..244, and 2 % > 1 % warns
    mask = np.zeros((100, 100), np.uint8)
    mask[:20] = 255
    mask[50:52] = value
    assert _check_mask(tmp_path, mask, f"v{value}") == (["mask not binary"] if ambiguous else [])


@pytest.mark.parametrize("count, warned", [(100, False), (101, True)])
def test_not_binary_warning_starts_above_one_percent_of_pixels(tmp_path, count, warned):
    mask = np.zeros((100, 100), np.uint8)
    mask[:20] = 255
    mask.reshape(-1)[5000:5000 + count] = 100  # exactly 1 % of 10,000 pixels is tolerated, one more is not
    assert _check_mask(tmp_path, mask, f"n{count}") == (["mask not binary"] if warned else [])


@pytest.mark.parametrize("forged, warned", [(5000, False), (5001, True)])
def test_mostly_forged_warning_starts_above_half(tmp_path, forged, warned):
    mask = np.zeros((100, 100), np.uint8)
    mask.reshape(-1)[:forged] = 255  # exactly half forged is allowed; one pixel more warns (inverted polarity?)
    assert _check_mask(tmp_path, mask, f"f{forged}") == (["mask mostly forged"] if warned else [])


@pytest.mark.parametrize("peak, problem", [(0, ["mask empty"]), (1, ["mask in another convention"]),
                                           (127, ["mask in another convention"]), (128, [])])
def test_empty_mask_error_uses_the_127_rule(tmp_path, peak, problem):
    # a single 128 is one forged pixel; all zeros is an empty mask; a largest value of 1..127 reads as empty too,
    # which is reported as a mask in another convention (0/1 or 0..127 masks need converting)
    mask = np.zeros((10, 10), np.uint8)
    mask[0, 0] = peak
    assert _check_mask(tmp_path, mask, f"p{peak}") == problem


@pytest.mark.parametrize("floor, problem", [(127, ["mask mostly forged"]), (128, ["mask all forged"])])
def test_all_forged_error_uses_the_127_rule(tmp_path, floor, problem):
    mask = np.full((10, 10), 255, np.uint8)
    mask[0, 0] = floor  # one pristine pixel at 127 keeps the mask from being all forged: 99 % forged only warns
    assert _check_mask(tmp_path, mask, f"a{floor}") == problem


def test_columbia_green_threshold_is_strictly_above_120_and_above_red(tmp_path):
    pixels = np.array([[
        (0, 120, 0),      # green at the threshold: authentic
        (0, 121, 0),      # one above: spliced
        (119, 120, 0),    # at the threshold even though it dominates red: authentic
        (121, 121, 0),    # above the threshold but not above red (yellow): authentic
        (120, 121, 0),    # above the threshold and one above red: spliced
        (255, 255, 255),  # white: authentic
        (255, 0, 0),      # red (the authentic part): authentic
    ]], np.uint8)
    values = mask_values(save(pixels, tmp_path / "edge.png"), "columbia_edge")
    assert values[0].tolist() == [0, 255, 0, 0, 255, 0, 0]


def test_conversion_kinds_threshold_at_their_boundaries(tmp_path):
    # nonzero: any value above 0 (0/1 masks); colour: any channel above 127; alpha: opacity above 127
    gray = save(np.array([[0, 1, 2, 255]], np.uint8), tmp_path / "zero_one.png")
    assert (mask_values(gray, "nonzero")[0] == 255).tolist() == [False, True, True, True]
    colours = np.array([[(127, 127, 127), (128, 0, 0), (0, 128, 0), (0, 0, 128), (127, 0, 0)]], np.uint8)
    colour = save(colours, tmp_path / "colour.png")
    assert (mask_values(colour, "colour")[0] == 255).tolist() == [False, True, True, True, False]
    layers = np.array([[(0, 0, 0, 126), (0, 0, 0, 127), (0, 0, 0, 128), (255, 255, 255, 0)]], np.uint8)
    alpha = save(layers, tmp_path / "alpha.png")
    assert (mask_values(alpha, "alpha")[0] == 255).tolist() == [False, False, True, False]


def test_inverted_mask_values_flip_at_127(tmp_path):
    # inverted kind: 255 - blue, so blue 127 -> 128 (forged) and blue 128 -> 127 (pristine)
    values = mask_values(save(np.array([[0, 127, 128, 255]], np.uint8), tmp_path / "nist.png"), "inverted")
    assert (values[0] > 127).tolist() == [True, True, False, False]


# ------------------------------------------------------------------------------------- perturbation level limits

@pytest.mark.parametrize("name, level, accepted", [
    ("jpeg", -1, False), ("jpeg", 0, True), ("jpeg", 100, True), ("jpeg", 101, False),
    ("resize", 0, False), ("resize", 1e-6, True), ("resize", 1, True), ("resize", float(np.nextafter(1.0, 2.0)), False),
    ("blur", 0, False), ("blur", 1, True), ("blur", 2, False), ("blur", 3, True),
    ("noise", -1e-12, False), ("noise", 0, True), ("noise", float("nan"), False),
])
def test_perturbation_levels_at_their_limits(name, level, accepted):
    if accepted:
        assert Perturbation(name, level).level == level
    else:
        with pytest.raises(ValueError, match=name):
            Perturbation(name, level)

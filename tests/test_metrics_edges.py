"""Edges of utils.evaluation.metrics that mutation testing found unguarded: the dataset scores of `compute`, the
per-image row's fields, exact range and size boundaries, single-pixel and single-class sets, and messages.

References are scikit-learn on tiny maps and hand-worked values; see docs/DEVELOPMENT.md for the mutation run."""
import math
import re
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from utils.evaluation.metrics import ImageMetrics, PixelMetrics, upsample_probability

ROW_KEYS = {"name", "height", "width", "forged_fraction", "predicted_fraction", "f1_fixed", "iou", "f1_best",
            "f1_permuted", "auc"}
DATASET_KEYS = {"n_images", "f1_fixed", "iou", "f1_best", "f1_permuted", "f1_pooled", "auc_mean", "auc_skipped",
                "auc_pooled"}


def sk_f1(gt, pred):
    with warnings.catch_warnings():  # sklearn warns, then scores 0, without true and predicted positives
        warnings.simplefilter("ignore")
        return f1_score(gt.ravel(), pred.ravel())


# ------------------------------------------------------------------------------------------------------ upsampling

def test_upsample_to_one_column_and_one_row():
    # OpenCV bilinear: output column 0 of width 1 samples input x = (0 + 0.5)·2 − 0.5 = 0.5, halfway: 127.5.
    column = upsample_probability(np.array([[0.0, 1.0]], np.float32), (3, 1))
    np.testing.assert_allclose(column, [[127.5], [127.5], [127.5]], atol=1e-4)
    row = upsample_probability(np.array([[0.0], [1.0]], np.float32), (1, 2))
    np.testing.assert_allclose(row, [[127.5, 127.5]], atol=1e-4)


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (-1, 5)])
def test_upsample_rejects_an_empty_target_naming_it(size):
    message = f"upsample_probability: target size must be positive, got {size}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        upsample_probability(np.zeros((2, 2), np.float32), size)


def test_upsample_names_out_of_range_probabilities():
    with pytest.raises(ValueError, match=r"^upsample_probability: probabilities must lie in \[0, 1\] "
                                         r"\(got min -0.5, max 0.5\)$"):
        upsample_probability(np.array([[-0.5, 0.5]], np.float32), (2, 2))


# ------------------------------------------------------------------------------------------------ one image's row

def three_by_five():
    """6 of 15 pixels forged; 4 predicted (> 127): 3 of them forged, 1 pristine."""
    gt = np.zeros((3, 5), bool)
    gt[0, :] = True
    gt[1, 0] = True
    prob = np.zeros((3, 5), np.float32)
    prob[0, :3] = 200
    prob[2, 4] = 128
    prob[1, 1] = 127  # exactly at the threshold: not predicted
    return prob, gt


def test_row_fields_hand_worked():
    prob, gt = three_by_five()
    row = PixelMetrics().update(prob, gt, name="a")
    assert set(row) == ROW_KEYS
    assert (row["name"], row["height"], row["width"]) == ("a", 3, 5)
    assert row["forged_fraction"] == pytest.approx(6 / 15, abs=1e-15)
    assert row["predicted_fraction"] == pytest.approx(4 / 15, abs=1e-15)
    # tp 3, fp 1, fn 3: F1 = 6 / (6 + 1 + 3).
    assert row["f1_fixed"] == pytest.approx(0.6, abs=1e-15)


def test_images_are_named_in_update_order_by_default():
    metrics = PixelMetrics()
    names = [metrics.update(*three_by_five())["name"] for _ in range(2)]
    assert names == ["image #0", "image #1"]


def test_inverted_prediction_scores_the_permuted_f1():
    # Prediction [[0, 1], [1, 0]] against forged pixel (0, 0): tp 0, fp 2, fn 1. Inverted, [[1, 0], [0, 1]]:
    # tp 1, fp 1, fn 0, F1 = 2 / 3.
    gt = np.array([[True, False], [False, False]])
    prob = np.array([[0, 255], [255, 0]], np.float32)
    row = PixelMetrics().update(prob, gt)
    assert row["f1_fixed"] == 0.0
    assert row["f1_permuted"] == pytest.approx(2 / 3, abs=1e-15)
    assert row["f1_permuted"] == pytest.approx(max(sk_f1(gt, prob > 127), sk_f1(gt, prob <= 127)), abs=1e-15)


def test_zero_one_integer_masks_equal_boolean_masks():
    prob, gt = three_by_five()
    as_bool = PixelMetrics().update(prob, gt)
    as_uint8 = PixelMetrics().update(prob, gt.astype(np.uint8))
    assert as_uint8 == as_bool


@pytest.mark.parametrize("value", [255.0, 0.0])
def test_the_ends_of_the_0_255_scale_are_accepted(value):
    row = PixelMetrics().update(np.full((2, 2), value, np.float32), np.array([[1, 0], [0, 0]]))
    assert row["predicted_fraction"] == (1.0 if value == 255 else 0.0)


@pytest.mark.parametrize("value", [255.5, 256.0, -0.5])
def test_values_past_the_0_255_scale_are_rejected(value):
    prob = np.full((2, 2), 100, np.float32)
    prob[1, 1] = value
    with pytest.raises(ValueError, match=r"^PixelMetrics.update\(x\): predictions must lie in \[0, 255\]"):
        PixelMetrics().update(prob, np.array([[1, 0], [0, 0]]), name="x")


@pytest.mark.parametrize("prob", [np.zeros(5, np.float32), np.zeros((0, 4), np.float32)])
def test_maps_that_are_not_2d_or_empty_are_named(prob):
    message = f"PixelMetrics.update(img_1): expected a non-empty 2-D map, got shape {prob.shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PixelMetrics().update(prob, prob.astype(bool), name="img_1")


# ---------------------------------------------------------------------------------------------- the dataset scores

def integer_dataset():
    """Three small integer-valued maps (pooled AUC is exact on them); the third has no forged pixel."""
    rng = np.random.default_rng(12)
    cases = []
    for height, width, rate in ((4, 6, 0.4), (5, 3, 0.5), (3, 3, 0.0)):
        gt = rng.random((height, width)) < rate
        prob = np.clip(np.round(rng.normal(110 + 60 * gt, 50)), 0, 255).astype(np.float32)
        cases.append((prob, gt))
    assert cases[0][1].any() and not cases[0][1].all() and not cases[2][1].any()
    return cases


def test_dataset_scores_against_sklearn():
    cases = integer_dataset()
    metrics = PixelMetrics()
    rows = [metrics.update(prob, gt) for prob, gt in cases]
    result = metrics.compute()
    assert set(result) == DATASET_KEYS
    assert result["n_images"] == 3
    f1_fixed = [sk_f1(gt, prob > 127) for prob, gt in cases]
    assert result["f1_fixed"] == pytest.approx(np.mean(f1_fixed), abs=1e-12)
    for key in ("iou", "f1_best", "f1_permuted"):
        assert result[key] == pytest.approx(np.mean([row[key] for row in rows]), abs=1e-12), key
    all_prob = np.concatenate([prob.ravel() for prob, _ in cases])
    all_gt = np.concatenate([gt.ravel() for _, gt in cases])
    assert result["f1_pooled"] == pytest.approx(f1_score(all_gt, all_prob > 127), abs=1e-12)
    aucs = [roc_auc_score(gt.ravel(), prob.ravel()) for prob, gt in cases[:2]]
    assert result["auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert result["auc_skipped"] == 1
    assert result["auc_pooled"] == pytest.approx(roc_auc_score(all_gt, all_prob), abs=1e-12)


def test_per_image_returns_copies_of_the_rows_in_order():
    metrics = PixelMetrics()
    rows = [metrics.update(prob, gt, name=str(i)) for i, (prob, gt) in enumerate(integer_dataset())]
    listed = metrics.per_image()
    assert listed == rows and [row["name"] for row in listed] == ["0", "1", "2"]
    listed[0]["f1_fixed"] = -1.0
    assert metrics.per_image()[0]["f1_fixed"] == rows[0]["f1_fixed"] != -1.0


@pytest.mark.parametrize("prob, expected", [([[200, 100]], 1.0), ([[100, 100]], 0.5), ([[100, 200]], 0.0)])
def test_pooled_auc_of_one_forged_and_one_pristine_pixel(prob, expected):
    metrics = PixelMetrics()
    metrics.update(np.array(prob, np.float32), np.array([[1, 0]]))
    result = metrics.compute()
    assert result["auc_pooled"] == expected and result["auc_mean"] == expected


def test_single_class_sets_give_nan_quietly():
    metrics = PixelMetrics()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN by rule, not by a 0/0 or the mean of nothing
        for _ in range(2):
            metrics.update(np.full((2, 2), 200, np.float32), np.ones((2, 2), bool))
        result = metrics.compute()
    assert math.isnan(result["auc_pooled"]) and math.isnan(result["auc_mean"])
    assert result["auc_skipped"] == 2 and result["f1_fixed"] == 1.0


def test_compute_without_images_is_named():
    with pytest.raises(ValueError, match=r"^PixelMetrics.compute: no image was added$"):
        PixelMetrics().compute()


# ------------------------------------------------------------------------------------------------- image level

def test_image_scores_with_a_single_tampered_image():
    # Scores: tampered 200; authentic 100, 150, 50. AUC 1; > 127 predicts 200 and 150: tp 1, fp 1, fn 0.
    scores, labels = [200, 100, 150, 50], [1, 0, 0, 0]
    metrics = ImageMetrics()
    for score, label in zip(scores, labels):
        metrics.update(score, label)
    result = metrics.compute()
    assert result["img_auc"] == 1.0
    assert result["img_f1"] == pytest.approx(2 / 3, abs=1e-15)
    assert result["img_bacc"] == pytest.approx(5 / 6, abs=1e-15)
    predicted = np.array(scores) > 127
    assert result["img_f1"] == pytest.approx(f1_score(labels, predicted), abs=1e-15)
    assert result["img_bacc"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-15)


def test_image_scores_at_and_past_the_top_of_the_scale():
    metrics = ImageMetrics()
    metrics.update(255, 1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\].*got 255.5"):
        metrics.update(255.5, 1)

"""utils.evaluation.metrics against scikit-learn (the independent reference) and the official MPC test.py computation."""
import math
import warnings

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import (balanced_accuracy_score, f1_score, precision_recall_curve, roc_auc_score)

from utils.evaluation.metrics import (FIXED_THRESHOLD_255, ImageMetrics, PixelMetrics, binarize, upsample_probability)

BIN_WIDTH_255 = 255.0 / 65535  # the documented pooled-AUC bin width


def official_iou(pred, gt):
    """metric_iou as written in the official test.py."""
    intersection = np.logical_and(pred, gt)
    union = np.logical_or(pred, gt)
    iou = np.sum(intersection) / (np.sum(union) + 1e-6)
    if np.sum(intersection) + np.sum(union) == 0:
        iou = 1
    return iou


def sk_f1(gt, pred):
    with warnings.catch_warnings():  # sklearn warns, then scores 0, when there are no true and no predicted positives
        warnings.simplefilter("ignore")
        return f1_score(gt.ravel(), pred.ravel())


def sk_best_f1(gt, prob):
    if not gt.any():  # precision_recall_curve needs a positive; no threshold can give a true positive
        return max(sk_f1(gt, prob >= t) for t in np.unique(prob))
    precision, recall, _ = precision_recall_curve(gt.ravel(), prob.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return f1.max()


def reference_row(prob, gt):
    pred = prob > 127
    return {
        "f1_fixed": sk_f1(gt, pred),
        "iou": official_iou(pred, gt),
        "f1_best": sk_best_f1(gt, prob),
        "f1_permuted": max(sk_f1(gt, pred), sk_f1(gt, ~pred)),
        "auc": roc_auc_score(gt.ravel(), prob.ravel()) if 0 < gt.sum() < gt.size else math.nan,
    }


def random_case(rng, height, width, quantised=False):
    """A probability map on the 0-255 scale that loosely follows a random ground truth."""
    gt = rng.random((height, width)) < rng.uniform(0.05, 0.6)
    prob = np.clip(rng.normal(110 + 60 * gt, 50), 0, 255).astype(np.float32)
    if quantised:
        prob = np.round(prob / 32) * 32  # few distinct values: many ties inside and across classes
        prob = np.minimum(prob, 255).astype(np.float32)
    return prob, gt


def edge_cases():
    rng = np.random.default_rng(7)
    cont, _ = random_case(rng, 20, 30)
    return {
        "empty_gt": (cont, np.zeros((20, 30), bool)),
        "empty_gt_empty_pred": (np.full((20, 30), 10, np.float32), np.zeros((20, 30), bool)),
        "all_forged": (cont, np.ones((20, 30), bool)),
        "all_forged_empty_pred": (np.zeros((20, 30), np.float32), np.ones((20, 30), bool)),
        "constant_high": (np.full((20, 30), 200, np.float32), rng.random((20, 30)) < 0.3),
        "constant_low": (np.zeros((20, 30), np.float32), rng.random((20, 30)) < 0.3),
        "exactly_threshold": (np.full((20, 30), 127, np.float32), rng.random((20, 30)) < 0.3),
        "quantised_ties": random_case(rng, 25, 17, quantised=True),
        "single_pixel_forged": (np.array([[200.0]], np.float32), np.array([[True]])),
        "single_pixel_pristine": (np.array([[200.0]], np.float32), np.array([[False]])),
        "single_pixel_missed": (np.array([[3.0]], np.float32), np.array([[1]], np.uint8)),
    }


def assert_rows_match(row, expected, tol=1e-9):
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(row[key]), key
        else:
            assert row[key] == pytest.approx(value, abs=tol), key


def test_upsample_equals_direct_cv2_resize():
    rng = np.random.default_rng(0)
    prob = rng.random((128, 128)).astype(np.float32)
    expected = cv2.resize(prob * 255, (457, 300), interpolation=cv2.INTER_LINEAR)
    out = upsample_probability(torch.from_numpy(prob), (300, 457))
    assert out.dtype == np.float32 and out.shape == (300, 457)
    np.testing.assert_array_equal(out, expected)


def test_upsample_and_binarize_hand_checked():
    # OpenCV bilinear maps output x to input (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped at the borders).
    out = upsample_probability(np.array([[0.0, 1.0]], np.float32), (1, 4))
    np.testing.assert_allclose(out, [[0.0, 63.75, 191.25, 255.0]], atol=1e-4)
    np.testing.assert_array_equal(binarize(out), [[False, False, True, True]])
    # The official cut is > int(0.5 * 255) = 127 on the 0-255 values: 0.499 is forged, 0.4975 and 127/255 are not.
    near = upsample_probability(np.array([[0.499, 0.4975, 127 / 255]], np.float32), (1, 3))
    np.testing.assert_array_equal(binarize(near), [[True, False, False]])


def test_upsample_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        upsample_probability(np.zeros((1, 8, 8)), (16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        upsample_probability(np.full((8, 8), 2.0), (16, 16))


def test_f1_fixed_and_iou_equal_official_on_random_sizes():
    rng = np.random.default_rng(1)
    metrics = PixelMetrics()
    for _ in range(25):
        prob, gt = random_case(rng, int(rng.integers(1, 70)), int(rng.integers(1, 70)))
        row = metrics.update(prob, gt)
        pred = prob > 127
        assert row["f1_fixed"] == pytest.approx(sk_f1(gt, pred), abs=1e-9)
        assert row["iou"] == pytest.approx(official_iou(pred, gt), abs=1e-9)


def test_official_pipeline_from_model_output():
    """The 128x128 sigmoid map -> x255 -> cv2.resize to the GT size -> > 127, scored as the official test.py does."""
    rng = np.random.default_rng(2)
    prob_128 = cv2.resize(rng.random((8, 8)).astype(np.float32), (128, 128))
    gt = cv2.resize(rng.random((6, 6)).astype(np.float32), (333, 250)) > 0.6
    official_map = cv2.resize((prob_128 * 255)[..., None], (333, 250))
    official_map[official_map <= 127] = 0
    official_map[official_map > 127] = 255
    gt_255 = gt[..., None] * 255.0
    official_f1 = f1_score(gt_255.flatten() / 255.0, official_map[..., None].flatten() / 255.0)
    official = official_iou(official_map[..., None] / 255.0, gt_255 / 255.0)

    row = PixelMetrics().update(upsample_probability(prob_128, gt.shape), gt)
    assert row["f1_fixed"] == pytest.approx(official_f1, abs=1e-12)
    assert row["iou"] == pytest.approx(official, abs=1e-12)


@pytest.mark.parametrize("case", list(edge_cases()))
def test_every_variant_on_edge_cases(case):
    prob, gt = edge_cases()[case]
    row = PixelMetrics().update(prob, gt, name=case)
    assert row["name"] == case
    assert_rows_match(row, reference_row(prob, gt.astype(bool)))


def test_every_variant_and_dataset_scores_against_sklearn():
    rng = np.random.default_rng(3)
    cases = [random_case(rng, int(rng.integers(1, 60)), int(rng.integers(1, 60)), quantised=i % 3 == 0)
             for i in range(30)]
    cases += list(edge_cases().values())
    metrics = PixelMetrics()
    expected_rows = []
    for prob, gt in cases:
        gt = gt.astype(bool)
        row = metrics.update(prob, gt)
        expected = reference_row(prob, gt)
        assert_rows_match(row, expected)
        assert row["forged_fraction"] == pytest.approx(gt.mean())
        expected_rows.append(expected)

    result = metrics.compute()
    all_gt = np.concatenate([gt.ravel() for _, gt in cases]).astype(bool)
    all_prob = np.concatenate([prob.ravel() for prob, _ in cases])
    aucs = [r["auc"] for r in expected_rows if not math.isnan(r["auc"])]
    assert result["n_images"] == len(cases)
    for key in ("f1_fixed", "iou", "f1_best", "f1_permuted"):
        assert result[key] == pytest.approx(np.mean([r[key] for r in expected_rows]), abs=1e-9), key
    assert result["f1_pooled"] == pytest.approx(f1_score(all_gt, all_prob > 127), abs=1e-9)
    assert result["auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-9)
    assert result["auc_skipped"] == len(cases) - len(aucs)
    bound = pooled_auc_bound(all_prob, all_gt)
    assert result["auc_pooled"] == pytest.approx(roc_auc_score(all_gt, all_prob), abs=bound)
    assert [row["f1_fixed"] for row in metrics.per_image()] == pytest.approx([r["f1_fixed"] for r in expected_rows])


def pooled_auc_bound(prob, gt):
    """Largest error of a binned AUC: half of the (forged, pristine) pairs that share a bin."""
    bins = np.arange(65537) * BIN_WIDTH_255 - BIN_WIDTH_255 / 2
    positives = np.histogram(prob[gt], bins)[0].astype(float)
    negatives = np.histogram(prob[~gt], bins)[0].astype(float)
    return 0.5 * np.dot(positives, negatives) / (gt.sum() * (~gt).sum()) + 1e-12


def test_pooled_auc_is_exact_for_integer_maps_and_close_for_continuous_maps():
    rng = np.random.default_rng(4)
    for quantised, tolerance in ((True, 1e-12), (False, None)):
        metrics = PixelMetrics()
        probs, gts = [], []
        for _ in range(6):
            prob, gt = random_case(rng, 80, 90)
            if quantised:
                prob = np.round(prob)
            metrics.update(prob, gt)
            probs.append(prob.ravel())
            gts.append(gt.ravel())
        prob, gt = np.concatenate(probs), np.concatenate(gts)
        bound = tolerance if quantised else pooled_auc_bound(prob, gt)
        assert bound < 1e-4
        assert metrics.compute()["auc_pooled"] == pytest.approx(roc_auc_score(gt, prob), abs=bound)


def test_pixel_metrics_reject_bad_input_naming_the_image():
    metrics = PixelMetrics()
    with pytest.raises(ValueError, match="img_7.*shape"):
        metrics.update(np.zeros((4, 5), np.float32), np.zeros((5, 4), bool), name="img_7")
    with pytest.raises(ValueError, match=r"img_8.*\[0, 255\]"):
        metrics.update(np.full((4, 4), np.nan, np.float32), np.zeros((4, 4), bool), name="img_8")
    with pytest.raises(ValueError, match="img_9.*0/1"):
        metrics.update(np.zeros((4, 4), np.float32), np.full((4, 4), 255, np.uint8), name="img_9")
    with pytest.raises(ValueError, match="no image"):
        metrics.compute()


@pytest.mark.parametrize("quantised", [False, True])
def test_image_metrics_against_sklearn(quantised):
    rng = np.random.default_rng(5)
    labels = rng.random(200) < 0.4
    scores = np.clip(rng.normal(100 + 60 * labels, 60), 0, 255)
    if quantised:
        scores = np.round(scores / 64) * 64
        scores = np.minimum(scores, 255)
    metrics = ImageMetrics()
    for score, label in zip(scores, labels):
        metrics.update(score, int(label))
    result = metrics.compute()
    predicted = scores > FIXED_THRESHOLD_255
    assert result["n_tampered"] == labels.sum() and result["n_authentic"] == (~labels).sum()
    assert result["img_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["img_f1"] == pytest.approx(f1_score(labels, predicted), abs=1e-12)
    assert result["img_bacc"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-12)


def test_image_metrics_single_class_is_nan_and_bad_input_is_rejected():
    metrics = ImageMetrics()
    for score in (10, 200, 255):
        metrics.update(score, 1)
    result = metrics.compute()
    assert result["n_authentic"] == 0
    assert all(math.isnan(result[key]) for key in ("img_auc", "img_f1", "img_bacc"))
    with pytest.raises(ValueError, match="0-255"):
        metrics.update(0.5 * 255 + 300, 1)
    with pytest.raises(ValueError, match="label"):
        metrics.update(10, 2)

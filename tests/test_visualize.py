"""utils.evaluation.visualize: shapes, dtypes and content of the pictures; the robustness PNG is written and readable."""
import cv2
import numpy as np
import pytest
import torch

from utils.evaluation.visualize import GRID_GAP, heatmap_overlay, plot_robustness, prediction_grid


def test_heatmap_overlay_blends_a_resized_colour_map():
    image = np.full((40, 60, 3), 100, np.uint8)
    prob = np.zeros((10, 15), np.float32)
    prob[:, 8:] = 1.0
    out = heatmap_overlay(image, torch.from_numpy(prob), alpha=0.5)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    # JET maps 0 to dark blue and 1 to dark red (RGB order): the left is bluish, the right reddish.
    assert out[20, 2, 2] > out[20, 2, 0] and out[20, 57, 0] > out[20, 57, 2]
    np.testing.assert_array_equal(heatmap_overlay(image, prob, alpha=0.0), image)
    with pytest.raises(ValueError, match="H x W x 3"):
        heatmap_overlay(np.zeros((40, 60), np.uint8), prob)


def test_prediction_grid_layout_and_content():
    images = [np.full((50, 70, 3), 30, np.uint8), torch.full((3, 64, 64), 0.5)]  # uint8 HWC and float CHW inputs
    gts = [np.ones((50, 70), bool), torch.zeros(1, 128, 128)]
    probs = [np.full((20, 20), 1.0, np.float32), torch.zeros(64, 64)]
    panel = prediction_grid(images, gts, probs, tile_size=32)
    step = 32 + GRID_GAP
    assert panel.shape == (3 * step - GRID_GAP, 2 * step - GRID_GAP, 3) and panel.dtype == np.uint8
    assert (panel[:32, :32] == 30).all() and (panel[:32, step:step + 32] == 128).all()  # image row
    assert (panel[step:step + 32, :32] == 255).all() and (panel[step:step + 32, step:step + 32] == 0).all()  # GT row
    assert (panel[2 * step:, :32] == 255).all() and (panel[2 * step:, step:] == 0).all()  # prediction row
    assert (panel[:, 32:step] == 255).all()  # white gap between columns
    with pytest.raises(ValueError, match="same non-zero number"):
        prediction_grid(images, gts[:1], probs)


def test_plot_robustness_writes_a_readable_png(tmp_path):
    rows = [{"distortion": "jpeg", "level": q, "f1_fixed": 0.5 + q / 400, "iou": 0.4 + q / 500}
            for q in (100, 90, 80, 70, 60, 50)]
    rows += [{"distortion": "blur", "level": k, "f1_fixed": 0.6 - k / 100, "iou": 0.5 - k / 100} for k in (3, 7, 11)]
    rows += [{"distortion": "osn_chain", "level": "resize0.5+jpeg75", "f1_fixed": 0.3, "iou": 0.2}]
    out = plot_robustness(rows, tmp_path / "plots" / "robustness.png")
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 300
    assert sorted(p.name for p in out.parent.iterdir()) == ["robustness.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="row 0"):
        plot_robustness([{"level": 1, "iou": 0.1}], tmp_path / "bad.png")

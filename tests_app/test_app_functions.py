"""The viewer's functions without a browser, against independent references: stage2/infer.py's files, numpy
thresholds, scikit-learn's F1 and Jaccard, a distortion applied by hand."""
import csv
import importlib.util
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score

from conftest import DEMO_WEIGHTS, REPO
from datasets.io import read_image
from datasets.perturb import jpeg
from stage2 import app
from stage2.infer import build_parser as infer_parser
from stage2.infer import main as infer_main
from utils.errors import UserError
from utils.evaluation.prediction import ProbabilityMap, Tiling
from utils.files import write_png

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache():
    return app.ModelCache(CPU)


@pytest.fixture(scope="module")
def demo(cache):
    return cache.get(str(DEMO_WEIGHTS))


def analyse(cache, image_path, distortion=None, settings=None):
    """The page's analysis with stage2/infer.py's default settings (or `settings`)."""
    settings = app.default_settings() if settings is None else settings
    trained, predict = cache.predictor(str(DEMO_WEIGHTS), settings.fast)
    return app.analyse(trained, predict, str(image_path), CPU, settings, distortion)


def infer_reference(image_path, out, flags=()):
    """stage2/infer.py's outputs for one image: (heat map, mask, probability, score)."""
    infer_main(["--input", str(image_path), "--weights", str(DEMO_WEIGHTS), "--out", str(out), "--save-prob",
                "--num-workers", "0", "--no-progress", *flags])
    stem = image_path.stem
    with (out / "scores.csv").open() as f:
        score = float(next(csv.DictReader(f))["score"])
    return (read_image(out / f"{stem}_heatmap.png"), read_image(out / f"{stem}_mask.png")[:, :, 0],
            np.load(out / f"{stem}_prob.npy"), score)


def test_the_default_settings_are_infers():
    args = infer_parser().parse_args(["--input", "a.png", "--weights", "w.pth", "--out", "out"])
    assert app.default_settings() == app.settings_from(args) == app.Settings(fast=True, tiling=None)
    assert app.build_parser().parse_args([]).resolution == args.resolution
    assert app.DEFAULT_ALPHA == args.alpha


@pytest.mark.parametrize("flags, settings", [
    ((), app.Settings(fast=True)),
    (("--plain",), app.Settings(fast=False)),
    (("--resolution", "native", "--tile", "64", "--tile-overlap", "32"), app.Settings(True, Tiling(64, 32))),
], ids=["default", "plain", "native-tiled"])
def test_heatmap_mask_probability_and_score_are_infers(spliced, cache, tmp_path, flags, settings):
    image_path = spliced[0]
    heat_ref, mask_ref, prob_ref, score_ref = infer_reference(image_path, tmp_path / "infer", flags)
    analysis = analyse(cache, image_path, settings=settings)
    np.testing.assert_array_equal(app.heatmap(analysis), heat_ref)
    np.testing.assert_array_equal(analysis.prediction.probability(), prob_ref)
    np.testing.assert_array_equal(app.mask_at(analysis.prediction, 0.5), mask_ref > 127)
    assert analysis.prediction.score == pytest.approx(score_ref, abs=1e-6)
    files = app.write_downloads(tmp_path / "dl", "splice", analysis, 0.5, app.DEFAULT_ALPHA)
    for what in ("mask", "heatmap"):
        assert files[what].read_bytes() == (tmp_path / "infer" / f"splice_{what}.png").read_bytes()
    np.testing.assert_array_equal(np.load(files["prob"]), prob_ref)


def test_only_the_most_recently_used_download_folders_stay(tmp_path):
    """Ten analyses, each folder used at its own time (analysis 3 used again last): after using analysis 9, the
    three most recently used stay (9, 3, 8) and every other folder is gone, its files with it."""
    import os

    root = tmp_path / "downloads"
    folders = [root / f"analysis{i}" for i in range(10)]
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True)
        (folder / "x_prob.npy").write_bytes(b"0" * 100)
        os.utime(folder, ns=(i * 10**9, i * 10**9))
    os.utime(folders[3], ns=(20 * 10**9, 20 * 10**9))
    app.keep_recent_downloads(root, folders[9], keep=3)
    assert sorted(p.name for p in root.iterdir()) == ["analysis3", "analysis8", "analysis9"]
    assert (folders[3] / "x_prob.npy").is_file()


def test_threshold_is_the_official_rule_and_0_5_is_the_protocol_mask():
    assert [app.threshold_255(t) for t in (0.0, 0.3, 0.5, 0.6, 1.0)] == [0, 76, 127, 153, 255]
    values = np.array([[0.0, 76.0, 76.5, 77.0], [127.0, 127.2, 127.5, 128.0], [152.9, 153.0, 153.1, 255.0]],
                      dtype=np.float32)
    prediction = ProbabilityMap(values)
    np.testing.assert_array_equal(app.mask_at(prediction, 0.5), prediction.mask())
    np.testing.assert_array_equal(app.mask_at(prediction, 0.5), values > 127)
    np.testing.assert_array_equal(app.mask_at(prediction, 0.3), values > 76)
    np.testing.assert_array_equal(app.mask_at(prediction, 0.6), values > 153)
    assert not app.mask_at(prediction, 1.0).any() and app.mask_at(prediction, 0.0).sum() == values.size - 1
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match="threshold"):
            app.threshold_255(bad)


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.8])
def test_scores_against_the_ground_truth_match_sklearn(spliced, cache, threshold):
    _, mask_path, gt = spliced
    prediction = analyse(cache, spliced[0]).prediction
    predicted = prediction.probability().astype(np.float64) * 255 > math.floor(threshold * 255 + 1e-9)
    scores = app.scores_against(prediction, app.read_ground_truth(str(mask_path), prediction.shape), threshold)
    assert scores["f1"] == pytest.approx(f1_score(gt.ravel(), predicted.ravel()), abs=1e-12)
    assert scores["iou"] == pytest.approx(jaccard_score(gt.ravel(), predicted.ravel()), abs=1e-6)
    protocol = prediction.values_255 > 127
    assert scores["f1_fixed"] == pytest.approx(f1_score(gt.ravel(), protocol.ravel()), abs=1e-12)
    assert 0.9 < scores["f1_fixed"] <= scores["f1_best"] <= 1 and 0.9 < scores["auc"] <= 1
    text = app.metrics_text(prediction, gt, threshold)
    assert f"{scores['f1']:.4f}" in text and f"{scores['iou']:.4f}" in text
    assert "ground-truth" in app.metrics_text(prediction, None, threshold)


def test_a_ground_truth_of_another_size_is_refused(spliced, tmp_path):
    small = tmp_path / "small.png"
    write_png(small, np.zeros((10, 12), np.uint8))
    with pytest.raises(UserError, match="10×12 but the image is 120×160"):
        app.read_ground_truth(str(small), (120, 160))


def test_what_if_equals_the_distortion_applied_by_hand(spliced, cache, tmp_path):
    by_hand = tmp_path / "jpeg50.png"
    write_png(by_hand, jpeg(read_image(spliced[0]), 50))
    distorted = analyse(cache, spliced[0], app.distortion_from("jpeg", 50.0))
    reference = analyse(cache, by_hand)
    assert distorted.distortion == "jpeg:50"
    np.testing.assert_array_equal(distorted.prediction.values_255, reference.prediction.values_255)
    np.testing.assert_array_equal(app.heatmap(distorted), app.heatmap(reference))
    resized = analyse(cache, spliced[0], app.distortion_from("resize", 0.5))
    assert resized.original.shape == (60, 80, 3) and resized.prediction.shape == (120, 160)  # the GT's size
    assert app.distortion_from("osn", None).name == "osn" and app.distortion_from("none", 3) is None
    for kind, level in (("blur", 4), ("jpeg", 101), ("noise", None)):
        with pytest.raises(UserError):
            app.distortion_from(kind, level)


def test_weights_by_registry_name_path_and_errors(cache, demo, tmp_path):
    assert app.resolve_weights("mpc_demo_hrt_nano") == DEMO_WEIGHTS
    assert "mpc_demo_hrt_nano" in app.registry_choices() and "hrformer_b_imagenet" not in app.registry_choices()
    with pytest.raises(UserError, match="not in .*weights"):
        app.resolve_weights("mpc_catnet_stage2")  # registered, not shipped
    with pytest.raises(UserError, match="no weights"):
        app.resolve_weights("  ")
    assert cache.get(str(DEMO_WEIGHTS)) is demo  # loaded once
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        cache.get(str(garbage))
    with pytest.raises(UserError, match="missing.pth"):
        cache.get(str(tmp_path / "missing.pth"))


def test_install_app_leaves_out_only_a_core_bound_the_installed_version_breaks():
    spec = importlib.util.spec_from_file_location("install_app", REPO / "stage2" / "install_app.py")
    install_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install_app)
    release = {"name": "gradio", "version": "6.0.0",
               "requires_dist": ["pillow<13.0,>=8.0", "numpy<3.0,>=1.0", "fastapi<1.0",
                                 "authlib; extra == 'oauth'", "audioop-lts; python_version >= '3.99'"]}
    keep, notes = install_app.split_dependencies(release, {"pillow": "13.0.0", "numpy": "2.4.6"})
    assert keep == ["numpy<3.0,>=1.0", "fastapi<1.0"]
    assert notes == ["gradio 6.0.0 asks for pillow<13.0,>=8.0; keeping pillow 13.0.0"]
    keep, notes = install_app.split_dependencies(release, {"pillow": "12.1.0"})
    assert notes == [] and keep[0] == "pillow<13.0,>=8.0"


def test_the_page_builds(tmp_path, spliced):
    page = app.build_app(str(DEMO_WEIGHTS), str(spliced[0].parent), CPU)
    assert page.title == "MPC forgery localization viewer"
    assert app.folder_images(str(spliced[0].parent)) == [str(spliced[0]), str(spliced[1])]

"""stage2/test.py end to end on a tiny generated list: every metric variant written, the per-image F1/IoU equal to
the official scoring (scikit-learn `f1_score`, the official IoU formula) on the saved probability maps, masks and maps
at the original size, robustness outputs, bad input."""
import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score
from tiny_weights import INPUT_SIZE, reference_probability, save_tiny_weights

from stage2 import test as test_script
from datasets import perturb
from datasets.io import ImageReadError

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = ("f1_fixed", "iou", "f1_best", "f1_permuted", "f1_pooled", "auc_mean", "auc_pooled", "img_auc", "img_f1",
           "img_bacc")


def official_iou(pred, gt):
    """The official `metric_iou`, written from its definition."""
    intersection = np.logical_and(pred, gt).sum()
    union = np.logical_or(pred, gt).sum()
    return 1.0 if intersection + union == 0 else intersection / (union + 1e-6)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    made = save_tiny_weights(tmp_path_factory.mktemp("weights"), "best.pth", 2, "MPC_CASIAv2_stage2_weights.pth", 3)
    return {"ours": (*made["ours"], "catnet"), "official": (*made["official"], "casiav2")}


@pytest.fixture(scope="module")
def tiny_list(tmp_path_factory):
    """4 tampered images (one stem twice in two folders, one multi-dot name) and 2 authentic ones, as an .npy list."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for index, (relative, height, width, forged) in enumerate([
            ("a/img.png", 60, 80, True), ("b/img.png", 72, 50, True), ("a/x.y.v2.png", 45, 45, True),
            ("a/wide.jpg", 40, 96, True), ("a/real.png", 50, 64, False), ("b/real2.png", 64, 40, False)]):
        image_path = root / relative
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image_path)
        mask_path = ""
        if forged:
            mask = np.zeros((height, width), dtype=np.uint8)
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            mask[top:top + height // 3, left:left + width // 3] = 255
            mask_path = root / "gt" / f"{index}.png"
            mask_path.parent.mkdir(exist_ok=True)
            Image.fromarray(mask).save(mask_path)
        rows.append((str(image_path), str(mask_path)))
    list_path = root / "tiny_6.npy"
    np.save(list_path, np.array(rows))
    return list_path, rows


def run(weights_path, list_path, out, *flags):
    return test_script.main(["--weights", str(weights_path), "--flist", str(list_path), "--out", str(out),
                             "--device", "cpu", "--num-workers", "0", "--input-size", str(INPUT_SIZE),
                             "--no-progress", *flags])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# A batch of 4 takes other convolution kernels than one image (oneDNN picks by shape): rounding apart, which the tiny
# model's scaled-up logits magnify to about 1e-5 in probability.
@pytest.mark.parametrize("batch,atol", [([], 2e-6), (["--batch-size", "4"], 5e-5)], ids=["one-at-a-time", "batch4"])
@pytest.mark.parametrize("kind", ["ours", "official"])
def test_metrics_equal_the_official_scoring_on_the_saved_maps(weights, tiny_list, tmp_path, kind, batch, atol):
    weights_path, model, head = weights[kind]
    list_path, rows = tiny_list
    out = tmp_path / "out"
    backbone = ["--backbone", "hrt_nano"] if kind == "official" else []
    run(weights_path, list_path, out, "--save-masks", "--save-prob", *backbone, *batch)

    report = json.loads((out / "metrics.json").read_text())
    result = report["datasets"]["tiny_6"]
    assert set(METRICS) <= set(result)
    assert (result["n_tampered"], result["n_authentic"], result["skipped"]) == (4, 2, [])
    table = (out / "table.txt").read_text().splitlines()
    assert "tiny_6" in table[-1] and f"{result['f1_fixed']:.4f}" in table[-1]
    per_image = read_csv(out / "tiny_6" / "per_image.csv")
    assert [row["path"] for row in per_image] == [image for image, _ in rows]
    names = [row["name"] for row in per_image]
    assert names == ["img", "img_2", "x.y.v2", "wide", "real", "real2"]

    f1s, ious, labels, scores = [], [], [], []
    for row, (image_path, mask_path) in zip(per_image, rows):
        width, height = Image.open(image_path).size
        prob = np.load(out / "tiny_6" / "prob" / f"{row['name']}.npy")
        assert prob.dtype == np.float32 and prob.shape == (height, width)
        np.testing.assert_allclose(prob, reference_probability(model, image_path), atol=atol)
        pred = prob.astype(np.float64) * 255 > 127
        saved = np.asarray(Image.open(out / "tiny_6" / "masks" / f"{row['name']}.png"))
        assert saved.shape == (height, width) and set(np.unique(saved)) <= {0, 255}
        np.testing.assert_array_equal(saved == 255, pred)
        assert float(row["score"]) == pytest.approx(float(prob.max()), abs=1e-7)
        labels.append(int(bool(mask_path)))
        scores.append(float(prob.max()))
        if not mask_path:
            assert row["tampered"] == "False" and row["f1_fixed"] == ""
            continue
        gt = np.asarray(Image.open(mask_path)) > 127
        f1 = f1_score(gt.ravel(), pred.ravel())
        iou = official_iou(pred, gt)
        assert float(row["f1_fixed"]) == pytest.approx(f1, abs=1e-9)
        assert float(row["iou"]) == pytest.approx(iou, abs=1e-9)
        assert float(row["auc"]) == pytest.approx(roc_auc_score(gt.ravel(), prob.ravel()), abs=1e-6)
        f1s.append(f1)
        ious.append(iou)
    assert result["f1_fixed"] == pytest.approx(np.mean(f1s), abs=1e-9)
    assert result["iou"] == pytest.approx(np.mean(ious), abs=1e-9)
    assert result["img_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)

    settings = yaml.safe_load((out / "settings.yaml").read_text())
    assert settings["weights_sha256_prefix"] == hashlib.sha256(weights_path.read_bytes()).hexdigest()[:16]
    assert settings["head"] == head and settings["backbone"] == "hrt_nano"
    assert settings["lists"] == {"tiny_6": str(list_path)}
    assert settings["batch_size"] == (int(batch[1]) if batch else 1)


def test_batches_form_around_read_errors_and_keep_the_order():
    """predicted_items: squash-resized images go through `predict` stacked, at most batch_size at a time, a read
    error ends the batch before it and passes through as (item, None); every map equals one image at a time's."""
    from utils.evaluation.loop import predicted_items
    from utils.evaluation.prediction import predict_map

    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(3, generator=generator)
    calls = []

    def predict(images):  # per pixel, a mix of the channels at 1/4 resolution, like the head
        calls.append(images.shape[0])
        return torch.sigmoid((images[:, :, ::4, ::4] * weights[None, :, None, None]).sum(1) * 4 - 3)

    sizes = [(30, 50), (16, 16), (64, 40), (20, 20), (33, 17), (50, 31)]
    items = [{"image": torch.rand(3, 32, 32, generator=generator), "size": size} for size in sizes]
    items.insert(4, {"bad_file": "broken.png", "error": "truncated"})
    done = list(predicted_items(predict, items, lambda item: item["size"], torch.device("cpu"), batch_size=3))
    assert [item for item, _ in done] == items
    assert calls == [3, 1, 2]
    for item, prediction in done:
        if "bad_file" in item:
            assert prediction is None
            continue
        alone = predict_map(predict, item["image"], item["size"], torch.device("cpu"))
        assert prediction.shape == item["size"]
        np.testing.assert_array_equal(prediction.values_255, alone.values_255)


@pytest.mark.parametrize("flags,message", [(["--batch-size", "0"], "at least 1"),
                                           (["--batch-size", "2", "--resolution", "native"], "runs alone")])
def test_bad_batch_sizes_are_refused_before_anything_is_written(weights, tiny_list, tmp_path, flags, message):
    weights_path, _, _ = weights["ours"]
    list_path, _ = tiny_list
    with pytest.raises(SystemExit, match=message):
        run(weights_path, list_path, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_perturbations_write_the_robustness_table_and_plot(weights, tiny_list, tmp_path):
    weights_path, _, _ = weights["ours"]
    list_path, rows = tiny_list
    out = tmp_path / "out"
    report = run(weights_path, list_path, out, "--perturb", "jpeg:70,noise:3")

    table = read_csv(out / "robustness.csv")
    assert [(row["dataset"], row["distortion"], row["level"]) for row in table] == \
        [("tiny_6", "clean", ""), ("tiny_6", "jpeg", "70"), ("tiny_6", "noise", "3")]
    assert float(table[0]["f1_fixed"]) == pytest.approx(report["datasets"]["tiny_6"]["f1_fixed"], abs=1e-12)
    # each distorted row is the protocol on the distorted images, computed independently: the distortion written
    # out losslessly, then the reference pipeline and scikit-learn's F1
    _, model, _ = weights["ours"]
    for row, distort in zip(table[1:], (lambda image: perturb.jpeg(image, 70),
                                        lambda image: perturb.gaussian_noise(image, 3.0))):
        f1s, ious = [], []
        for image_path, mask_path in rows:
            if not mask_path:
                continue
            distorted = tmp_path / "distorted.png"
            Image.fromarray(distort(np.asarray(Image.open(image_path).convert("RGB")))).save(distorted)
            pred = reference_probability(model, distorted) * 255 > 127
            gt = np.asarray(Image.open(mask_path)) > 127
            f1s.append(f1_score(gt.ravel(), pred.ravel()))
            ious.append(official_iou(pred, gt))
        assert float(row["f1_fixed"]) == pytest.approx(np.mean(f1s), abs=1e-9)
        assert float(row["iou"]) == pytest.approx(np.mean(ious), abs=1e-9)
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out / "metrics.json").read_text())["robustness"]) == 3


def test_bad_input_names_the_file_and_skip_bad_counts_it(weights, tiny_list, tmp_path):
    weights_path, _, _ = weights["ours"]
    _, rows = tiny_list
    missing = str(tmp_path / "gone.png")
    list_path = tmp_path / "broken_3.npy"
    np.save(list_path, np.array(rows[:2] + [(missing, "")]))
    with pytest.raises(ImageReadError, match="gone.png.*--skip-bad"):
        run(weights_path, list_path, tmp_path / "out1")

    report = run(weights_path, list_path, tmp_path / "out2", "--skip-bad")
    skipped = report["datasets"]["broken_3"]["skipped"]
    assert len(skipped) == 1 and skipped[0][0] == missing
    assert len(read_csv(tmp_path / "out2" / "broken_3" / "per_image.csv")) == 2

    with pytest.raises(Exception, match="no_such_list"):
        run(weights_path, tmp_path / "no_such_list.npy", tmp_path / "out3")


def test_existing_results_are_not_overwritten_without_asking(weights, tiny_list, tmp_path):
    weights_path, _, _ = weights["ours"]
    list_path, _ = tiny_list
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds"):
        run(weights_path, list_path, out)
    assert (out / "metrics.json").read_text() == "{}"
    run(weights_path, list_path, out, "--overwrite")
    assert "tiny_6" in json.loads((out / "metrics.json").read_text())["datasets"]


def test_evaluate_labels_images_by_the_list_and_scores_empty_masks_as_the_official_code(tmp_path):
    """A row with a mask path is tampered even when the mask is empty (official: F1 0, IoU 0 unless nothing is
    predicted); a row without one is authentic: image-level only. Predictor = the image's red channel."""
    from datasets.dataset import ForgeryDataset
    from utils.evaluation.loop import evaluate

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "im.png")
    gt = np.zeros((24, 32), dtype=np.uint8)
    gt[4:14, 6:20] = 255
    Image.fromarray(gt).save(tmp_path / "gt.png")
    Image.fromarray(np.zeros_like(gt)).save(tmp_path / "empty.png")
    image_path = str(tmp_path / "im.png")
    rows = [(image_path, str(tmp_path / "gt.png")), (image_path, str(tmp_path / "empty.png")), (image_path, "")]
    dataset = ForgeryDataset(rows, mode="test", input_size=32)

    def red_channel(images):
        return images[:, 0, ::4, ::4]

    result = evaluate(red_channel, dataset, torch.device("cpu"), progress=False)
    assert [row["tampered"] for row in result["per_image"]] == [True, True, False]
    assert (result["n_tampered"], result["n_authentic"], result["n_images"]) == (2, 1, 2)
    small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_LINEAR)[::4, ::4, 0] / np.float32(255)
    pred = cv2.resize(small.astype(np.float32) * 255, (32, 24), interpolation=cv2.INTER_LINEAR) > 127
    expected = [f1_score((gt > 127).ravel(), pred.ravel()), f1_score(np.zeros(gt.size), pred.ravel())]
    assert expected[1] == 0.0
    assert [row["f1_fixed"] for row in result["per_image"][:2]] == pytest.approx(expected, abs=1e-9)
    assert result["f1_fixed"] == pytest.approx(np.mean(expected), abs=1e-9)
    assert result["per_image"][1]["iou"] == pytest.approx(official_iou(pred, np.zeros_like(pred)), abs=1e-9)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_real_samples_score_as_the_official_code_reads_them(weights, tmp_path):
    """CASIA v1 JPEGs (masks stored as L, RGB and RGBA PNGs) and Columbia TIFFs (masks stored as JPEG): the saved
    maps equal the protocol run on OpenCV's reads, and F1/IoU equal sklearn on the official mask reading (first
    channel of cv2.imread, > 127)."""
    casia = SHARED_DATA / "CASIA1" / "samples_original_jpg"
    columbia = SHARED_DATA / "Columbia_samples"
    if not casia.is_dir() or not columbia.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    rows = [(str(p), str(casia / "Gt" / f"{p.stem}_gt.png")) for p in sorted((casia / "Tp").glob("*.jpg"))]
    tiffs = sorted((columbia / "4cam_splc").glob("*.tif"))[:3]
    rows += [(str(p), str(columbia / "mask" / f"{p.stem}.jpg")) for p in tiffs]
    list_path = tmp_path / "real.npy"
    np.save(list_path, np.array(rows))
    weights_path, model, _ = weights["ours"]
    out = tmp_path / "out"
    run(weights_path, list_path, out, "--save-prob")

    per_image = read_csv(out / "real" / "per_image.csv")
    assert len(per_image) == len(rows) == 7
    for row, (image_path, mask_path) in zip(per_image, rows):
        image = cv2.cvtColor(cv2.imread(image_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        resized = cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
        with torch.no_grad():
            small = torch.sigmoid(model(torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255))[0, 0]
        gt = cv2.imread(mask_path, cv2.IMREAD_COLOR)[:, :, 0] > 127
        expected = cv2.resize(small.numpy() * 255, gt.shape[::-1], interpolation=cv2.INTER_LINEAR) / 255
        prob = np.load(out / "real" / "prob" / f"{row['name']}.npy")
        np.testing.assert_allclose(prob, expected, atol=2e-6)
        pred = prob.astype(np.float64) * 255 > 127
        assert float(row["f1_fixed"]) == pytest.approx(f1_score(gt.ravel(), pred.ravel()), abs=1e-9)
        assert float(row["iou"]) == pytest.approx(official_iou(pred, gt), abs=1e-9)


def test_input_size_defaults_to_the_training_size_then_the_protocol():
    from utils.config import load_config
    from models import TrainedModel
    ours = TrainedModel(model=None, weights="w.pth", source_format="mpc-reimpl", backbone="hrt_nano", head="catnet",
                        config=load_config(None, ["DATA.INPUT_SIZE", "96"]))
    official = TrainedModel(model=None, weights="w.pth", source_format="official state_dict", backbone="hrt_base",
                            head="catnet")
    assert ours.input_size() == 96 and ours.input_size(64) == 64
    assert official.input_size() == 512 and official.input_size(256) == 256


def test_baselines_score_constant_maps_as_scikit_learn_does(weights, tiny_list, tmp_path):
    weights_path, _, _ = weights["ours"]
    list_path, rows = tiny_list
    report = run(weights_path, list_path, tmp_path / "out", "--baselines")
    result = report["datasets"]["tiny_6"]
    gts = [np.asarray(Image.open(mask).convert("L")) > 127 for _, mask in rows if mask]
    for label, constant in (("all-forged", True), ("all-authentic", False)):
        expected = np.mean([f1_score(gt.ravel(), np.full(gt.size, constant)) for gt in gts])
        assert result[label]["f1_fixed"] == pytest.approx(expected, abs=1e-12)
    assert result["all-authentic"]["iou"] == pytest.approx(0.0, abs=1e-6)
    assert "tiny_6 all-forged" in (tmp_path / "out" / "table.txt").read_text()

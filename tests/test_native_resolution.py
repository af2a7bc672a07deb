"""Inference at the image's own resolution (`--resolution native`): padding to the backbone's stride, tiles blended
across seams, bounded memory on a huge image; through the library and through test.py and infer.py.

References are independent: the padding and resize written out with PIL, NumPy and OpenCV; tile origins and seam
weights worked by hand; a model with a known local receptive field for the tiled-vs-whole comparison.
"""
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datasets.dataset import ForgeryDataset
from stage2 import infer, test as test_script
from tests.tiny_weights import save_tiny_weights, tiny_model
from utils.evaluation.prediction import Tiling, predict_map, probability_predictor

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def native_reference(model, path) -> np.ndarray:
    """The image padded with zeros (bottom, right) to multiples of 32, /255, sigmoid at 1/4, ×255 bilinear to the
    padded size, cropped to the image, back to [0, 1]."""
    image = np.asarray(Image.open(path).convert("RGB"))
    height, width = image.shape[:2]
    padded = np.zeros((math.ceil(height / 32) * 32, math.ceil(width / 32) * 32, 3), np.uint8)
    padded[:height, :width] = image
    batch = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        prob = torch.sigmoid(model(batch))[0, 0].numpy()
    resized = cv2.resize(prob * 255, (padded.shape[1], padded.shape[0]), interpolation=cv2.INTER_LINEAR)
    return resized[:height, :width] / 255


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    return save_tiny_weights(folder, "ours.pth", 5, "official.pth", 6)["ours"]  # (path, model)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Images whose sides are not multiples of 32, one square at 64 (= the tiny weights' input size), with masks."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    rows = []
    for name, (height, width) in {"wide": (70, 150), "tall": (133, 47), "square": (64, 64)}.items():
        smooth = cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (width, height))
        image = np.clip(smooth.astype(int) + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4: height // 2, width // 3: 2 * width // 3] = 255
        Image.fromarray(image).save(folder / f"{name}.png")
        Image.fromarray(mask).save(folder / f"{name}_gt.png")
        rows.append((str(folder / f"{name}.png"), str(folder / f"{name}_gt.png")))
    np.save(folder / "photos_3.npy", np.asarray(rows, dtype=str))
    return folder, rows


# ------------------------------------------------------------------------------------------------- tiles by hand

def test_tile_origins_worked_by_hand():
    tiling = Tiling(tile=128, overlap=64)
    assert tiling.starts(128) == [0] and tiling.starts(96) == [0]
    assert tiling.starts(320) == [0, 64, 128, 192]       # (320 − 128) / 64 = 3 steps
    assert tiling.starts(352) == [0, 64, 128, 192, 224]  # the last tile flush with the end
    assert Tiling(tile=0, overlap=0).starts(12000) == [0]
    for tile, overlap in ((100, 0), (128, 128), (128, 48), (-32, 0)):
        with pytest.raises(ValueError):
            Tiling(tile=tile, overlap=overlap)


def test_seam_blend_is_the_hand_worked_ramp():
    """One row of two tiles (image 32×192, tiles 128 wide overlapping by 64 = 16 output cells): the left tile says
    0.2 everywhere, the right one 0.8; over the overlap the weights are (15.5 − k)/16 and (k + 0.5)/16."""
    calls = []

    def predict(images):
        calls.append(tuple(images.shape))
        value = 0.2 if len(calls) == 1 else 0.8
        return torch.full((1, images.shape[2] // 4, images.shape[3] // 4), value)

    image = torch.zeros(3, 32, 192, dtype=torch.uint8)
    prediction = predict_map(predict, image, (32, 192), torch.device("cpu"), Tiling(tile=128, overlap=64))
    assert calls == [(1, 3, 32, 128), (1, 3, 32, 128)]
    k = np.arange(16)
    expected_cells = np.concatenate([np.full(16, 0.2), (0.2 * (15.5 - k) + 0.8 * (k + 0.5)) / 16, np.full(16, 0.8)])
    expected = cv2.resize((expected_cells * 255).astype(np.float32)[None].repeat(8, 0), (192, 32),
                          interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(prediction.values_255, expected, atol=1e-4)


def test_a_constant_prediction_stays_constant_over_every_seam():
    def predict(images):
        return torch.full((1, images.shape[2] // 4, images.shape[3] // 4), 0.3)

    image = torch.zeros(3, 500, 700, dtype=torch.uint8)
    prediction = predict_map(predict, image, (500, 700), torch.device("cpu"), Tiling(tile=256, overlap=96))
    assert prediction.shape == (500, 700)
    np.testing.assert_allclose(prediction.probability(), 0.3, atol=1e-6)


class LocalModel(torch.nn.Module):
    """A 3×3 convolution then 4×4 average pooling: each output cell sees its 4×4 block and one pixel around it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, images):
        return torch.nn.functional.avg_pool2d(self.conv(images * 4 - 2), 4)


def test_tiled_equals_whole_away_from_the_seams():
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 300, 470), dtype=np.uint8))
    predict = probability_predictor(LocalModel())
    device = torch.device("cpu")
    whole = predict_map(predict, image, (300, 470), device, Tiling(tile=0, overlap=0))
    tiling = Tiling(tile=128, overlap=64)
    tiled = predict_map(predict, image, (300, 470), device, tiling)
    # Output cells next to a tile's inner edge see the tile's zero surround: keep 8 pixels (2 cells) from each edge.
    near_seam = np.zeros((320, 480), bool)
    for starts, axis in ((tiling.starts(320), 0), (tiling.starts(480), 1)):
        for start in starts:
            for edge in (start, start + 128):
                if 0 < edge < (320, 480)[axis]:
                    band = slice(max(edge - 8, 0), edge + 8)
                    if axis == 0:
                        near_seam[band, :] = True
                    else:
                        near_seam[:, band] = True
    away = ~near_seam[:300, :470]
    assert 0.3 < away.mean() < 0.9
    np.testing.assert_allclose(tiled.values_255[away], whole.values_255[away], atol=1e-3)
    assert np.abs(tiled.values_255 - whole.values_255).max() > 1e-2  # the seams do differ: the check has teeth


# --------------------------------------------------------------------------------------- the model, the scripts

def test_a_512_image_gives_the_protocol_map_exactly(tmp_path):
    """At the protocol's own size nothing is resized or padded: the native map is the protocol's, bit for bit."""
    image = cv2.resize(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8), (512, 512))
    Image.fromarray(image).save(tmp_path / "a.png")
    rows = [(str(tmp_path / "a.png"), "")]
    predict = probability_predictor(tiny_model("catnet", 3))
    device = torch.device("cpu")
    protocol = ForgeryDataset(rows, mode="test", input_size=512)[0]
    native = ForgeryDataset(rows, mode="test", input_size=None)[0]
    assert native["image"].dtype == torch.uint8 and native["image"].shape == (3, 512, 512)
    a = predict_map(predict, protocol["image"], (512, 512), device)
    b = predict_map(predict, native["image"], (512, 512), device, Tiling())
    np.testing.assert_array_equal(a.values_255, b.values_255)


def test_native_dataset_is_for_testing_only():
    with pytest.raises(ValueError, match="test mode only"):
        ForgeryDataset([("a.png", "")], mode="train", input_size=None)


# The tiny model's logits are scaled to a spread of 4 (tests/tiny_weights.py), which scales the fast path's float
# rounding with them; the fast path's 1e-5 on the demo and HRT-B weights is tests/test_fast_paths.py's.
@pytest.mark.parametrize("path_flags,atol", [(["--plain"], 2e-6), ([], 5e-5)], ids=["plain", "fast"])
def test_infer_native_follows_the_padded_reference(weights, photos, tmp_path, path_flags, atol):
    weights_path, model = weights
    folder, rows = photos
    out = tmp_path / "out"
    inputs = [flag for image_path, _ in rows for flag in ("--input", image_path)]
    infer.main([*inputs, "--weights", str(weights_path), "--out", str(out),
                "--device", "cpu", "--num-workers", "0", "--no-progress", "--save-prob", "--resolution", "native",
                *path_flags])
    for image_path, _ in rows:
        name = Path(image_path).stem
        prob = np.load(out / f"{name}_prob.npy")
        reference = native_reference(model, image_path)
        assert prob.shape == reference.shape == np.asarray(Image.open(image_path)).shape[:2]
        np.testing.assert_allclose(prob, reference, atol=atol)
        mask = np.asarray(Image.open(out / f"{name}_mask.png")) == 255
        np.testing.assert_array_equal(mask, prob.astype(np.float64) * 255 > 127)


def test_test_script_native_scores_the_padded_reference(weights, photos, tmp_path):
    weights_path, model = weights
    folder, rows = photos
    out = tmp_path / "results"
    report = test_script.main(["--weights", str(weights_path), "--flist", str(folder / "photos_3.npy"),
                               "--out", str(out), "--device", "cpu", "--num-workers", "0", "--no-progress",
                               "--save-prob", "--resolution", "native", "--tile", "64", "--tile-overlap", "32"])
    assert report["resolution"] == "native"
    settings = (out / "settings.yaml").read_text()
    assert "resolution: native" in settings and "tile: 64" in settings
    f1s = []
    for image_path, mask_path in rows:
        name = Path(image_path).stem
        prob = np.load(out / "photos_3" / "prob" / f"{name}.npy")
        assert prob.shape == np.asarray(Image.open(image_path)).shape[:2]
        if max(prob.shape) <= 64:  # fits one tile: exactly the padded reference
            np.testing.assert_allclose(prob, native_reference(model, image_path), atol=2e-6)
        gt = np.asarray(Image.open(mask_path)) > 127
        predicted = prob.astype(np.float64) * 255 > 127
        tp = np.sum(predicted & gt)
        f1s.append(2 * tp / (predicted.sum() + gt.sum()))
    metrics = json.loads((out / "metrics.json").read_text())["datasets"]["photos_3"]
    assert metrics["f1_fixed"] == pytest.approx(np.mean(f1s), abs=1e-9)


def test_bad_tile_sizes_are_refused_in_one_line(weights, photos, tmp_path):
    weights_path, _ = weights
    folder, _ = photos
    with pytest.raises(SystemExit, match="multiple of 32"):
        infer.main(["--input", str(folder), "--weights", str(weights_path), "--out", str(tmp_path / "o"),
                    "--resolution", "native", "--tile", "100", "--no-progress"])


# ------------------------------------------------------------------------------------------------ bounded memory

HUGE_IMAGE_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    sys.path.insert(0, {repo!r})
    from utils.evaluation.prediction import Tiling, predict_map, probability_predictor
    torch.set_num_threads(1)
    seen = []
    class Cheap(torch.nn.Module):
        def forward(self, images):
            seen.append(tuple(images.shape))
            return torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True) - 0.5, 4)
    height, width = 9000, 12000
    image = torch.from_numpy(np.full((3, height, width), 100, np.uint8))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tiling = Tiling(tile={tile}, overlap=128) if {tile} else Tiling(tile=0, overlap=0)
    prediction = predict_map(probability_predictor(Cheap()), image, (height, width), torch.device("cpu"), tiling)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"growth_mb": (after - before) / 1024, "largest": max(seen), "calls": len(seen),
                      "shape": list(prediction.shape)}}))
""")


def huge_image_run(tile: int) -> dict:
    done = subprocess.run([sys.executable, "-c", HUGE_IMAGE_SCRIPT.format(repo=str(REPO), tile=tile)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_stays_bounded_on_a_12000_by_9000_image():
    """Memory measured by size (the process's peak RSS growth), never by time. The map at the image's size (432 MB
    of float32, what the caller asked for) plus one 1024² tile's float pixels and the 1/4-size blend buffers stay
    under 1.2 GB, less than the image alone would take as the model's float input (1.3 GB; the untiled run of this
    script grows by about 2.6 GB)."""
    tiled = huge_image_run(1024)
    assert tiled["shape"] == [9000, 12000]
    # rows: ceil((9024 − 1024) / 896) + 1 = 10 origins; columns: ceil((12000 − 1024) / 896) + 1 = 14
    assert tiled["largest"] == [1, 3, 1024, 1024] and tiled["calls"] == 10 * 14
    assert tiled["growth_mb"] < 1200 < 3 * 9024 * 12000 * 4 / 2**20


def test_test_script_fast_path_scores_what_the_plain_path_scores(weights, photos, tmp_path):
    """test.py --fast: the prepared model's maps equal the plain eval forward's up to float rounding (the tiny
    model's logits are scaled up, hence 5e-5), and settings.yaml says which path scored."""
    weights_path, _ = weights
    folder, rows = photos
    probs = {}
    for label, flags in (("plain", []), ("fast", ["--fast"])):
        out = tmp_path / label
        test_script.main(["--weights", str(weights_path), "--flist", str(folder / "photos_3.npy"), "--out", str(out),
                          "--device", "cpu", "--num-workers", "0", "--no-progress", "--save-prob", "--input-size",
                          "64", *flags])
        assert f"fast_path: {'true' if flags else 'false'}" in (out / "settings.yaml").read_text()
        probs[label] = {Path(p).stem: np.load(out / "photos_3" / "prob" / f"{Path(p).stem}.npy") for p, _ in rows}
    for name, plain in probs["plain"].items():
        np.testing.assert_allclose(probs["fast"][name], plain, atol=5e-5)
    # another computation did run: somewhere its rounding differs
    assert any(not np.array_equal(probs["fast"][name], plain) for name, plain in probs["plain"].items())

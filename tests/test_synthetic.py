"""Synthetic tampering: determinism, exact masks, file list, learnable traces, command line."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.io import read_image, read_mask
from datasets.synthetic import KINDS, make_sample, make_synthetic_set, random_region, tamper

REPO = Path(__file__).resolve().parents[1]


def files_and_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    lists = [make_synthetic_set(tmp_path / name, 8, 64, seed, progress=False)
             for name, seed in (("a", 5), ("b", 5), ("c", 6))]
    a, b, c = (files_and_bytes(path.parent) for path in lists)
    # The lists hold absolute paths, which differ by folder; compare them relative to it.
    for files, path in zip((a, b, c), lists):
        files.pop(path.name)
        files["list"] = [[Path(p).name for p in row] for row in np.load(path)]
    assert a == b
    assert a != c


def test_file_list_images_and_masks(tmp_path):
    path = make_synthetic_set(tmp_path, 12, 64, seed=0, authentic_fraction=0.25, name="demo", progress=False)
    assert path == tmp_path / "demo_12.npy"
    rows = np.load(path)
    assert rows.shape == (12, 2) and rows.dtype.kind == "U"
    authentic = [row for row in rows if row[1] == ""]
    assert len(authentic) == 3
    kinds = [Path(image).stem.split("_")[1] for image, _ in rows]
    assert sorted(k for k in kinds if k != "authentic") == sorted(KINDS * 3)
    for image_path, mask_path in rows:
        assert Path(image_path).is_absolute() and Path(image_path).suffix == ".png"
        image = read_image(image_path)
        assert image.shape == (64, 64, 3)
        if mask_path:
            raw = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
            assert raw.shape == (64, 64) and set(np.unique(raw)) <= {0, 255}
            assert 0.03 <= read_mask(mask_path).mean() <= 0.4


@pytest.mark.parametrize("kind", KINDS)
def test_changes_lie_inside_the_mask(kind):
    for seed in range(6):
        rng = np.random.default_rng(seed)
        host = make_sample("authentic", 96, rng)[0]
        image, mask = tamper(kind, host, rng)
        assert image.shape == host.shape and image.dtype == np.uint8 and mask.dtype == bool
        changed = np.any(image != host, axis=2)
        assert not changed[~mask].any()
        assert changed[mask].mean() > 0.5  # and the region really was tampered


def test_regions_cover_five_to_thirty_percent():
    rng = np.random.default_rng(0)
    fractions = [random_region(128, rng).mean() for _ in range(60)]
    assert min(fractions) >= 0.04 and max(fractions) <= 0.36


def high_pass_energy(image):
    pixels = image.astype(np.float32)
    return np.abs(pixels - cv2.blur(pixels, (3, 3))).mean(axis=2)


def test_splices_carry_a_clear_noise_trace_by_default():
    """The spliced region's noise/JPEG history must differ visibly from the host's (the learnable trace)."""
    ratios = []
    for seed in range(20):
        image, mask = make_sample("splice", 128, np.random.default_rng(seed))
        energy = high_pass_energy(image)
        inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # away from the seam
        outer = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
        ratios.append(np.median(energy[inner]) / np.median(energy[outer]))
    assert np.median(ratios) > 2 and np.mean(np.array(ratios) > 1.3) >= 0.9


def test_difficulty_one_makes_the_trace_subtler():
    def median_ratio(difficulty):
        ratios = []
        for seed in range(10):
            image, mask = make_sample("splice", 128, np.random.default_rng(seed), difficulty=difficulty)
            energy = high_pass_energy(image)
            ratios.append(np.median(energy[mask]) / np.median(energy[~mask]))
        return np.median(ratios)

    assert median_ratio(1.0) < median_ratio(0.0)


def noise_detector_auc(image, mask):
    """Pixel AUC of a hand-made noise-level detector (log local energy of a high-pass residual), by scikit-learn."""
    from sklearn.metrics import roc_auc_score

    gray = image.astype(np.float32).mean(axis=2)
    residual = gray - cv2.GaussianBlur(gray, (0, 0), 1.0)
    energy = np.log(cv2.GaussianBlur(residual**2, (0, 0), 3.0) + 1e-3)
    return roc_auc_score(mask.ravel(), energy.ravel())


@pytest.mark.parametrize("kind", ["splice", "copymove"])
def test_plain_scenes_leave_the_noise_trace_as_the_only_fine_detail(kind):
    """`shapes=(0, 0)` (the demo's `--shapes 0`): without the shapes' sharp edges a plain noise-level detector finds
    the glaring region almost perfectly, and clearly better than on the default cluttered scenes."""
    def median_auc(shapes):
        aucs = []
        for seed in range(12):
            image, mask = make_sample(kind, 128, np.random.default_rng(seed), difficulty=0.0, shapes=shapes)
            aucs.append(noise_detector_auc(image, mask))
        return np.median(aucs)

    plain, cluttered = median_auc((0, 0)), median_auc((3, 8))
    assert plain > 0.95 and plain > cluttered + 0.02


def test_sources_folder_is_used(tmp_path):
    sources = tmp_path / "photos"
    sources.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        photo = np.full((90, 120, 3), (40 + 100 * i, 200, 30), np.uint8) + rng.integers(0, 3, (90, 120, 3),
                                                                                            dtype=np.uint8)
        cv2.imwrite(str(sources / f"p{i}.png"), photo)
    path = make_synthetic_set(tmp_path / "out", 4, 48, seed=1, sources=sources, authentic_fraction=1.0,
                              progress=False)
    for image_path, _ in np.load(path):
        green = read_image(image_path)[..., 1].astype(float)
        assert abs(green.mean() - 200) < 10  # the photos' colour, not a procedural scene
    with pytest.raises(Exception, match="no image files"):
        make_synthetic_set(tmp_path / "x", 2, 48, sources=tmp_path / "out" / "masks", progress=False)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="kinds"):
        make_synthetic_set(tmp_path, 2, 64, kinds=("forgery",), progress=False)
    with pytest.raises(ValueError, match="difficulty"):
        make_synthetic_set(tmp_path, 2, 64, difficulty=2, progress=False)
    with pytest.raises(ValueError, match="shapes"):
        make_synthetic_set(tmp_path, 2, 64, shapes=(4, 2), progress=False)


def test_command_line_runs_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, "generate_flist.py", "--synthetic", "3", "--out", str(tmp_path),
                             "--size", "48", "--seed", "2", "--name", "cli", "--shapes", "0", "--no-progress"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("cli_3.npy") and (tmp_path / "cli_3.npy").is_file()
    assert len(list((tmp_path / "images").glob("*.png"))) == 3
    refused = subprocess.run([sys.executable, "generate_flist.py", "--synthetic", "3", "--out", str(tmp_path),
                              "--name", "cli", "--shapes", "5,2"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--shapes: expected N or FEWEST,MOST" in refused.stderr

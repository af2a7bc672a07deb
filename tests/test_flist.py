"""datasets.flist: the official list format, atomic writes, and the row checker on hand-made files."""
import glob
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import flist
from datasets.flist import FileListError, check_rows, mask_values, read_flist, write_flist
from datasets.io import read_mask

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def save(array: np.ndarray, path: Path, **options) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return str(path)


def rectangle_mask(height=32, width=48, box=(8, 20, 10, 30)) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 255
    return mask


def noise_image(height=32, width=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def kinds_of(report, row=None):
    return sorted(p.kind for p in report.problems if row is None or p.row == row)


# ------------------------------------------------------------------------------------------------------ format

def test_round_trip_uses_official_name_and_leaves_no_temporary(tmp_path):
    rows = [("a/1.png", "a/1_gt.png"), ("a/2.jpg", ""), ("b/3.tif", "b/3_gt.png")]
    path = write_flist(rows, tmp_path / "new" / "folder", "Demo")
    assert path == tmp_path / "new" / "folder" / "Demo_3.npy"
    back = read_flist(path)
    assert back.dtype.kind == "U" and back.shape == (3, 2)
    assert [tuple(row) for row in back] == rows
    assert os.listdir(path.parent) == ["Demo_3.npy"]


def test_official_list_loads_unchanged(tmp_path):
    official = np.array([["demo/input/1.png", "demo/gt/1.png"], ["demo/input/2.png", "demo/gt/2.png"],
                         ["demo/input/3.png", ""]], dtype="<U16")
    np.save(tmp_path / "demo_3.npy", official)
    back = read_flist(tmp_path / "demo_3.npy")
    assert back.dtype == official.dtype and np.array_equal(back, official)


def _object_list(path):
    np.save(path, np.array([["a.png", None]], dtype=object), allow_pickle=True)


@pytest.mark.parametrize("name, make, message", [
    ("missing_2.npy", lambda p: None, "no such file"),
    ("list.txt", lambda p: p.write_text("a.png,b.png\n"), "not a .npy"),
    ("wide_1.npy", lambda p: np.save(p, np.array([["a", "b", "c"]])), "shape"),
    ("flat_2.npy", lambda p: np.save(p, np.array(["a", "b"])), "shape"),
    ("empty_0.npy", lambda p: np.save(p, np.empty((0, 2), dtype="<U4")), "empty"),
    ("numbers_1.npy", lambda p: np.save(p, np.zeros((1, 2))), "dtype"),
    ("pickled_1.npy", _object_list, "not a plain string array"),
    ("garbage_1.npy", lambda p: p.write_bytes(b"not numpy at all"), "not a readable"),
    ("noimage_1.npy", lambda p: np.save(p, np.array([["", "m.png"]])), "empty image path"),
])
def test_bad_lists_are_rejected_naming_the_file(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(FileListError, match=message) as error:
        read_flist(path)
    assert str(path) in str(error.value)


def test_empty_list_is_not_written(tmp_path):
    with pytest.raises(FileListError, match="empty"):
        write_flist([], tmp_path, "Nothing")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_existing_list(tmp_path, monkeypatch):
    path = write_flist([("x.png", "y.png")], tmp_path, "Keep")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(flist.np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_flist([("other.png", "")], tmp_path, "Keep")
    monkeypatch.undo()
    assert [tuple(r) for r in read_flist(path)] == [("x.png", "y.png")]
    assert os.listdir(tmp_path) == ["Keep_1.npy"]


def test_relative_paths(tmp_path):
    inside = (str(tmp_path / "base" / "img" / "a.png"), str(tmp_path / "base" / "gt" / "a.png"))
    relative = flist.relative_rows([inside, (str(tmp_path / "abs.png"), "")], tmp_path)
    assert tuple(relative[0]) == (os.path.join("base", "img", "a.png"), os.path.join("base", "gt", "a.png"))
    assert tuple(relative[1]) == ("abs.png", "")


# ----------------------------------------------------------------------------------------------------- checking

def test_good_tampered_and_authentic_rows_have_no_problem(tmp_path):
    image = save(noise_image(), tmp_path / "a.png")
    mask = save(rectangle_mask(), tmp_path / "a_gt.png")
    jpeg = save(noise_image(seed=1), tmp_path / "b.jpg", quality=90)
    report = check_rows([(image, mask), (jpeg, "")])
    assert report.problems == [] and len(report.good_rows()) == 2


@pytest.mark.parametrize("mode", ["header", "full"])
def test_truncated_jpeg_is_an_error(tmp_path, mode):
    path = tmp_path / "cut.jpg"
    save(noise_image(64, 64), path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    mask = save(rectangle_mask(64, 64), tmp_path / "cut_gt.png")
    report = check_rows([(str(path), mask)], check_images=mode)
    assert kinds_of(report) == ["image unreadable"] and report.bad_rows == {0}
    assert report.problems[0].path == str(path)


def test_truncated_png_and_tiff_are_errors(tmp_path):
    rows = []
    for name in ("cut.png", "cut.tif"):
        path = tmp_path / name
        save(noise_image(64, 64), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        rows.append((str(path), save(rectangle_mask(64, 64), tmp_path / f"{name}_gt.png")))
    report = check_rows(rows)
    assert kinds_of(report) == ["image unreadable", "image unreadable"] and report.bad_rows == {0, 1}


def test_missing_and_unreadable_files(tmp_path):
    image = save(noise_image(), tmp_path / "a.png")
    mask = save(rectangle_mask(), tmp_path / "a_gt.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG but not really")
    rows = [(str(tmp_path / "nope.png"), mask), (image, str(tmp_path / "nope_gt.png")),
            (image, str(tmp_path / "junk.png"))]
    report = check_rows(rows)
    assert kinds_of(report, 0) == ["image missing"]
    assert kinds_of(report, 1) == ["mask missing"]
    assert kinds_of(report, 2) == ["mask unreadable"]


def test_mask_contents(tmp_path):
    image = save(noise_image(), tmp_path / "a.png")
    empty = save(np.zeros((32, 48), np.uint8), tmp_path / "empty.png")
    full = save(np.full((32, 48), 255, np.uint8), tmp_path / "full.png")
    small = save(rectangle_mask(30, 48), tmp_path / "small.png")
    mostly = save(255 - rectangle_mask(), tmp_path / "mostly.png")
    report = check_rows([(image, empty), (image, full), (image, small), (image, mostly)])
    assert kinds_of(report, 0) == ["mask empty"]
    assert kinds_of(report, 1) == ["mask all forged"]
    assert kinds_of(report, 2) == ["size mismatch"]
    assert kinds_of(report, 3) == ["mask mostly forged"]
    assert report.bad_rows == {0, 1, 2}
    assert [tuple(r) for r in report.good_rows()] == [(image, mostly)]


def test_soft_grey_mask_is_a_warning_not_an_error(tmp_path):
    image = save(noise_image(), tmp_path / "a.png")
    soft = rectangle_mask().astype(np.float64)
    soft[4:28, 4:44] = np.maximum(soft[4:28, 4:44], 100)  # a grey halo around the region: ~50 % of pixels
    mask = save(soft.astype(np.uint8), tmp_path / "soft.png")
    report = check_rows([(image, mask)])
    assert kinds_of(report) == ["mask not binary"] and report.bad_rows == set()


def test_binary_mask_stored_as_jpeg_is_accepted(tmp_path):
    image = save(noise_image(128, 128), tmp_path / "a.png")
    mask = save(rectangle_mask(128, 128, (20, 90, 30, 100)), tmp_path / "m.jpg", quality=90)
    values = np.asarray(Image.open(mask).convert("L"))
    ringing = np.count_nonzero((values > 10) & (values < 245))
    assert 0 < ringing < 0.01 * values.size  # the file really has JPEG ringing, below the 1 % rule
    assert check_rows([(image, mask)]).problems == []


def test_inverted_masks(tmp_path):
    image = save(noise_image(), tmp_path / "a.png")
    black_is_forged = save(255 - rectangle_mask(), tmp_path / "inv.png")
    assert np.array_equal(mask_values(black_is_forged, "inverted") > 127, rectangle_mask() > 127)
    assert check_rows([(image, black_is_forged)], mask_kinds=["inverted"]).problems == []
    assert kinds_of(check_rows([(image, black_is_forged)])) == ["mask mostly forged"]


def test_columbia_edge_map_conversion(tmp_path):
    # Red = the authentic camera's region, green = the spliced region, with darker boundary bands and a white
    # unknown band; only the green region is forged.
    edge = np.zeros((60, 80, 3), np.uint8)
    edge[:, :] = (255, 0, 0)
    spliced = np.zeros((60, 80), bool)
    spliced[15:45, 20:60] = True
    edge[spliced] = (0, 255, 0)
    edge[14, 20:60] = (255, 255, 255)
    edge[13, 20:60] = (100, 0, 0)
    png = save(edge, tmp_path / "x_edgemask.png")
    assert np.array_equal(mask_values(png, "columbia_edge") > 127, spliced)
    jpeg = save(edge, tmp_path / "x_edgemask.jpg", quality=90)
    converted = mask_values(jpeg, "columbia_edge") > 127
    assert np.count_nonzero(converted != spliced) < 0.01 * spliced.size


def test_written_binary_mask_is_0_255_png(tmp_path):
    values = np.array([[0, 100, 128, 255]], np.uint8)
    path = flist.write_binary_mask(values, tmp_path / "m" / "x.png")
    stored = np.asarray(Image.open(path))
    assert Image.open(path).mode == "L" and stored.tolist() == [[0, 0, 255, 255]]


def test_report_summary_names_files(tmp_path):
    image = save(noise_image(), tmp_path / "a.png")
    empties = [save(np.zeros((32, 48), np.uint8), tmp_path / f"e{i}.png") for i in range(5)]
    text = check_rows([(image, e) for e in empties]).summary(first=2)
    assert "error: mask empty: 5" in text and empties[0] in text and empties[1] in text
    assert empties[2] not in text and "and 3 more" in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="check_images"):
        check_rows([("a.png", "")], check_images="fast")
    with pytest.raises(ValueError, match="mask kind"):
        mask_values("whatever.png", "sepia")


# ------------------------------------------------------------------------------------------ on the shared data

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


@needs_shared
def test_binary_mask_values_threshold_as_the_official_reader():
    masks = (sorted(glob.glob(str(SHARED / "CASIA2_samples" / "Gt" / "*.png")))[:6]
             + glob.glob(str(SHARED / "Korus_RealisticTampering_samples" / "mask" / "*"))
             + glob.glob(str(SHARED / "Columbia_samples" / "mask" / "*_01.jpg")))
    assert len(masks) == 8
    for path in masks:
        assert np.array_equal(mask_values(path) > 127, read_mask(path)), path


@needs_shared
def test_shared_images_pass_the_cheap_completeness_test():
    # So that header mode really avoids decoding them (the test decodes nothing).
    paths = [p for pattern in ("CASIA2_samples/Tp/*", "Columbia_samples/4cam_splc/*", "NIST16_samples/probe/*",
                               "Korus_RealisticTampering_samples/tampered/*", "NoSo_copymove/0*_mod.png")
             for p in glob.glob(str(SHARED / pattern))]
    assert len(paths) > 30
    assert all(flist._looks_complete(path) for path in paths)

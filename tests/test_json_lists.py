"""IMDLBenCo JSON lists: read by the one list reader (training, testing), written and converted atomically by
generate_flist.py, bad ones refused naming the file."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import generate_flist
from datasets.flist import FileListError, read_flist, write_flist

# A list as IMDLBenCo documents it (its JsonDataset docstring / data-preparation page): an array of pairs, the
# mask "Negative" for an authentic image, paths as written (relative ones are opened from the current directory).
IMDLBENCO_TEXT = """[
    [
      "/Dataset/CASIAv2/Tp/Tp_D_NRN_S_N_arc00013_sec00045_11700.jpg",
      "/Dataset/CASIAv2/Gt/Tp_D_NRN_S_N_arc00013_sec00045_11700_gt.png"
    ],
    ["./Tp/6.jpg", "./Gt/6.jpg"],
    [
      "/Dataset/CASIAv2/Au/Au_nat_30198.jpg",
      "Negative"
    ]
]
"""
IMDLBENCO_ROWS = [
    ("/Dataset/CASIAv2/Tp/Tp_D_NRN_S_N_arc00013_sec00045_11700.jpg",
     "/Dataset/CASIAv2/Gt/Tp_D_NRN_S_N_arc00013_sec00045_11700_gt.png"),
    ("./Tp/6.jpg", "./Gt/6.jpg"),
    ("/Dataset/CASIAv2/Au/Au_nat_30198.jpg", ""),
]
IMDLBENCO_PAIRS = [list(row[:1]) + [row[1] or "Negative"] for row in IMDLBENCO_ROWS]


def run(capsys, *args):
    code = generate_flist.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ----------------------------------------------------------------------------------------------------- reading

def test_imdlbenco_text_reads_as_rows_with_negative_as_empty(tmp_path):
    path = tmp_path / "CASIAv2.json"
    path.write_text(IMDLBENCO_TEXT, encoding="utf-8")
    rows = read_flist(path)
    assert rows.dtype.kind == "U" and rows.shape == (3, 2)
    assert [tuple(row) for row in rows] == IMDLBENCO_ROWS


def test_utf8_bom_and_non_ascii_paths_read(tmp_path):
    path = tmp_path / "accents.json"
    path.write_bytes(b"\xef\xbb\xbf" + '[["données/é 1.png", "masques/é 1.png"], ["x.png", ""]]'.encode("utf-8"))
    assert [tuple(row) for row in read_flist(path)] == [("données/é 1.png", "masques/é 1.png"), ("x.png", "")]


def test_upper_case_extension_reads(tmp_path):
    path = tmp_path / "LIST.JSON"
    path.write_text('[["a.png", "Negative"]]')
    assert [tuple(row) for row in read_flist(path)] == [("a.png", "")]


# ----------------------------------------------------------------------------------------------------- writing

def test_written_json_is_imdlbenco_format_and_round_trips(tmp_path):
    path = write_flist(IMDLBENCO_ROWS, tmp_path / "lists", "CASIAv2", "json")
    assert path == tmp_path / "lists" / "CASIAv2_3.json"
    assert os.listdir(path.parent) == ["CASIAv2_3.json"]  # no temporary left behind
    assert json.loads(path.read_text(encoding="utf-8")) == IMDLBENCO_PAIRS
    assert [tuple(row) for row in read_flist(path)] == IMDLBENCO_ROWS


def test_non_ascii_paths_are_written_as_utf8_text(tmp_path):
    path = write_flist([("é.png", "")], tmp_path, "u", "json")
    assert path.read_bytes() == '[\n    ["é.png", "Negative"]\n]\n'.encode("utf-8")


def test_a_mask_file_named_negative_is_refused(tmp_path):
    with pytest.raises(FileListError, match="read back as an authentic") as error:
        write_flist([("a.png", "Negative")], tmp_path, "bad", "json")
    assert "bad_1.json" in str(error.value)
    assert not (tmp_path / "bad_1.json").exists()


# -------------------------------------------------------------------------------------------------- conversion

def test_convert_json_to_npy_and_back(tmp_path, capsys):
    source = tmp_path / "in" / "CASIAv2.json"
    source.parent.mkdir()
    source.write_text(IMDLBENCO_TEXT, encoding="utf-8")
    code, out = run(capsys, "--convert", source, "--out", tmp_path / "npy")
    assert code == 0, out
    npy = tmp_path / "npy" / "CASIAv2_3.npy"
    assert f"wrote {npy} (3 rows, 1 authentic)" in out
    array = np.load(npy, allow_pickle=False)  # read independently of read_flist
    assert array.dtype.kind == "U" and [tuple(row) for row in array] == IMDLBENCO_ROWS

    code, out = run(capsys, "--convert", npy, "--out", tmp_path / "json")
    assert code == 0, out
    back = tmp_path / "json" / "CASIAv2_3.json"
    assert json.loads(back.read_text(encoding="utf-8")) == IMDLBENCO_PAIRS
    assert sorted(os.listdir(tmp_path / "json")) == ["CASIAv2_3.json"]


def test_convert_official_npy_beside_itself_and_both_formats(tmp_path, capsys):
    official = np.array([["demo/input/1.png", "demo/gt/1.png"], ["demo/input/3.png", ""]], dtype="<U16")
    np.save(tmp_path / "demo_2.npy", official)
    code, out = run(capsys, "--convert", tmp_path / "demo_2.npy")
    assert code == 0, out
    assert json.loads((tmp_path / "demo_2.json").read_text()) == [["demo/input/1.png", "demo/gt/1.png"],
                                                                   ["demo/input/3.png", "Negative"]]
    code, out = run(capsys, "--convert", tmp_path / "demo_2.json", "--out", tmp_path / "both", "--format", "both",
                    "--name", "Demo")
    assert code == 0, out
    assert sorted(os.listdir(tmp_path / "both")) == ["Demo_2.json", "Demo_2.npy"]
    assert np.array_equal(np.load(tmp_path / "both" / "Demo_2.npy"), official)


def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys):
    np.save(tmp_path / "demo_1.npy", np.array([["a.png", ""]]))
    code, out = run(capsys, "--convert", tmp_path / "demo_1.npy", "--format", "npy")
    assert code == 1 and "overwrite the input" in out and str(tmp_path / "demo_1.npy") in out


def test_generate_writes_npy_and_json_side_by_side(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    mask = np.zeros((12, 16), np.uint8)
    mask[2:6, 3:8] = 255
    for stem in ("a", "b"):
        Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(images / f"{stem}.png")
        Image.fromarray(mask).save(masks / f"{stem}_gt.png")
    Image.fromarray(np.full((12, 16, 3), 30, np.uint8)).save(tmp_path / "real.png")
    (tmp_path / "real_dir").mkdir()
    os.replace(tmp_path / "real.png", tmp_path / "real_dir" / "real.png")
    code, out = run(capsys, "--images", images, "--masks", masks, "--mask-suffix", "_gt", "--authentic",
                    tmp_path / "real_dir", "--name", "Mine", "--out", tmp_path / "out", "--format", "both",
                    "--no-progress")
    assert code == 0, out
    expected = [[str(images / "a.png"), str(masks / "a_gt.png")], [str(images / "b.png"), str(masks / "b_gt.png")],
                [str(tmp_path / "real_dir" / "real.png"), "Negative"]]
    assert json.loads((tmp_path / "out" / "Mine_3.json").read_text()) == expected
    npy = np.load(tmp_path / "out" / "Mine_3.npy")
    assert [list(row) for row in npy] == [row[:1] + [row[1] if row[1] != "Negative" else ""] for row in expected]
    code, out = run(capsys, "--show", tmp_path / "out" / "Mine_3.json")
    assert code == 0 and "3 rows (2 tampered, 1 authentic)" in out


# ------------------------------------------------------------------------------------------------- bad lists

def _fifo(path):
    os.mkfifo(path)


BAD_LISTS = [
    ("malformed.json", '[\n  ["a.png", "b.png"],\n  ["c.png" "d.png"]\n]\n', "not valid JSON (line 3, column 12"),
    ("trailing_comma.json", '[["a.png", "b.png"],]', "not valid JSON (line 1, column 21"),
    ("object.json", '{"Columbia": "/data/Columbia.json", "coverage": "/data/coverage.json"}',
     "found an object (this looks like an IMDLBenCo test_dataset.json"),
    ("string.json", '"a.png"', "expected a JSON array of [image, mask] pairs, found \"a.png\""),
    ("empty.json", "[]", "the list is empty"),
    ("blank.json", "", "not valid JSON (line 1, column 1"),
    ("triple.json", '[["a.png", "b.png"], ["c.png", "d.png", "e.png"]]', "entry 1 is"),
    ("flat.json", '["a.png", "b.png"]', "entry 0 is \"a.png\", expected a pair"),
    ("null_mask.json", '[["a.png", null]]', "entry 0: the mask path is null, expected a string"),
    ("number_image.json", '[[3, "b.png"]]', "entry 0: the image path is 3, expected a string"),
    ("no_image.json", '[["a.png", "Negative"], ["", "m.png"]]', "entry 1 has an empty image path"),
    ("balanced.json", '[["ManiDataset", "/data/CASIA2.0"], ["JsonDataset", "/data/tampCOCO/sp_COCO_list.json"]]',
     "BalancedDataset list of datasets"),
    ("latin1.json", b'[["caf\xe9.png", "Negative"]]', "not UTF-8 text (byte 0xE9 at offset 6)"),
    ("missing.json", None, "no such file"),
    ("folder.json", "folder", "is a folder"),
    ("pipe.json", _fifo, "named pipe"),
]


@pytest.mark.parametrize("name, content, message", BAD_LISTS, ids=[case[0] for case in BAD_LISTS])
def test_bad_json_lists_are_refused_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "folder":
        path.mkdir()
    elif callable(content):
        content(path)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(FileListError) as error:
        read_flist(path)
    text = str(error.value)
    assert message in text
    assert f"'{path}'" in text and "\n" not in text


def test_bad_json_list_through_the_cli_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('[["a.png", "b.png"]')
    code, out = run(capsys, "--show", path)
    assert code == 1
    assert out.strip() == f"error: file list '{path}': not valid JSON (line 1, column 20: Expecting ',' delimiter)"


# ---------------------------------------------------------------------------- training and testing read JSON lists

def _tiny_set(root: Path) -> list:
    """Two tampered images with masks and one authentic image: IMDLBenCo pairs."""
    rng = np.random.default_rng(0)
    pairs = []
    for index, (height, width, forged) in enumerate([(40, 48, True), (36, 52, True), (44, 40, False)]):
        image = root / "Tp" / f"{index}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
        mask = "Negative"
        if forged:
            values = np.zeros((height, width), np.uint8)
            values[5:20, 8:30] = 255
            mask_path = root / "Gt" / f"{index}.png"
            mask_path.parent.mkdir(exist_ok=True)
            Image.fromarray(values).save(mask_path)
            mask = str(mask_path)
        pairs.append([str(image), mask])
    return pairs


def test_training_data_reads_json_lists(tmp_path):
    from utils.config import load_config
    from utils.training.builders import build_datasets

    pairs = _tiny_set(tmp_path)
    train = tmp_path / "train_3.json"
    train.write_text(json.dumps(pairs))
    cfg = load_config(None, ["DATA.TRAIN_LISTS", f"[['{train}', 2]]", "DATA.VAL_LISTS", f"['{train}']",
                             "DATA.INPUT_SIZE", "32", "DATA.AUGMENT", "False"])
    train_set, val_sets, _ = build_datasets(cfg, logging.getLogger("test"))
    assert len(train_set) == 6 and list(val_sets) == ["train_3"]
    assert [tuple(train_set.rows[i]) for i in range(3)] == [(pairs[0][0], pairs[0][1]), (pairs[1][0], pairs[1][1]),
                                                           (pairs[2][0], "")]
    validation = val_sets["train_3"]
    assert float(validation[0]["mask"].max()) > 0       # tampered: forged pixels
    assert float(validation[2]["mask"].max()) == 0.0     # "Negative": an all-authentic mask


def test_stage2_test_scores_a_json_list_like_the_same_npy_list(tmp_path):
    from tiny_weights import INPUT_SIZE, save_tiny_weights

    from stage2 import test as test_script

    pairs = _tiny_set(tmp_path / "data")
    json_list = tmp_path / "asjson_3.json"
    json_list.write_text(json.dumps(pairs))
    npy_list = tmp_path / "asnpy_3.npy"
    np.save(npy_list, np.array([[image, "" if mask == "Negative" else mask] for image, mask in pairs]))
    weights = save_tiny_weights(tmp_path, "best.pth", 2, "official.pth", 3)["ours"][0]
    report = test_script.main(["--weights", str(weights), "--flist", str(json_list), str(npy_list),
                               "--out", str(tmp_path / "out"), "--device", "cpu", "--num-workers", "0",
                               "--input-size", str(INPUT_SIZE), "--no-progress"])
    from_json, from_npy = report["datasets"]["asjson_3"], report["datasets"]["asnpy_3"]
    assert from_json["f1_fixed"] == from_npy["f1_fixed"] and from_json["iou"] == from_npy["iou"]
    assert (tmp_path / "out" / "asjson_3" / "per_image.csv").read_text() == \
        (tmp_path / "out" / "asnpy_3" / "per_image.csv").read_text()

"""generate_flist.py and datasets.adapters: pairing by name for every standard set, checked lists, the CLI."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import generate_flist
from datasets import adapters
from datasets.flist import check_rows, read_flist

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
COVERAGE_BAD = {41, 48, 55, 56, 57, 58, 59, 61, 95}


def save(array: np.ndarray, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def image(height=12, width=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def mask(height=12, width=16) -> np.ndarray:
    values = np.zeros((height, width), np.uint8)
    values[2: height // 2, 3: width // 2] = 255
    return values


def run(capsys, *args) -> tuple[int, str]:
    code = generate_flist.main([str(a) for a in args] + ["--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def stems(path: str) -> str:
    return Path(path).stem


# --------------------------------------------------------------------------------------- the shared real samples

SHARED_SETS = [
    # dataset, folder, rows without / with authentic, how a mask name follows from its image's stem
    ("casia1", "CASIA1/samples_original_jpg", 4, 4, lambda s: s + "_gt"),
    ("casia1", "CASIA1/samples_from_combine_png", 36, 72, lambda s: s + "_gt"),
    ("casia2", "CASIA2_samples", 21, 21, lambda s: s + "_gt"),
    ("columbia", "Columbia_samples", 9, 9, lambda s: s),
    ("noso", "NoSo_copymove", 18, 31, lambda s: s + "_gt"),
    ("imd2020", "IMD2020_samples", 1, 1, lambda s: s + "_mask"),
    ("korus", "Korus_RealisticTampering_samples", 1, 1, lambda s: s + "_mask"),
]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("dataset, folder, tampered, with_authentic, mask_stem", SHARED_SETS)
def test_shared_sets(tmp_path, capsys, dataset, folder, tampered, with_authentic, mask_stem):
    root = SHARED / folder
    code, out = run(capsys, "--dataset", dataset, "--root", root, "--name", dataset, "--out", tmp_path)
    assert code == 0, out
    rows = read_flist(tmp_path / f"{dataset}_{tampered}.npy")
    assert len(rows) == tampered and all(mask != "" for mask in rows[:, 1])
    for image_path, mask_path in rows:
        assert Path(image_path).is_absolute() and Path(image_path).is_relative_to(root)
        assert stems(mask_path).lower() == mask_stem(stems(image_path)).lower()
    code, out = run(capsys, "--dataset", dataset, "--root", root, "--name", "all", "--out", tmp_path,
                    "--with-authentic")
    assert code == 0 and len(read_flist(tmp_path / f"all_{with_authentic}.npy")) == with_authentic


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_shared_named_pairs():
    # A few pairs checked by name, independently of any naming rule.
    pairs = {(Path(p.image).name, Path(p.mask).name) for p in adapters.casia2(SHARED / "CASIA2_samples").pairs}
    assert ("Tp_D_CRN_M_N_pla00035_pla00033_10997.jpg", "Tp_D_CRN_M_N_pla00035_pla00033_10997_gt.png") in pairs
    assert ("Tp_S_NRN_S_N_txt00062_txt00062_01284.tif", "Tp_S_NRN_S_N_txt00062_txt00062_01284_gt.png") in pairs
    noso = adapters.noso(SHARED / "NoSo_copymove")
    assert ("08_mod_03.png", "08_mod_03_gt.png") in {(Path(p.image).name, Path(p.mask).name) for p in noso.pairs}
    assert "01.png" in {Path(a).name for a in noso.authentic} and "01_mod.png" not in {Path(a).name
                                                                                          for a in noso.authentic}
    korus = adapters.korus(SHARED / "Korus_RealisticTampering_samples").pairs
    assert [(Path(p.image).name, Path(p.mask).name) for p in korus] == [("DSC06083.TIF", "DSC06083_mask.PNG")]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_shared_nist16_masks_are_inverted_and_converted(tmp_path, capsys):
    root = SHARED / "NIST16_samples"
    code, out = run(capsys, "--dataset", "nist16", "--root", root, "--name", "NIST16", "--out", tmp_path)
    assert code == 0, out
    rows = read_flist(tmp_path / "NIST16_3.npy")
    expected = {"NC2016_0016.jpg": "mani_NC2016_0940.png", "NC2016_0130.jpg": "mani_NC2016_6409.png",
                "NC2016_2564.jpg": "NC2016_2564_gt.png"}  # from pairs.txt
    assert {Path(i).name for i in rows[:, 0]} == set(expected)
    for image_path, converted in rows:
        assert Path(converted).parent == tmp_path / "masks" / "NIST16"
        assert Path(converted).name == Path(image_path).stem + ".png"
        original = np.asarray(Image.open(root / "mask" / expected[Path(image_path).name]).convert("L"))
        stored = np.asarray(Image.open(converted))
        assert set(np.unique(stored)) <= {0, 255}
        assert np.array_equal(stored == 255, original < 128)  # black in the NIST mask = forged
    # This sample's NC2016_2564_gt.png is already white = forged, so inverting it is flagged as suspicious.
    report = (tmp_path / "NIST16_3.report.txt").read_text()
    assert "mask mostly forged: 1" in report and "NC2016_2564_gt.png" in report


# ------------------------------------------------------------------------------------------------------ COVERAGE

def make_coverage(root: Path) -> None:
    for n in range(1, 101):
        save(image(seed=n), root / "image" / f"{n}t.tif")
        save(image(seed=1000 + n), root / "image" / f"{n}.tif")
        height = 14 if n in COVERAGE_BAD else 12
        save(mask(height), root / "mask" / f"{n}forged.tif")
        save(mask(), root / "mask" / f"{n}copy.tif")
        save(mask(), root / "mask" / f"{n}paste.tif")


def test_coverage_size_mismatches(tmp_path, capsys):
    root, out = tmp_path / "COVERAGE", tmp_path / "flist"
    make_coverage(root)
    listing = adapters.coverage(root)
    assert len(listing.pairs) == 100 and len(listing.authentic) == 100 and listing.problems == []
    assert all(Path(p.mask).stem == Path(p.image).stem[:-1] + "forged" for p in listing.pairs)
    report = check_rows([(p.image, p.mask) for p in listing.pairs])
    mismatched = {int(Path(p.path).stem[: -len("forged")]) for p in report.errors}
    assert {p.kind for p in report.errors} == {"size mismatch"} and mismatched == COVERAGE_BAD

    code, text = run(capsys, "--dataset", "coverage", "--root", root, "--name", "Coverage", "--out", out)
    assert code == 1 and "size mismatch: 9" in text and not out.exists()

    code, text = run(capsys, "--dataset", "coverage", "--root", root, "--name", "Coverage", "--out", out,
                     "--skip-bad")
    assert code == 0
    rows = read_flist(out / "Coverage_91.npy")
    kept = {int(Path(i).stem[:-1]) for i in rows[:, 0]}
    assert len(rows) == 91 and kept == set(range(1, 101)) - COVERAGE_BAD
    report_text = (out / "Coverage_91.report.txt").read_text()
    assert all(f"/{n}forged.tif" in report_text for n in COVERAGE_BAD)


# -------------------------------------------------------------------------------------------------- generic mode

def make_folders(root: Path, missing_mask: str = "e") -> None:
    """Images a..j of different heights (a wrong pairing gives a size mismatch); mask of `missing_mask` absent."""
    for index, name in enumerate("abcdefghij"):
        save(image(10 + index, seed=index), root / "img" / f"{name}.JPG", quality=95)
        if name != missing_mask:
            save(mask(10 + index), root / "gt" / f"{name}_gt.PNG")


def test_generic_pairs_by_stem_not_position(tmp_path, capsys):
    make_folders(tmp_path)
    out = tmp_path / "out"
    args = ["--images", tmp_path / "img", "--masks", tmp_path / "gt", "--mask-suffix", "_gt", "--name", "Mine",
            "--out", out]
    code, text = run(capsys, *args)
    assert code == 1 and "image without mask: 1" in text and str(tmp_path / "img" / "e.JPG") in text
    assert not out.exists()
    code, text = run(capsys, *args, "--skip-bad")
    assert code == 0 and "size mismatch" not in text
    rows = read_flist(out / "Mine_9.npy")
    assert [Path(i).name for i in rows[:, 0]] == [f"{n}.JPG" for n in "abcdfghij"]
    assert all(Path(m).name == Path(i).stem + "_gt.PNG" for i, m in rows)


def test_mask_without_image_and_duplicates_are_reported(tmp_path):
    make_folders(tmp_path, missing_mask="")
    save(mask(), tmp_path / "gt" / "zzz_gt.png")
    save(image(), tmp_path / "img" / "a.png")  # a second image with stem 'a'
    listing = adapters.pair_folders(tmp_path / "img", tmp_path / "gt", "_gt")
    assert sorted(p.kind for p in listing.problems) == ["mask without image", "same name twice"]
    assert len(listing.pairs) == 9


def test_pairs_file_and_authentic_folder(tmp_path, capsys):
    make_folders(tmp_path)
    save(image(seed=9), tmp_path / "real" / "r1.png")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "pairs.csv").write_text(
        "image,mask\n# a comment\n../img/a.JPG, ../gt/a_gt.PNG\n\n"
        f"{tmp_path / 'img' / 'b.JPG'},{tmp_path / 'gt' / 'b_gt.PNG'}\n../img/e.JPG\n")
    out = tmp_path / "out"
    code, text = run(capsys, "--pairs", tmp_path / "lists" / "pairs.csv", "--authentic", tmp_path / "real",
                     "--name", "P", "--out", out, "--relative-to", tmp_path)
    assert code == 0, text
    rows = read_flist(out / "P_4.npy")
    assert [tuple(r) for r in rows] == [("img/a.JPG", "gt/a_gt.PNG"), ("img/b.JPG", "gt/b_gt.PNG"),
                                        ("img/e.JPG", ""), ("real/r1.png", "")]
    (tmp_path / "bad.txt").write_text("a.png b.png c.png\n")
    code, text = run(capsys, "--pairs", tmp_path / "bad.txt", "--name", "B", "--out", out)
    assert code == 1 and "bad.txt', line 1" in text


def test_invert_masks_writes_converted_masks(tmp_path, capsys):
    save(image(), tmp_path / "img" / "x.png")
    save(255 - mask(), tmp_path / "gt" / "x.png")
    out = tmp_path / "out"
    code, _ = run(capsys, "--images", tmp_path / "img", "--masks", tmp_path / "gt", "--name", "Inv", "--out", out,
                  "--invert-masks")
    assert code == 0
    (image_path, mask_path), = read_flist(out / "Inv_1.npy")
    assert Path(mask_path) == (out / "masks" / "Inv" / "x.png").absolute()
    assert np.array_equal(np.asarray(Image.open(mask_path)), mask())


# ------------------------------------------------------------------------------------ other layouts and datasets

def test_columbia_official_edge_masks(tmp_path, capsys):
    root = tmp_path / "columbia"
    edge = np.zeros((12, 16, 3), np.uint8)
    edge[:, :] = (255, 0, 0)
    edge[mask() > 0] = (0, 255, 0)
    save(image(), root / "4cam_splc" / "canong3_nikond70_sub_01.tif")
    save(edge, root / "4cam_splc" / "edgemask" / "canong3_nikond70_sub_01_edgemask.png")
    save(image(seed=3), root / "4cam_auth" / "canong3_02_sub_01.tif")
    code, text = run(capsys, "--dataset", "columbia", "--root", root, "--name", "Col", "--out", tmp_path / "o",
                     "--with-authentic")
    assert code == 0, text
    rows = read_flist(tmp_path / "o" / "Col_2.npy")
    assert rows[1, 1] == "" and Path(rows[1, 0]).name == "canong3_02_sub_01.tif"
    assert np.array_equal(np.asarray(Image.open(rows[0, 1])), mask())


def test_casia1_public_ground_truth_layout(tmp_path):
    save(image(), tmp_path / "Tp" / "Sp" / "Sp_D_a.jpg")
    save(image(), tmp_path / "Tp" / "CM" / "Sp_S_b.jpg")
    save(mask(), tmp_path / "Sp" / "Sp_D_a_gt.png")
    save(mask(), tmp_path / "CM" / "Sp_S_b_gt.png")
    save(image(), tmp_path / "Au" / "Au_c.jpg")
    listing = adapters.casia1(tmp_path)
    assert sorted((Path(p.image).name, Path(p.mask).name) for p in listing.pairs) == [
        ("Sp_D_a.jpg", "Sp_D_a_gt.png"), ("Sp_S_b.jpg", "Sp_S_b_gt.png")]
    assert [Path(a).name for a in listing.authentic] == ["Au_c.jpg"] and listing.problems == []


def test_imd2020_original_release_layout(tmp_path):
    for source in ("1a1ogs", "1a2b3c"):
        save(image(), tmp_path / source / "c8tf5mq_orig.jpg")
        save(image(), tmp_path / source / "c8tf5mq_0.jpg")
        save(mask(), tmp_path / source / "c8tf5mq_0_mask.png")
    save(image(), tmp_path / "1a1ogs" / "c8tf5mq_1.png")
    listing = adapters.imd2020(tmp_path)
    assert sorted((Path(p.image).parent.name, Path(p.mask).name) for p in listing.pairs) == [
        ("1a1ogs", "c8tf5mq_0_mask.png"), ("1a2b3c", "c8tf5mq_0_mask.png")]
    assert all(Path(p.image).parent == Path(p.mask).parent for p in listing.pairs)
    assert len(listing.authentic) == 2
    assert [(p.kind, Path(p.path).name) for p in listing.problems] == [("image without mask", "c8tf5mq_1.png")]


def test_korus_case_variations(tmp_path):
    save(image(), tmp_path / "tampered" / "dsc01.tif")
    save(mask(), tmp_path / "mask" / "DSC01_MASK.png")
    pairs = adapters.korus(tmp_path).pairs
    assert [(Path(p.image).name, Path(p.mask).name) for p in pairs] == [("dsc01.tif", "DSC01_MASK.png")]


def test_dso1_polarity_warning_and_inversion(tmp_path, capsys):
    save(image(), tmp_path / "splicing-01.png")
    save(image(seed=2), tmp_path / "normal-01.png")
    save(255 - mask(), tmp_path / "DSO-1-Fake-Images-Masks" / "splicing-01.png")
    code, text = run(capsys, "--dataset", "dso1", "--root", tmp_path, "--name", "DSO", "--out", tmp_path / "a")
    assert code == 0 and "mask mostly forged: 1" in text
    code, text = run(capsys, "--dataset", "dso1", "--root", tmp_path, "--name", "DSO", "--out", tmp_path / "b",
                     "--invert-masks", "--with-authentic")
    # No row warning is left (the two-image folder is still reported as an incomplete DSO-1 by its manifest).
    assert code == 0 and "warning:" not in text.replace("warning: manifest:", "")
    rows = read_flist(tmp_path / "b" / "DSO_2.npy")
    assert np.array_equal(np.asarray(Image.open(rows[0, 1])), mask()) and rows[1, 1] == ""


def test_adapter_errors_name_the_folder(tmp_path, capsys):
    code, text = run(capsys, "--dataset", "casia2", "--root", tmp_path, "--name", "X")
    assert code == 1 and "casia2" in text and str(tmp_path) in text and "Tp/" in text
    code, text = run(capsys, "--dataset", "nist16", "--root", tmp_path / "nowhere", "--name", "X")
    assert code == 1 and "not a folder" in text


def test_nist16_reference_csv(tmp_path):
    root = tmp_path / "NC2016"
    save(image(), root / "probe" / "NC2016_0001.jpg")
    save(image(), root / "probe" / "NC2016_0002.jpg")
    save(255 - mask(), root / "reference" / "manipulation" / "mask" / "NC2016_0500.png")
    (root / "reference" / "manipulation" / "NC2016-manipulation-ref.csv").write_text(
        "TaskID|ProbeFileID|ProbeFileName|ProbeMaskFileName|IsTarget\n"
        "manipulation|NC2016_0001|probe/NC2016_0001.jpg|reference/manipulation/mask/NC2016_0500.png|Y\n"
        "manipulation|NC2016_0002|probe/NC2016_0002.jpg||N\n")
    listing = adapters.nist16(root)
    assert listing.pairs == [adapters.Pair(str(root / "probe" / "NC2016_0001.jpg"),
                                           str(root / "reference/manipulation/mask/NC2016_0500.png"), "inverted")]
    assert listing.authentic == [str(root / "probe" / "NC2016_0002.jpg")]


# ------------------------------------------------------------------------------------------------------------ CLI

def test_show_and_argument_errors(tmp_path, capsys):
    np.save(tmp_path / "demo_2.npy", np.array([["demo/1.png", "demo/1_gt.png"], ["demo/2.png", ""]]))
    code, text = run(capsys, "--show", tmp_path / "demo_2.npy")
    assert code == 0 and "2 rows (1 tampered, 1 authentic)" in text and "demo/1_gt.png" in text
    code, text = run(capsys, "--show", tmp_path / "none.npy")
    assert code == 1 and "none.npy" in text
    with pytest.raises(SystemExit) as exit_info:
        generate_flist.main(["--images", str(tmp_path), "--name", "X"])
    assert exit_info.value.code == 2 and "--masks" in capsys.readouterr().err


def test_runs_as_a_script_from_the_repo_root(tmp_path):
    np.save(tmp_path / "demo_1.npy", np.array([["a.png", "b.png"]]))
    result = subprocess.run([sys.executable, "generate_flist.py", "--show", str(tmp_path / "demo_1.npy")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "1 rows (1 tampered, 0 authentic)" in result.stdout


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_flist.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(word in text for word in ("--skip-bad", "--relative-to", "coverage", "never by sorted position"))

"""Dataset manifests: the expected image counts of each standard set, and generate_flist.py's comparison of a folder
with them (on synthetic trees named by each dataset's rule, and on the shared real samples)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import generate_flist
from datasets.adapters import ADAPTERS
from datasets.manifests import MANIFESTS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def run(capsys, *args):
    code = generate_flist.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def touch(folder: Path, names) -> None:
    """Empty files: --check-manifest lists names and never opens a file."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()


# ------------------------------------------------------------------------------------------------- the table

def test_every_adapter_has_a_manifest_with_the_documented_counts():
    assert set(MANIFESTS) == set(ADAPTERS)
    # (tampered with a mask, authentic or None, MPC's list), from each dataset's documentation and MPC's list names.
    expected = {
        "casia1": (920, 800, "CASIAv1_920"), "casia2": (5123, 7491, "CASIA2_5123"),
        "columbia": (180, 183, "Columbia_160"), "coverage": (100, 100, "Coverage_100"),
        "nist16": (564, None, "NIST_564"), "imd2020": (2010, None, "IMD_2010"), "korus": (220, 220, "Korus_220"),
        "noso": (18, 13, None), "dso1": (100, 100, "DSO_100"),
    }
    assert {key: (m.tampered, m.authentic, m.mpc_list) for key, m in MANIFESTS.items()} == expected
    assert MANIFESTS["casia1"].release_tampered == 921
    assert MANIFESTS["columbia"].mpc_count == 160 and MANIFESTS["noso"].mpc_count is None
    assert all(m.source for m in MANIFESTS.values())


def test_manifest_table_prints(capsys):
    code, out = run(capsys, "--manifests")
    assert code == 0
    assert "| `columbia` Columbia uncompressed | 180 | 183 | Columbia_160 |" in out
    assert "| `casia1` CASIA v1.0 | 920 (release: 921) | 800 | CASIAv1_920 |" in out


# --------------------------------------------------------------------------------------- synthetic folder trees

COLUMBIA_PAIRS = ("canong3_canonxt", "canong3_kodakdcs330", "canong3_nikond70", "canonxt_kodakdcs330",
                  "canonxt_nikond70", "nikond70_kodakdcs330")


def coverage_tree(root: Path) -> None:
    touch(root / "image", [f"{n}t.tif" for n in range(1, 101)] + [f"{n}.tif" for n in range(1, 101)])
    touch(root / "mask", [f"{n}{kind}.tif" for n in range(1, 101) for kind in ("forged", "copy", "paste")])


def columbia_tree(root: Path) -> None:
    stems = [f"{pair}_sub_{n:02d}" for pair in COLUMBIA_PAIRS for n in range(1, 31)]
    touch(root / "4cam_splc", [f"{stem}.tif" for stem in stems])
    touch(root / "mask", [f"{stem}.jpg" for stem in stems])
    touch(root / "4cam_auth", [f"auth_{n:03d}.tif" for n in range(183)])


def dso_tree(root: Path) -> None:
    touch(root / "images", [f"splicing-{n:02d}.png" for n in range(1, 101)] +
          [f"normal-{n:02d}.png" for n in range(1, 101)])
    touch(root / "masks", [f"splicing-{n:02d}.png" for n in range(1, 101)])


def korus_tree(root: Path) -> None:
    stems = [f"DSC{n:05d}" for n in range(220)]
    touch(root / "tampered", [f"{s}.TIF" for s in stems])
    touch(root / "mask", [f"{s}_mask.PNG" for s in stems])
    touch(root / "pristine", [f"{s}.TIF" for s in stems])


TREES = {
    # dataset: (builder, files to remove, the warning expected afterwards, written out by hand)
    "coverage": (coverage_tree, ["image/7t.tif", "image/42t.tif"],
                 "warning: manifest: found 98 of the 100 tampered images of COVERAGE: incomplete download? "
                 "missing: 7t, 42t"),
    "columbia": (columbia_tree, ["4cam_splc/canonxt_nikond70_sub_05.tif", "4cam_splc/nikond70_kodakdcs330_sub_30.tif"],
                 "warning: manifest: found 178 of the 180 tampered images of Columbia uncompressed: incomplete "
                 "download? missing: canonxt_nikond70_sub_05, nikond70_kodakdcs330_sub_30"),
    "dso1": (dso_tree, ["images/splicing-09.png", "images/splicing-100.png"],
             "warning: manifest: found 98 of the 100 tampered images of DSO-1: incomplete download? "
             "missing: splicing-09, splicing-100"),
    "korus": (korus_tree, ["tampered/DSC00003.TIF", "tampered/DSC00200.TIF"],
              "warning: manifest: found 218 of the 220 tampered images of Korus realistic tampering: incomplete "
              "download?"),
}


@pytest.mark.parametrize("dataset", sorted(TREES))
def test_complete_tree_passes_and_two_removed_files_are_named(tmp_path, capsys, dataset):
    build, removed, warning = TREES[dataset]
    build(tmp_path)
    title = MANIFESTS[dataset].title
    code, out = run(capsys, "--dataset", dataset, "--root", tmp_path, "--check-manifest")
    assert code == 0 and "warning" not in out, out
    assert f"manifest: found {MANIFESTS[dataset].tampered} of the {MANIFESTS[dataset].tampered} tampered images " \
           f"of {title}: complete" in out
    assert f"authentic images of {title}: complete" in out
    for name in removed:
        (tmp_path / name).unlink()
    code, out = run(capsys, "--dataset", dataset, "--root", tmp_path, "--check-manifest")
    assert code == 0
    lines = out.splitlines()
    assert warning in lines, out
    assert f"authentic images of {title}: complete" in out
    code, out = run(capsys, "--dataset", dataset, "--root", tmp_path, "--check-manifest", "--strict-manifest")
    assert code == 1 and warning.replace("warning:", "error:", 1) in out.splitlines()


def test_coverage_missing_authentic_images_are_named(tmp_path, capsys):
    coverage_tree(tmp_path)
    (tmp_path / "image" / "100.tif").unlink()
    code, out = run(capsys, "--dataset", "coverage", "--root", tmp_path, "--check-manifest")
    assert "warning: manifest: found 99 of the 100 authentic images of COVERAGE: incomplete download? missing: 100" \
        in out.splitlines()


def test_columbia_names_only_the_camera_pairs_present(tmp_path, capsys):
    touch(tmp_path / "4cam_splc", [f"canong3_canonxt_sub_{n:02d}.tif" for n in (1, 2, 4)])
    touch(tmp_path / "mask", [f"canong3_canonxt_sub_{n:02d}.jpg" for n in (1, 2, 4)])
    code, out = run(capsys, "--dataset", "columbia", "--root", tmp_path, "--check-manifest")
    assert ("warning: manifest: found 3 of the 180 tampered images of Columbia uncompressed: incomplete download? "
            "missing: canong3_canonxt_sub_03, canong3_canonxt_sub_05, canong3_canonxt_sub_06, canong3_canonxt_sub_07, "
            "canong3_canonxt_sub_08 and 22 more named by the naming rule (150 more that the naming rule cannot "
            "name)") in out.splitlines()


# --------------------------------------------------------------------------- the check inside list generation

def noso_tree(root: Path) -> list:
    """The complete NoSo layout with tiny valid images and masks: 13 originals, 18 forgeries with masks."""
    forgeries = ["01_mod", "02_mod", "03_mod", "04_mod", "05_mod", "06_mod", "07_mod_01", "07_mod_02", "08_mod_01",
                 "08_mod_02", "08_mod_03", "09_mod_01", "09_mod_02", "10_mod_01", "10_mod_02", "11_mod", "12_mod",
                 "13_mod"]
    root.mkdir(parents=True, exist_ok=True)
    image = np.full((8, 8, 3), 120, np.uint8)
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[2:5, 2:6] = 255
    for n in range(1, 14):
        Image.fromarray(image).save(root / f"{n:02d}.png")
    for stem in forgeries:
        Image.fromarray(image).save(root / f"{stem}.png")
        Image.fromarray(mask).save(root / f"{stem}_gt.png")
    return forgeries


def test_generate_warns_names_missing_files_and_still_writes(tmp_path, capsys):
    root = tmp_path / "NoSo"
    noso_tree(root)
    code, out = run(capsys, "--dataset", "noso", "--root", root, "--name", "NoSo", "--out", tmp_path / "a",
                    "--with-authentic", "--no-progress")
    assert code == 0 and "warning: manifest" not in out, out
    assert "manifest: found 18 of the 18 tampered images of NoSo copy-move: complete" in out
    assert (tmp_path / "a" / "NoSo_31.npy").is_file()
    for stem in ("08_mod_02", "11_mod"):
        (root / f"{stem}.png").unlink()
        (root / f"{stem}_gt.png").unlink()
    code, out = run(capsys, "--dataset", "noso", "--root", root, "--name", "NoSo", "--out", tmp_path / "b",
                    "--no-progress")
    assert code == 0
    assert ("warning: manifest: found 16 of the 18 tampered images of NoSo copy-move: incomplete download? missing: "
            "08_mod_02, 11_mod") in out.splitlines()
    assert (tmp_path / "b" / "NoSo_16.npy").is_file()
    code, out = run(capsys, "--dataset", "noso", "--root", root, "--name", "NoSo", "--out", tmp_path / "c",
                    "--strict-manifest", "--no-progress")
    assert code == 1 and "not written" in out and not (tmp_path / "c").exists()


def test_manifest_flags_need_a_dataset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_flist.main(["--images", "a", "--masks", "b", "--name", "x", "--strict-manifest"])
    assert exit_info.value.code == 2
    assert "--strict-manifest go with --dataset" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the shared real samples

SHARED_EXPECTED = {
    # folder: (dataset, the report lines written out by hand from the folder's known contents)
    "CASIA1/samples_original_jpg": ("casia1", [
        "warning: manifest: found 4 of the 920 tampered images with a mask of CASIA v1.0: incomplete download?",
        "warning: manifest: found 0 of the 800 authentic images of CASIA v1.0: incomplete download?"]),
    "CASIA1/samples_from_combine_png": ("casia1", [
        "warning: manifest: found 36 of the 920 tampered images with a mask of CASIA v1.0: incomplete download?",
        "warning: manifest: found 36 of the 800 authentic images of CASIA v1.0: incomplete download?"]),
    "CASIA2_samples": ("casia2", [
        "warning: manifest: found 21 of the 5123 tampered images of CASIA v2.0: incomplete download?",
        "warning: manifest: found 0 of the 7491 authentic images of CASIA v2.0: incomplete download?"]),
    "Columbia_samples": ("columbia", [
        "warning: manifest: found 9 of the 180 tampered images of Columbia uncompressed: incomplete download? "
        "missing: canong3_canonxt_sub_10, canong3_canonxt_sub_11, canong3_canonxt_sub_12, canong3_canonxt_sub_13, "
        "canong3_canonxt_sub_14 and 16 more named by the naming rule (150 more that the naming rule cannot name)",
        "warning: manifest: found 0 of the 183 authentic images of Columbia uncompressed: incomplete download?"]),
    "NoSo_copymove": ("noso", [
        "manifest: found 18 of the 18 tampered images of NoSo copy-move: complete",
        "manifest: found 13 of the 13 authentic images of NoSo copy-move: complete"]),
    "NIST16_samples": ("nist16", [
        "warning: manifest: found 3 of the 564 tampered images of NIST Nimble 2016: incomplete download?"]),
    "IMD2020_samples": ("imd2020", [
        "warning: manifest: found 1 of the 2010 tampered images of IMD2020 real-life: incomplete download?"]),
    "Korus_RealisticTampering_samples": ("korus", [
        "warning: manifest: found 1 of the 220 tampered images of Korus realistic tampering: incomplete download?",
        "warning: manifest: found 0 of the 220 authentic images of Korus realistic tampering: incomplete download?"]),
}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("folder", sorted(SHARED_EXPECTED))
def test_shared_samples_against_their_manifests(capsys, folder):
    dataset, expected = SHARED_EXPECTED[folder]
    root = SHARED / folder
    code, out = run(capsys, "--dataset", dataset, "--root", root, "--check-manifest")
    assert code == 0  # partial samples: warnings, not errors
    assert out.splitlines() == [f"{dataset} ({root}):"] + expected

"""The bad-input table (issue 10): every script, handed broken or unusual input, either does the right thing or ends
with one line that names the file (or key) and the problem, without a traceback, and changes nothing outside --out.

One parametrised test per script: generate_flist.py, the dataset (`ForgeryDataset`, what every script reads with),
the training scripts (stage1/train.py, stage2/train.py where the case is about stage 2), stage2/test.py and
stage2/infer.py; plus the 12000×9000 image to infer.py in a subprocess under an address-space limit. Each case is a
function that builds its input in a fresh folder and says what must happen: the exit status (2 for the project's
`UserError`s, which `utils.entry.run_script` prints as one line; 1 for a script's own one-line refusal), words the one
message line must hold, and for input that must work, what the outputs must be. Scripts run in-process through
`run_script`, as their `__main__` does.

What "correct" is, where it needed deciding:
- EXIF orientation is ignored by every reader, for images and masks alike: pixels are used in their stored order, so
  a mask drawn on the stored grid (what a dataset's own tools write) stays aligned and outputs have the stored size; a
  mask drawn on the displayed (rotated) grid is a size mismatch. (OpenCV's imread, the official reader, rotates a JPEG
  but not its PNG mask.)
- An all-black mask on a tampered row is scored as tampered (the official test does); generate_flist refuses it.
- A duplicate row: generate_flist refuses the repeat (--skip-bad keeps the first); test.py scores every row it is
  given, each with its own outputs (x, x_2).
- An image listed as `../../x.png`: its outputs are named by its stem, inside --out.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_weights import save_tiny_weights

import generate_flist
import models
from datasets.dataset import ForgeryDataset
from datasets.io import ImageReadError
from stage1 import train as stage1_train
from stage2 import infer, test as test_script
from stage2 import train as stage2_train
from utils.entry import run_script
from utils.training.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # the squash-resize size of test.py and infer.py here
TRAIN_SIZE = 64  # hrt_nano's deepest branch is 1/32 of the input: 2×2 at 64, enough for batch norm at batch size 1
LARGE = (12000, 9000)  # width, height: the image issue 10 hands to infer.py
# infer.py's memory for one image, over what the process held before: the decoded image (3 bytes a pixel), the map at
# full size (float32, 4), the 8-bit mask (1) and heat map (3), and their PNG encodings, about 11 bytes a pixel
# without copies; measured 24. A float64 map or one copy too many of the heat map would pass 32.
INFER_BYTES_PER_PIXEL = 32

LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d mpc\.")  # the training scripts' log lines
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar
TERMINAL_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor between its nested bars


# ------------------------------------------------------------------------------------------------ files and runs

def save_noise(path: Path, height: int, width: int, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def box(height: int, width: int) -> np.ndarray:
    """A mask with a forged rectangle (0/255), never empty nor full for sizes from 2×2."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4: height // 2 + 1, width // 4: width // 2 + 1] = 255
    return mask


def save_array(path: Path, array: np.ndarray, mode: str | None = None, **save) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **save)
    return str(path)


class Workspace:
    """One case's folder: inputs under `root`, the script's output in `out`; `top` (above both) is what must not
    change except under `out`, so that a write that climbs out of `out` by `..` is seen too."""

    def __init__(self, top: Path, weights: "WeightFiles"):
        self.top = top
        self.root = top / "case"
        self.root.mkdir()
        self.out = self.root / "out"
        self.weights = weights

    def path(self, relative: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def image(self, relative: str, height: int = 24, width: int = 32, seed: int = 0) -> str:
        return save_noise(self.path(relative), height, width, seed)

    def mask(self, relative: str, height: int = 24, width: int = 32, values: np.ndarray | None = None) -> str:
        return save_array(self.path(relative), box(height, width) if values is None else values)

    def bytes(self, relative: str, data: bytes) -> str:
        path = self.path(relative)
        path.write_bytes(data)
        return str(path)

    def truncated(self, relative: str, height: int = 24, width: int = 32) -> str:
        """An image cut to half its bytes, as an interrupted copy leaves it."""
        path = Path(self.image(relative, height, width))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return str(path)

    def folder(self, relative: str) -> str:
        path = self.path(relative)
        path.mkdir()
        return str(path)

    def flist(self, relative: str, rows) -> str:
        path = self.path(relative)
        np.save(path, np.asarray(rows, dtype=str).reshape(-1, 2))
        return str(path)

    def pair(self, stem: str = "a", height: int = 24, width: int = 32, seed: int = 0) -> tuple[str, str]:
        return self.image(f"images/{stem}.png", height, width, seed), self.mask(f"masks/{stem}.png", height, width)

    def good_list(self, name: str = "good", count: int = 2) -> str:
        rows = [self.pair(f"{name}{index}", seed=index) for index in range(count)]
        return self.flist(f"lists/{name}_{count}.npy", rows)


@dataclass
class Expect:
    """What a case must do. `says`: words the one message line on stderr must hold (none: stderr holds no message);
    `check`: assertions on the outputs; `cwd`: where the script runs; `untouched`: refusals change nothing, not even
    under --out; `script`: the training script (stage 1 unless the case is about stage 2)."""

    argv: list[str]
    status: int
    says: tuple[str, ...] = ()
    check: Callable[[], None] | None = None
    cwd: Path | None = None
    untouched: bool = False
    script: Callable | None = None


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: (size, mtime in ns); folders as (-1, 0), since writing into a folder
    changes its mtime and that is seen through the file anyway."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        found[str(path.relative_to(folder))] = (-1, 0) if path.is_dir() else (info.st_size, info.st_mtime_ns)
    return found


def changes(before: dict, after: dict) -> list[str]:
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def message_lines(stderr: str) -> list[str]:
    """stderr less the training scripts' log lines and progress bars: what a user reads as the outcome."""
    lines = re.split(r"[\r\n]+", TERMINAL_CONTROL.sub("", stderr))
    return [line for line in lines if line.strip() and not LOG_LINE.match(line) and not PROGRESS.search(line)]


def run_and_check(main: Callable, ws: Workspace, expect: Expect, capsys, monkeypatch) -> None:
    if expect.cwd is not None:
        monkeypatch.chdir(expect.cwd)
    before = snapshot(ws.top)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_script(main, expect.argv)
    captured = capsys.readouterr()
    status, stderr = exit_info.value.code, captured.err
    if isinstance(status, str):  # SystemExit("message"): Python prints the message on stderr and exits 1
        status, stderr = 1, stderr + status + "\n"
    status = status or 0
    lines = message_lines(stderr)
    shown = f"status {status}, stderr:\n{stderr}\nstdout:\n{captured.out[-2000:]}"
    assert "Traceback" not in stderr, shown
    assert status == expect.status, shown
    if expect.says:
        assert len(lines) == 1, shown
        for words in expect.says:
            assert words in lines[0], (words, lines[0])
    else:
        assert lines == [], shown
    after = snapshot(ws.top)
    out = str(ws.out.relative_to(ws.top))
    changed = changes(before, after)
    if not expect.untouched:
        changed = [name for name in changed if name != out and not name.startswith(out + os.sep)]
    assert changed == [], f"changed {'at all' if expect.untouched else 'outside --out'}: {changed}"
    if expect.check is not None:
        expect.check()


def table() -> tuple[list, Callable]:
    """A list of cases and the decorator that adds one: a function `<script prefix>_<case id>(ws)` that builds the
    input and returns what must happen; `xfail=reason` marks a known defect, `skip_as_root=what` a case that root
    cannot set up."""
    cases = []

    def case(function=None, *, xfail: str | None = None, skip_as_root: str | None = None):
        def register(build):
            marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
            cases.append(pytest.param(build, id=build.__name__.split("_", 1)[1], marks=marks))  # less the script prefix
            build.skip_as_root = skip_as_root
            return build
        return register(function) if function is not None else register
    return cases, case


def skip_if_root_writes(build, ws: Workspace) -> None:
    """chmod does not stop root: a read-only --out cannot be made here when the tests run as root."""
    if build.skip_as_root:
        probe = ws.root / "read_only_probe"
        probe.mkdir()
        probe.chmod(0o500)
        try:
            (probe / "x").write_text("x")
            writable = True
        except PermissionError:
            writable = False
        finally:
            probe.chmod(0o700)
            (probe / "x").unlink(missing_ok=True)
            probe.rmdir()
        if writable:
            pytest.skip(f"{build.skip_as_root}: this process writes into a folder with mode 0500 (root ignores the "
                        "permission bits), so the case cannot be set up")


# --------------------------------------------------------------------------------------------------- weights files

class Payload:
    """Unpickling this creates `path`: what a pickle payload in a weights file or list would do, harmlessly."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@dataclass
class WeightFiles:
    """The tiny model's weights file and broken or foreign files made from it, shared by the module's cases."""

    folder: Path
    good: Path  # our stage-2 checkpoint (hrt_nano, catnet head)
    official_nano: Path  # an official-style bare state_dict of an hrt_nano model
    truncated: Path
    foreign_format: Path  # a NumPy file named .pth
    foreign_model: Path  # a state_dict of an unrelated network
    pickle_payload: Path
    sentinel: Path  # created if the payload ever runs
    misshaped: Path  # ours, with encoder.conv1.weight cut to 2 input channels
    stage1: Path  # ours, stage 1
    loaded: object = None  # the good file loaded once, for cases that are not about the weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> WeightFiles:
    folder = tmp_path_factory.mktemp("weights")
    made = save_tiny_weights(folder, "best.pth", 0, "official_nano.pth", 1)
    good = made["ours"][0]
    contents = torch.load(good, weights_only=True)
    files = WeightFiles(folder, good, made["official"][0], folder / "truncated.pth", folder / "foreign.pth",
                        folder / "resnet.pth", folder / "payload.pth", folder / "payload_ran", folder / "misshaped.pth",
                        folder / "stage1.pth")
    files.truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with open(files.foreign_format, "wb") as handle:
        np.save(handle, np.zeros((4, 4), dtype=np.float32))
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, files.foreign_model)
    torch.save({"model": contents["model"], "extra": Payload(str(files.sentinel))}, files.pickle_payload)
    model = dict(contents["model"])
    model["encoder.conv1.weight"] = model["encoder.conv1.weight"][:, :2].clone()
    torch.save({**contents, "model": model}, files.misshaped)
    torch.save({**contents, "stage": 1}, files.stage1)
    files.loaded = models.load_trained_model(str(good))
    return files


@pytest.fixture
def reuse_loaded_model(monkeypatch, weights):
    """Loading the tiny model is most of a test.py/infer.py case's time: cases not about the weights file get the
    model loaded once (by the same loader); the cases about the weights file load theirs for real."""
    real = models.load_trained_model

    def load(path, backbone=None, head=None, device=torch.device("cpu")):
        if Path(path) == weights.good and backbone is None and head is None and str(device) == "cpu":
            return weights.loaded
        return real(path, backbone, head, device)

    monkeypatch.setattr(models, "load_trained_model", load)  # what both scripts' load_for_backend calls


@pytest.fixture
def ws(tmp_path, weights) -> Workspace:
    return Workspace(tmp_path, weights)


def payload_did_not_run(weights: WeightFiles) -> Callable[[], None]:
    def check():
        assert not weights.sentinel.exists(), "the pickle payload ran"
    return check


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


# ------------------------------------------------------------------------------------------------ unusual layouts

def save_layouts(ws: Workspace, folder: str) -> dict[str, tuple[str, tuple[int, int]]]:
    """16-bit grey, RGBA, palette and CMYK-JPEG images of different sizes: {name: (path, (height, width))}."""
    rng = np.random.default_rng(3)
    made = {}
    gray16 = (rng.integers(0, 256, (20, 28)) * 257).astype(np.uint16)
    made["gray16"] = (save_array(ws.path(f"{folder}/gray16.png"), gray16), (20, 28))
    rgba = rng.integers(0, 256, (18, 30, 4), dtype=np.uint8)
    made["rgba"] = (save_array(ws.path(f"{folder}/rgba.png"), rgba, "RGBA"), (18, 30))
    palette = Image.fromarray(rng.integers(0, 4, (22, 26), dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 250])
    path = ws.path(f"{folder}/palette.png")
    palette.save(path)
    made["palette"] = (str(path), (22, 26))
    path = ws.path(f"{folder}/cmyk.jpg")
    Image.new("CMYK", (34, 16), (0, 255, 255, 0)).save(path)
    made["cmyk"] = (str(path), (16, 34))
    return made


EXIF_ORIENTATION = 0x0112


def save_exif_rotated(ws: Workspace, relative: str, height: int = 24, width: int = 40) -> str:
    """A JPEG stored height × width whose EXIF says "rotate 90° clockwise to display" (orientation 6), with a bright
    block where `box` puts the forged region on the stored grid, on a dark background."""
    pixels = np.full((height, width, 3), 30, dtype=np.uint8)
    pixels[box(height, width) > 0] = 230
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = ws.path(relative)
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    return str(path)


# ============================================================================================== generate_flist.py

GENERATE_FLIST_CASES, generate_flist_case = table()


def folder_argv(ws: Workspace, *extra: str) -> list[str]:
    return ["--images", str(ws.root / "images"), "--masks", str(ws.root / "masks"), "--name", "set",
            "--out", str(ws.out), "--no-progress", *extra]


def pairs_argv(ws: Workspace, lines: list[str], *extra: str) -> list[str]:
    pairs = ws.path("pairs.txt")
    pairs.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return ["--pairs", str(pairs), "--name", "set", "--out", str(ws.out), "--no-progress", *extra]


def written_list(ws: Workspace, count: int) -> np.ndarray:
    path = ws.out / f"set_{count}.npy"
    assert path.is_file(), sorted(p.name for p in ws.out.iterdir())
    return np.load(path)


@generate_flist_case
def flist_truncated_image(ws):
    image = ws.truncated("images/a.png")
    ws.mask("masks/a.png")
    return Expect(folder_argv(ws), 1, (image, "truncated"))


@generate_flist_case
def flist_zero_byte_image(ws):
    image = ws.bytes("images/a.png", b"")
    ws.mask("masks/a.png")
    return Expect(folder_argv(ws), 1, (image, "not an image file"))


@generate_flist_case
def flist_text_as_image(ws):
    image = ws.bytes("images/a.jpg", b"just some text, saved with an image's name\n")
    ws.mask("masks/a.png")
    return Expect(folder_argv(ws), 1, (image, "not an image file"))


@generate_flist_case
def flist_image_that_is_a_folder(ws):
    image = ws.folder("a.png")
    ws.mask("masks/a.png")
    return Expect(pairs_argv(ws, ["a.png,masks/a.png"]), 1, (image, "is a folder"))


@generate_flist_case
def flist_missing_image(ws):
    ws.mask("masks/a.png")
    return Expect(pairs_argv(ws, ["gone.png,masks/a.png"]), 1, (str(ws.root / "gone.png"), "no such file"))


@generate_flist_case
def flist_mask_size_mismatch(ws):
    ws.image("images/a.png", 24, 32)
    mask = ws.mask("masks/a.png", 20, 32)
    return Expect(folder_argv(ws), 1, (mask, "size mismatch", "mask 20x32, image 24x32"))


@generate_flist_case
def flist_all_black_mask(ws):
    ws.image("images/a.png")
    mask = ws.mask("masks/a.png", values=np.zeros((24, 32), np.uint8))
    return Expect(folder_argv(ws), 1, (mask, "mask empty"))


@generate_flist_case
def flist_all_white_mask(ws):
    ws.image("images/a.png")
    mask = ws.mask("masks/a.png", values=np.full((24, 32), 255, np.uint8))
    return Expect(folder_argv(ws), 1, (mask, "every pixel is forged"))


@generate_flist_case
def flist_mask_of_zeros_and_ones(ws):
    ws.image("images/a.png")
    mask = ws.mask("masks/a.png", values=box(24, 32) // 255)
    return Expect(folder_argv(ws), 1, (mask, "0 and 1", "--mask-convention nonzero"))


@generate_flist_case
def flist_duplicate_rows(ws):
    ws.pair("a")
    expect = Expect(pairs_argv(ws, ["images/a.png,masks/a.png", "images/a.png,masks/a.png"]), 1,
                    (str(ws.root / "images" / "a.png"), "duplicate row", "row 0"))
    return expect


@generate_flist_case
def flist_duplicate_rows_skip_bad_keeps_the_first(ws):
    image, mask = ws.pair("a")
    ws.pair("b")
    lines = ["images/a.png,masks/a.png", "images/b.png,masks/b.png", "images/a.png,masks/a.png"]

    def check():
        rows = written_list(ws, 2)
        assert rows.tolist() == [[image, mask], [str(ws.root / "images" / "b.png"), str(ws.root / "masks" / "b.png")]]
    return Expect(pairs_argv(ws, lines, "--skip-bad"), 0, check=check)


@generate_flist_case
def flist_relative_non_ascii_and_space_paths(ws):
    """Relative paths in a pairs file are relative to its folder, whatever the current folder is."""
    image = ws.image("my set/фото 1.png")
    mask = ws.mask("my set/маска 1.png")
    pairs = ws.path("my set/pairs.txt")
    pairs.write_text("фото 1.png\tмаска 1.png\n", encoding="utf-8")
    argv = ["--pairs", str(pairs), "--name", "set", "--out", str(ws.out), "--no-progress"]

    def check():
        assert written_list(ws, 1).tolist() == [[image, mask]]
    return Expect(argv, 0, check=check, cwd=ws.folder("elsewhere"))


@generate_flist_case
def flist_unusual_image_layouts(ws):
    layouts = save_layouts(ws, "images")
    for name, (_, (height, width)) in layouts.items():
        ws.mask(f"masks/{name}.png", height, width)

    def check():
        rows = written_list(ws, len(layouts))
        assert sorted(rows[:, 0]) == sorted(path for path, _ in layouts.values())
    return Expect(folder_argv(ws), 0, check=check)


@generate_flist_case
def flist_exif_rotated_jpeg_mask_on_the_stored_grid(ws):
    image = save_exif_rotated(ws, "images/a.jpg")
    mask = ws.mask("masks/a.png", 24, 40)

    def check():
        assert written_list(ws, 1).tolist() == [[image, mask]]
    return Expect(folder_argv(ws), 0, check=check)


@generate_flist_case
def flist_exif_rotated_jpeg_mask_on_the_displayed_grid(ws):
    save_exif_rotated(ws, "images/a.jpg")
    mask = ws.mask("masks/a.png", 40, 24)
    return Expect(folder_argv(ws), 1, (mask, "size mismatch", "mask 40x24, image 24x40"))


@generate_flist_case
def flist_one_by_one_and_three_by_three_images(ws):
    """A 1×1 image can only be authentic (its mask would be empty or all forged); a 3×3 one has a 1-pixel region."""
    small = ws.image("images/small.png", 3, 3)
    values = np.zeros((3, 3), np.uint8)
    values[1, 1] = 255
    small_mask = ws.mask("masks/small.png", values=values)
    dot = ws.image("real/dot.png", 1, 1)

    def check():
        assert written_list(ws, 2).tolist() == [[small, small_mask], [dot, ""]]
    return Expect(folder_argv(ws, "--authentic", str(ws.root / "real")), 0, check=check)


@generate_flist_case
def flist_show_a_pickled_list(ws):
    path = ws.path("lists/pickled_1.npy")
    np.save(path, np.array([[Payload(str(ws.root / "ran")), "mask.png"]], dtype=object), allow_pickle=True)

    def check():
        assert not (ws.root / "ran").exists()
    return Expect(["--show", str(path)], 1, (str(path), "not a plain string array"), check=check)


@generate_flist_case
def flist_show_a_list_of_three_columns(ws):
    path = ws.path("lists/three_1.npy")
    np.save(path, np.array([["a.png", "a_gt.png", "extra"]]))
    return Expect(["--show", str(path)], 1, (str(path), "expected shape (N, 2)", "(1, 3)"))


@generate_flist_case
def flist_show_an_empty_list(ws):
    path = ws.path("lists/empty_0.npy")
    np.save(path, np.zeros((0, 2), dtype="<U1"))
    return Expect(["--show", str(path)], 1, (str(path), "the list is empty"))


@generate_flist_case
def flist_missing_pairs_file(ws):
    pairs = ws.root / "nowhere.txt"
    return Expect(["--pairs", str(pairs), "--name", "set", "--out", str(ws.out)], 1, (str(pairs), "no such file"))


@generate_flist_case
def flist_missing_images_folder(ws):
    ws.folder("masks")
    images = ws.root / "images"
    return Expect(folder_argv(ws), 1, (str(images), "not a folder"))


@generate_flist_case
def flist_out_is_a_file(ws):
    ws.pair("a")
    ws.out.write_text("the user's notes, not a folder\n")
    return Expect(folder_argv(ws), 1, (str(ws.out), "is a file, not a folder"), untouched=True)


@pytest.mark.parametrize("build", GENERATE_FLIST_CASES)
def test_generate_flist(build, ws, capsys, monkeypatch):
    run_and_check(generate_flist.main, ws, build(ws), capsys, monkeypatch)


# ======================================================================================================= the dataset

DATASET_CASES, dataset_case = table()


@dataclass
class Item:
    """A dataset case: the rows, the mode and size, and either the words an ImageReadError must hold or a check of
    the item."""

    rows: list
    says: tuple[str, ...] = ()
    check: Callable[[dict], None] | None = None
    mode: str = "test"
    input_size: int = 16
    cwd: Path | None = None
    keep_original: bool = False


@dataset_case
def item_truncated_jpeg(ws):
    image = ws.truncated("a.jpg")
    return Item([(image, "")], (image, "truncated"))


@dataset_case
def item_zero_byte_image(ws):
    image = ws.bytes("a.png", b"")
    return Item([(image, "")], (image, "not an image file"))


@dataset_case
def item_text_as_image(ws):
    image = ws.bytes("a.png", b"<html>not a picture</html>\n")
    return Item([(image, "")], (image, "not an image file"))


@dataset_case
def item_image_that_is_a_folder(ws):
    image = ws.folder("a.png")
    return Item([(image, "")], (image, "is a folder"))


@dataset_case
def item_missing_image(ws):
    image = str(ws.root / "gone.png")
    return Item([(image, "")], (image, "no such file"))


@dataset_case
def item_missing_mask(ws):
    image = ws.image("a.png")
    mask = str(ws.root / "gone_gt.png")
    return Item([(image, mask)], (mask, "no such file"))


@dataset_case
def item_mask_size_mismatch(ws):
    image = ws.image("a.png", 24, 32)
    mask = ws.mask("a_gt.png", 32, 24)
    return Item([(image, mask)], (mask, "mask is 32×24", image, "24×32"))


@dataset_case
def item_mask_of_zeros_and_ones(ws):
    image = ws.image("a.png")
    mask = ws.mask("a_gt.png", values=box(24, 32) // 255)
    return Item([(image, mask)], (mask, "0 and 1", "--mask-convention nonzero"))


@dataset_case
def item_all_black_mask_is_a_tampered_image_with_no_forged_pixel(ws):
    rows = [(ws.image("a.png"), ws.mask("a_gt.png", values=np.zeros((24, 32), np.uint8)))]

    def check(item):
        assert item["tampered"] is True and item["mask"].shape == (1, 24, 32) and item["mask"].sum() == 0
    return Item(rows, check=check)


@dataset_case
def item_all_white_mask_is_all_forged(ws):
    rows = [(ws.image("a.png"), ws.mask("a_gt.png", values=np.full((24, 32), 255, np.uint8)))]

    def check(item):
        assert item["tampered"] is True and bool(item["mask"].eq(1).all())
    return Item(rows, check=check)


@dataset_case
def item_sixteen_bit_grey_is_divided_by_257(ws):
    levels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4
    image = save_array(ws.path("a.png"), levels * 257)

    def check(item):
        expected = np.repeat(levels[None].astype(np.float32), 3, axis=0) / 255  # every channel the grey level
        np.testing.assert_array_equal(item["image"].numpy(), expected)
    return Item([(image, "")], check=check, input_size=8)


@dataset_case
def item_rgba_drops_the_alpha(ws):
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    image = save_array(ws.path("a.png"), pixels, "RGBA")

    def check(item):
        np.testing.assert_array_equal(item["image"].numpy(), pixels[:, :, :3].transpose(2, 0, 1) / np.float32(255))
    return Item([(image, "")], check=check, input_size=8)


@dataset_case
def item_palette_gives_the_palette_colours(ws):
    indices = np.random.default_rng(2).integers(0, 3, (8, 8), dtype=np.uint8)
    colours = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200]], dtype=np.uint8)
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette(colours.flatten().tolist())
    path = ws.path("a.png")
    picture.save(path)

    def check(item):
        np.testing.assert_array_equal(item["image"].numpy(), colours[indices].transpose(2, 0, 1) / np.float32(255))
    return Item([(str(path), "")], check=check, input_size=8)


@dataset_case
def item_cmyk_jpeg_reads_as_rgb(ws):
    path = ws.path("a.jpg")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # no cyan, full magenta and yellow, no black: red

    def check(item):
        rgb = item["image"].numpy() * 255
        np.testing.assert_allclose(rgb.mean(axis=(1, 2)), [255, 0, 0], atol=4)
    return Item([(str(path), "")], check=check, input_size=8)


@dataset_case
def item_exif_rotated_jpeg_stays_aligned_with_its_mask(ws):
    image = save_exif_rotated(ws, "a.jpg", 24, 40)
    mask = ws.mask("a_gt.png", 24, 40)

    def check(item):
        assert item["size"].tolist() == [24, 40] and item["original"].shape == (24, 40, 3)
        forged = item["mask"][0].numpy() > 0.5
        brightness = item["original"].mean(axis=2)
        assert brightness[forged].min() > 180 and brightness[~forged].max() < 80  # the bright block is the mask
    return Item([(image, mask)], check=check, keep_original=True)


@dataset_case
def item_one_by_one_and_three_by_three_images_train_with_augmentation(ws):
    values = np.zeros((3, 3), np.uint8)
    values[1, 1] = 255
    rows = [(ws.image("dot.png", 1, 1), ""), (ws.image("small.png", 3, 3), ws.mask("small_gt.png", values=values))]

    def check(item):
        assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 4, 4)
        assert torch.isfinite(item["image"]).all() and 0 <= item["image"].min() and item["image"].max() <= 1
    return Item(rows, check=check, mode="train")


@dataset_case
def item_relative_path_opens_from_the_current_folder(ws):
    ws.image("data/a.png")

    def check(item):
        assert item["path"] == "data/a.png" and item["size"].tolist() == [24, 32]
    return Item([("data/a.png", "")], check=check, cwd=ws.root)


@dataset_case
def item_relative_path_from_another_folder(ws):
    ws.image("data/a.png")
    return Item([("data/a.png", "")], ("'data/a.png'", "no such file"), cwd=ws.folder("elsewhere"))


@dataset_case
def item_non_ascii_and_space_path(ws):
    image = ws.image("мои фото/снимок 1.png", 8, 8)

    def check(item):
        expected = np.asarray(Image.open(image)).transpose(2, 0, 1) / np.float32(255)
        np.testing.assert_array_equal(item["image"].numpy(), expected)
    return Item([(image, "")], check=check, input_size=8)


@pytest.mark.parametrize("build", DATASET_CASES)
def test_dataset(build, ws, monkeypatch):
    case = build(ws)
    if case.cwd is not None:
        monkeypatch.chdir(case.cwd)
    before = snapshot(ws.top)
    dataset = ForgeryDataset(case.rows, mode=case.mode, input_size=case.input_size, keep_original=case.keep_original,
                             seed=0)
    if case.says:
        with pytest.raises(ImageReadError) as error:
            dataset[0]
        message = str(error.value)
        assert "\n" not in message
        for words in case.says:
            assert words in message, (words, message)
    else:
        for index in range(len(dataset)):
            case.check(dataset[index])
    assert changes(before, snapshot(ws.top)) == []  # reading never writes


# =========================================================================================== stage1/2 train.py

TRAIN_CASES, train_case = table()


@pytest.fixture
def fresh_loggers():
    """The training scripts' loggers keep their handlers between in-process runs (the console one bound to the
    stderr of the run that made it, the file one to its --out): every case starts and ends without them."""
    def clear():
        for stage in (1, 2):
            logger = logging.getLogger(f"mpc.stage{stage}")
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                handler.close()
    clear()
    yield
    clear()


def training_config(ws: Workspace, stage: int = 1, train_list: str = "", val_list: str = "",
                    stage1_weights: str = "") -> str:
    """A tiny run: hrt_nano at 64 px, batch 2, one step, no augmentation, no workers."""
    train_list = train_list or ws.good_list("train")
    val_list = val_list or ws.good_list("val")
    weights_line = f", STAGE1_WEIGHTS: '{stage1_weights}'" if stage1_weights else ""
    text = (f"STAGE: {stage}\n"
            f"MODEL: {{BACKBONE: hrt_nano, DROP_PATH_RATE: 0.1{weights_line}}}\n"
            f"DATA: {{INPUT_SIZE: {TRAIN_SIZE}, TRAIN_LISTS: [['{train_list}', 1]], VAL_LISTS: ['{val_list}'], "
            "NUM_WORKERS: 0, AUGMENT: False}\n"
            "TEST: {NUM_WORKERS: 0}\n"
            "SOLVER: {BATCH_SIZE: 2, MAX_STEPS: 1, VAL_EVERY: 1000, LOG_EVERY: 1, "
            f"SCHEDULER: {'plateau' if stage == 1 else 'cosine'}}}\n")
    path = ws.path(f"stage{stage}.yaml")
    path.write_text(text)
    return str(path)


def train_argv(ws: Workspace, config: str, *extra: str) -> list[str]:
    return ["--config", config, "--out", str(ws.out), "--device", "cpu", *extra]


def config_text(ws: Workspace, text: str) -> str:
    path = ws.path("config.yaml")
    path.write_text(text)
    return str(path)


@train_case
def train_config_missing(ws):
    config = str(ws.root / "nowhere.yaml")
    return Expect(train_argv(ws, config), 2, (config, "does not exist"))


@train_case
def train_config_that_is_a_folder(ws):
    config = ws.folder("configs")
    return Expect(train_argv(ws, config), 2, (config, "it is a folder"))


@train_case
def train_config_yaml_syntax_error(ws):
    config = config_text(ws, "STAGE: 1\nSOLVER: {BATCH_SIZE: 2\nMODEL: [\n")
    return Expect(train_argv(ws, config), 2, (config, "line"))


@train_case
def train_config_unknown_key(ws):
    config = config_text(ws, "STAGE: 1\nSOLVER:\n  BATCHSIZE: 2\n")
    return Expect(train_argv(ws, config), 2, (config, "SOLVER.BATCHSIZE"))


@train_case
def train_override_unknown_key(ws):
    return Expect(train_argv(ws, training_config(ws), "SOLVER.BATCHSIZE", "2"), 2, ("override", "SOLVER.BATCHSIZE"))


@train_case
def train_override_without_a_value(ws):
    return Expect(train_argv(ws, training_config(ws), "SOLVER.LR"), 2, ("KEY VALUE pairs", "['SOLVER.LR']"))


@train_case
def train_override_of_the_wrong_type(ws):
    return Expect(train_argv(ws, training_config(ws), "SOLVER.LR", "fast"), 2, ("override", "SOLVER.LR"))


@train_case
def train_negative_batch_size(ws):
    return Expect(train_argv(ws, training_config(ws), "SOLVER.BATCH_SIZE", "-2"), 2,
                  ("SOLVER.BATCH_SIZE", "must be positive", "-2"))


@train_case
def train_stage2_config_to_stage1(ws):
    config = training_config(ws, stage=2)
    return Expect(train_argv(ws, config), 1, (config, "stage-2 config", "trains stage 1"))


@train_case
def train_stage1_config_to_stage2(ws):
    config = training_config(ws, stage=1)
    return Expect(train_argv(ws, config), 1, (config, "stage-1 config", "trains stage 2"), script=stage2_train.main)


@train_case
def train_train_list_missing(ws):
    missing = str(ws.root / "lists" / "gone_10.npy")
    return Expect(train_argv(ws, training_config(ws, train_list=missing)), 2, (missing, "no such file"))


@train_case
def train_train_list_relative_to_another_folder(ws):
    ws.good_list("train")
    config = training_config(ws, train_list="lists/train_2.npy")
    return Expect(train_argv(ws, config), 2, ("'lists/train_2.npy'", "no such file"), cwd=ws.folder("elsewhere"))


@train_case
def train_train_list_of_python_objects(ws):
    path = ws.path("lists/objects_1.npy")
    np.save(path, np.array([[Payload(str(ws.root / "ran")), ""]], dtype=object), allow_pickle=True)

    def check():
        assert not (ws.root / "ran").exists()
    return Expect(train_argv(ws, training_config(ws, train_list=str(path))), 2,
                  (str(path), "not a plain string array"), check=check)


@train_case
def train_train_list_of_three_columns(ws):
    path = ws.path("lists/three_1.npy")
    image, mask = ws.pair("a")
    np.save(path, np.array([[image, mask, "extra"]]))
    return Expect(train_argv(ws, training_config(ws, train_list=str(path))), 2, (str(path), "(N, 2)"))


@train_case
def train_train_list_empty(ws):
    path = ws.path("lists/empty_0.npy")
    np.save(path, np.zeros((0, 2), dtype="<U1"))
    return Expect(train_argv(ws, training_config(ws, train_list=str(path))), 2, (str(path), "empty"))


@train_case
def train_truncated_training_image(ws):
    image, mask = ws.truncated("images/bad.png"), ws.mask("masks/bad.png")
    rows = [(image, mask), (image, mask)]
    config = training_config(ws, train_list=ws.flist("lists/bad_2.npy", rows))
    return Expect(train_argv(ws, config), 2, (image, "truncated", "DATA.SKIP_BAD"))


@train_case
def train_training_image_that_is_a_folder(ws):
    image = ws.folder("images/bad.png")
    config = training_config(ws, train_list=ws.flist("lists/bad_2.npy", [(image, ""), (image, "")]))
    return Expect(train_argv(ws, config), 2, (image, "is a folder"))


@train_case
def train_training_mask_size_mismatch(ws):
    image, mask = ws.image("images/a.png", 24, 32), ws.mask("masks/a.png", 32, 24)
    config = training_config(ws, train_list=ws.flist("lists/bad_2.npy", [(image, mask), (image, mask)]))
    return Expect(train_argv(ws, config), 2, (mask, "mask is 32×24"))


@train_case
def train_training_mask_of_zeros_and_ones(ws):
    image, mask = ws.image("images/a.png"), ws.mask("masks/a.png", values=box(24, 32) // 255)
    config = training_config(ws, train_list=ws.flist("lists/bad_2.npy", [(image, mask), (image, mask)]))
    return Expect(train_argv(ws, config), 2, (mask, "--mask-convention nonzero"))


@train_case
def train_skip_bad_at_batch_size_1_counts_and_finishes(ws):
    """Issue 10: at batch size 1 one unreadable file made a batch of nothing and killed the run. Two steps over
    [bad, good] go through the whole first epoch, so the bad file is met (once or twice) and counted."""
    rows = [(ws.truncated("images/bad.png"), ""), ws.pair("good")]
    config = training_config(ws, train_list=ws.flist("lists/mixed_2.npy", rows))

    def check():
        checkpoint = torch.load(ws.out / "latest.pth", weights_only=True)
        assert checkpoint["step"] == 2 and checkpoint["skipped_samples"] in (1, 2)
    return Expect(train_argv(ws, config, "--max-steps", "2", "SOLVER.BATCH_SIZE", "1", "DATA.SKIP_BAD", "True"), 0,
                  check=check)


@train_case
def train_skip_bad_with_no_readable_sample(ws):
    bad = ws.truncated("images/bad.png")
    config = training_config(ws, train_list=ws.flist("lists/bad_2.npy", [(bad, ""), (bad, "")]))
    return Expect(train_argv(ws, config, "DATA.SKIP_BAD", "True"), 2, ("readable",))


@train_case
def train_out_already_holds_a_run(ws):
    config = training_config(ws)
    ws.out.mkdir()
    (ws.out / "latest.pth").write_bytes(b"an earlier run's checkpoint")
    return Expect(train_argv(ws, config), 1, (str(ws.out), "--resume"), untouched=True)


@train_case
def train_resume_without_a_checkpoint(ws):
    config = training_config(ws)
    return Expect(train_argv(ws, config, "--resume"), 1, ("--resume", "no checkpoint", "latest.pth"))


def resume_from(ws: Workspace, source: Path, *extra: str) -> Expect:
    """--resume from a copy of `source` as OUT/latest.pth, which must come through unchanged."""
    config = training_config(ws)
    ws.out.mkdir()
    latest = ws.out / "latest.pth"
    latest.write_bytes(source.read_bytes())

    def check():
        assert latest.read_bytes() == source.read_bytes()
        assert not ws.weights.sentinel.exists(), "the pickle payload ran"
    return Expect(train_argv(ws, config, "--resume"), 2, (str(latest), *extra), check=check)


@train_case
def train_resume_from_a_truncated_checkpoint(ws):
    return resume_from(ws, ws.weights.truncated, "truncated")


@train_case
def train_resume_from_a_foreign_checkpoint(ws):
    return resume_from(ws, ws.weights.official_nano, "not a checkpoint of this project")


@train_case
def train_resume_from_a_pickle_payload(ws):
    return resume_from(ws, ws.weights.pickle_payload, "Python objects")


@train_case
def train_resume_from_the_other_stage(ws):
    return resume_from(ws, ws.weights.good, "stage-2 checkpoint", "stage 1")


def stage2_with(ws: Workspace, stage1_weights: str, status: int, *says: str) -> Expect:
    config = training_config(ws, stage=2, stage1_weights=stage1_weights)
    return Expect(train_argv(ws, config), status, says, check=payload_did_not_run(ws.weights),
                  script=stage2_train.main)


@train_case
def train_stage2_without_stage1_weights(ws):
    return stage2_with(ws, "", 1, "MODEL.STAGE1_WEIGHTS")


@train_case
def train_stage2_stage1_weights_missing(ws):
    missing = str(ws.root / "stage1" / "best.pth")
    return stage2_with(ws, missing, 2, missing, "file not found")


@train_case
def train_stage2_stage1_weights_truncated(ws):
    return stage2_with(ws, str(ws.weights.truncated), 2, str(ws.weights.truncated), "truncated")


@train_case
def train_stage2_stage1_weights_misshaped(ws):
    return stage2_with(ws, str(ws.weights.misshaped), 2, str(ws.weights.misshaped), "encoder.conv1.weight")


@train_case
def train_stage2_stage1_weights_with_a_pickle_payload(ws):
    return stage2_with(ws, str(ws.weights.pickle_payload), 2, str(ws.weights.pickle_payload), "Python objects")


class NeverStopping(RuntimeError):
    """Raised by the guard below instead of looping forever."""


@pytest.fixture
def loop_guard(monkeypatch):
    """A run that reads many epochs of batches without taking one step would never end (see the xfail case):
    stop it after 50 such batches with an error, so that the case fails instead of hanging the suite. (If the engine
    renames `_readable`, this fails loudly rather than letting that case hang.)"""
    readable = Trainer._readable
    state = {"empty": 0}

    def guarded(self, batch):
        ok = readable(self, batch)
        state["empty"] = 0 if ok else state["empty"] + 1
        if state["empty"] > 50:
            raise NeverStopping("50 batches in a row without a readable sample, and the run goes on")
        return ok

    monkeypatch.setattr(Trainer, "_readable", guarded)


@pytest.mark.parametrize("build", TRAIN_CASES)
def test_train(build, ws, capsys, monkeypatch, fresh_loggers, loop_guard):
    expect = build(ws)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped samples are also reported as warnings; the count is checked
        run_and_check(expect.script or stage1_train.main, ws, expect, capsys, monkeypatch)


# ===================================================================================================== stage2/test.py

SCORING_CASES, scoring_case = table()


def scoring_argv(ws: Workspace, flist: str, *extra: str, weights: Path | None = None) -> list[str]:
    return ["--weights", str(weights or ws.weights.good), "--flist", flist, "--out", str(ws.out), "--device", "cpu",
            "--num-workers", "0", "--input-size", str(SIZE), "--no-progress", *extra]


def per_image(ws: Workspace, list_name: str) -> list[dict]:
    with open(ws.out / list_name / "per_image.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def metrics(ws: Workspace, list_name: str) -> dict:
    return json.loads((ws.out / "metrics.json").read_text())["datasets"][list_name]


def weights_case(ws: Workspace, weights: Path, *says: str) -> Expect:
    return Expect(scoring_argv(ws, ws.good_list(), weights=weights), 2, (str(weights), *says),
                  check=payload_did_not_run(ws.weights))


@scoring_case
def score_weights_missing(ws):
    return weights_case(ws, ws.root / "gone.pth", "file not found")


@scoring_case
def score_weights_truncated(ws):
    return weights_case(ws, ws.weights.truncated, "truncated")


@scoring_case
def score_weights_in_a_foreign_format(ws):
    return weights_case(ws, ws.weights.foreign_format, "not a PyTorch")


@scoring_case
def score_weights_of_a_foreign_model(ws):
    return weights_case(ws, ws.weights.foreign_model, "no localization head")


@scoring_case
def score_weights_with_a_pickle_payload(ws):
    return weights_case(ws, ws.weights.pickle_payload, "Python objects")


@scoring_case
def score_weights_misshaped(ws):
    return weights_case(ws, ws.weights.misshaped, "encoder.conv1.weight")


@scoring_case
def score_weights_of_stage1(ws):
    return weights_case(ws, ws.weights.stage1, "stage-1 checkpoint")


@scoring_case
def score_list_missing(ws):
    missing = str(ws.root / "gone_3.npy")
    return Expect(scoring_argv(ws, missing), 2, (missing, "no such file"))


@scoring_case
def score_list_empty(ws):
    path = ws.path("empty_0.npy")
    np.save(path, np.zeros((0, 2), dtype="<U1"))
    return Expect(scoring_argv(ws, str(path)), 2, (str(path), "the list is empty"))


@scoring_case
def score_list_of_three_columns(ws):
    path = ws.path("three_1.npy")
    np.save(path, np.array([[*ws.pair("a"), ""]]))
    return Expect(scoring_argv(ws, str(path)), 2, (str(path), "expected shape (N, 2)"))


@scoring_case
def score_list_that_is_a_plain_pickle(ws):
    path = ws.path("pickled_1.npy")
    import pickle
    path.write_bytes(pickle.dumps([Payload(str(ws.root / "ran"))]))

    def check():
        assert not (ws.root / "ran").exists()
    return Expect(scoring_argv(ws, str(path)), 2, (str(path), "no NumPy header"), check=check)


def one_row(ws: Workspace, image: str, mask: str) -> str:
    return ws.flist("lists/one_1.npy", [(image, mask)])


@scoring_case
def score_truncated_image(ws):
    image = ws.truncated("images/a.png")
    flist = one_row(ws, image, ws.mask("masks/a.png"))
    return Expect(scoring_argv(ws, flist), 2, (image, "truncated", flist, "--skip-bad"))


@scoring_case
def score_zero_byte_image(ws):
    image = ws.bytes("images/a.png", b"")
    flist = one_row(ws, image, ws.mask("masks/a.png"))
    return Expect(scoring_argv(ws, flist), 2, (image, "not an image file", "--skip-bad"))


@scoring_case
def score_text_as_image(ws):
    image = ws.bytes("images/a.tif", b"II*\x00 and then only text")
    flist = one_row(ws, image, "")
    return Expect(scoring_argv(ws, flist), 2, (image, "--skip-bad"))


@scoring_case
def score_image_that_is_a_folder(ws):
    image = ws.folder("images/a.png")
    return Expect(scoring_argv(ws, one_row(ws, image, "")), 2, (image, "is a folder"))


@scoring_case
def score_mask_size_mismatch(ws):
    image, mask = ws.image("images/a.png", 24, 32), ws.mask("masks/a.png", 24, 31)
    return Expect(scoring_argv(ws, one_row(ws, image, mask)), 2, (mask, "mask is 24×31", "24×32"))


@scoring_case
def score_mask_of_zeros_and_ones(ws):
    image, mask = ws.image("images/a.png"), ws.mask("masks/a.png", values=box(24, 32) // 255)
    return Expect(scoring_argv(ws, one_row(ws, image, mask)), 2, (mask, "0 and 1", "--mask-convention nonzero"))


@scoring_case
def score_relative_paths_from_another_folder(ws):
    ws.pair("a")
    flist = ws.flist("lists/rel_1.npy", [("images/a.png", "masks/a.png")])
    return Expect(scoring_argv(ws, flist), 2, ("'images/a.png'", "no such file"), cwd=ws.folder("elsewhere"))


@scoring_case
def score_relative_paths_from_their_folder(ws):
    ws.pair("a")
    flist = ws.flist("lists/rel_1.npy", [("images/a.png", "masks/a.png")])

    def check():
        assert [row["path"] for row in per_image(ws, "rel_1")] == ["images/a.png"]
        assert image_size(ws.out / "rel_1" / "masks" / "a.png") == (24, 32)
    return Expect(scoring_argv(ws, flist, "--save-masks"), 0, check=check, cwd=ws.root)


@scoring_case
def score_out_already_holds_results(ws):
    ws.out.mkdir()
    (ws.out / "metrics.json").write_text("{}\n")
    return Expect(scoring_argv(ws, ws.good_list()), 1, (str(ws.out), "already holds files", "--overwrite"),
                  untouched=True)


@scoring_case
def score_out_is_a_file(ws):
    ws.out.write_text("not a folder\n")
    return Expect(scoring_argv(ws, ws.good_list()), 1, (str(ws.out), "is a file"), untouched=True)


@scoring_case(skip_as_root="a read-only --out")
def score_out_read_only(ws):
    ws.out.mkdir()
    ws.out.chmod(0o500)
    return Expect(scoring_argv(ws, ws.good_list()), 2, (str(ws.out), "cannot write"), untouched=True)


@scoring_case
def score_image_named_dot_dot_with_save_masks(ws):
    """`../../x.png` from data/a/b is data/x.png: its mask is OUT/<list>/masks/x.png and nothing is written
    anywhere else (the snapshot covers the folder above the case)."""
    ws.image("data/x.png")
    ws.mask("data/x_gt.png")
    flist = ws.flist("lists/dots_1.npy", [("../../x.png", "../../x_gt.png")])
    cwd = ws.path("data/a/b")
    cwd.mkdir()

    def check():
        written = sorted(str(p.relative_to(ws.out)) for p in ws.out.rglob("*.png"))
        assert written == [os.path.join("dots_1", "masks", "x.png")]
        assert [row["name"] for row in per_image(ws, "dots_1")] == ["x"]
    return Expect(scoring_argv(ws, flist, "--save-masks"), 0, check=check, cwd=cwd)


@scoring_case
def score_non_ascii_and_space_paths(ws):
    image = ws.image("мои данные/снимок 1.png", 20, 30)
    mask = ws.mask("мои данные/маска 1.png", 20, 30)

    def check():
        assert [row["name"] for row in per_image(ws, "list_1")] == ["снимок 1"]
        assert image_size(ws.out / "list_1" / "masks" / "снимок 1.png") == (20, 30)
    return Expect(scoring_argv(ws, ws.flist("list_1.npy", [(image, mask)]), "--save-masks"), 0, check=check)


@scoring_case
def score_duplicate_rows_are_each_scored(ws):
    image, mask = ws.pair("a")

    def check():
        rows = per_image(ws, "dup_2")
        assert [row["name"] for row in rows] == ["a", "a_2"] and rows[0]["f1_fixed"] == rows[1]["f1_fixed"]
        masks = ws.out / "dup_2" / "masks"
        assert (masks / "a.png").read_bytes() == (masks / "a_2.png").read_bytes()
    return Expect(scoring_argv(ws, ws.flist("dup_2.npy", [(image, mask), (image, mask)]), "--save-masks"), 0,
                  check=check)


@scoring_case
def score_unusual_image_layouts(ws):
    layouts = save_layouts(ws, "images")
    rows = [(path, ws.mask(f"masks/{name}.png", *size)) for name, (path, size) in layouts.items()]

    def check():
        for name, (_, size) in layouts.items():
            assert image_size(ws.out / "layouts_4" / "masks" / f"{name}.png") == size, name
    return Expect(scoring_argv(ws, ws.flist("layouts_4.npy", rows), "--save-masks"), 0, check=check)


@scoring_case
def score_one_by_one_and_three_by_three_images(ws):
    values = np.zeros((3, 3), np.uint8)
    values[1, 1] = 255
    rows = [(ws.image("images/dot.png", 1, 1), ""), (ws.image("images/small.png", 3, 3),
                                                      ws.mask("masks/small.png", values=values))]

    def check():
        assert image_size(ws.out / "tiny_2" / "masks" / "dot.png") == (1, 1)
        assert image_size(ws.out / "tiny_2" / "masks" / "small.png") == (3, 3)
        assert (metrics(ws, "tiny_2")["n_tampered"], metrics(ws, "tiny_2")["n_authentic"]) == (1, 1)
    return Expect(scoring_argv(ws, ws.flist("tiny_2.npy", rows), "--save-masks"), 0, check=check)


@scoring_case
def score_exif_rotated_jpeg(ws):
    image, mask = save_exif_rotated(ws, "images/a.jpg", 24, 40), ws.mask("masks/a.png", 24, 40)

    def check():
        assert image_size(ws.out / "exif_1" / "masks" / "a.png") == (24, 40)  # the stored grid, the mask's
    return Expect(scoring_argv(ws, ws.flist("exif_1.npy", [(image, mask)]), "--save-masks"), 0, check=check)


@scoring_case
def score_all_black_mask_is_scored_as_tampered(ws):
    image, mask = ws.image("images/a.png"), ws.mask("masks/a.png", values=np.zeros((24, 32), np.uint8))

    def check():
        result = metrics(ws, "black_1")
        assert (result["n_tampered"], result["n_authentic"]) == (1, 0)
        assert per_image(ws, "black_1")[0]["tampered"] in ("True", "1")
    return Expect(scoring_argv(ws, ws.flist("black_1.npy", [(image, mask)])), 0, check=check)


@scoring_case
def score_all_white_mask_scores_the_forged_fraction(ws):
    """With every pixel forged, F1 at the fixed threshold is 2p / (1 + p) for the predicted fraction p."""
    image, mask = ws.image("images/a.png"), ws.mask("masks/a.png", values=np.full((24, 32), 255, np.uint8))

    def check():
        predicted = np.asarray(Image.open(ws.out / "white_1" / "masks" / "a.png")) > 127
        fraction = predicted.mean()
        row = per_image(ws, "white_1")[0]
        assert float(row["f1_fixed"]) == pytest.approx(2 * fraction / (1 + fraction), abs=1e-6)
    return Expect(scoring_argv(ws, ws.flist("white_1.npy", [(image, mask)]), "--save-masks"), 0, check=check)


@scoring_case
def score_config_with_an_unknown_key(ws):
    config = config_text(ws, "DATA:\n  TEST_LIST: [a.npy]\n")
    return Expect(scoring_argv(ws, ws.good_list(), "--config", config), 2, (config, "DATA.TEST_LIST"))


@scoring_case
def score_config_with_a_yaml_syntax_error(ws):
    config = config_text(ws, "DATA:\n  TEST_LISTS: [a.npy\n")
    return Expect(scoring_argv(ws, ws.good_list(), "--config", config), 2, (config, "line"))


@pytest.mark.parametrize("build", SCORING_CASES)
def test_test_script(build, ws, capsys, monkeypatch, reuse_loaded_model):
    skip_if_root_writes(build, ws)
    run_and_check(test_script.main, ws, build(ws), capsys, monkeypatch)


# ==================================================================================================== stage2/infer.py

INFER_CASES, infer_case = table()


def infer_argv(ws: Workspace, *inputs: str, extra: tuple[str, ...] = (), weights: Path | None = None) -> list[str]:
    argv = ["--weights", str(weights or ws.weights.good), "--out", str(ws.out), "--device", "cpu",
            "--num-workers", "0", "--input-size", str(SIZE), "--no-progress", *extra]
    for path in inputs:
        argv += ["--input", path]
    return argv


def outputs_at(ws: Workspace, name: str, size: tuple[int, int]) -> None:
    assert image_size(ws.out / f"{name}_mask.png") == size, name
    assert image_size(ws.out / f"{name}_heatmap.png") == size, name


@infer_case
def infer_input_missing(ws):
    missing = str(ws.root / "gone.jpg")
    return Expect(infer_argv(ws, missing), 1, (missing, "no such file or folder"))


@infer_case
def infer_only_image_truncated(ws):
    image = ws.truncated("a.jpg")
    return Expect(infer_argv(ws, image), 1, ("failed:", image, "truncated"))


@infer_case
def infer_only_image_zero_bytes(ws):
    image = ws.bytes("a.png", b"")
    return Expect(infer_argv(ws, image), 1, ("failed:", image, "not an image file"))


@infer_case
def infer_only_image_is_text(ws):
    image = ws.bytes("a.jpg", b"Dear user, this is not a photograph.\n")
    return Expect(infer_argv(ws, image), 1, ("failed:", image, "not an image file"))


@infer_case
def infer_folder_with_one_bad_image(ws):
    """The bad image is named and skipped; the others' outputs are written."""
    bad = ws.truncated("photos/bad.png")
    ws.image("photos/good.png", 20, 24)

    def check():
        outputs_at(ws, "good", (20, 24))
        assert not list(ws.out.glob("bad*"))
    return Expect(infer_argv(ws, str(ws.root / "photos")), 0, ("failed:", bad, "truncated"), check=check)


@infer_case
def infer_folder_named_like_an_image(ws):
    folder = ws.folder("a.png")
    return Expect(infer_argv(ws, folder), 1, ("no images found", folder))


@infer_case
def infer_weights_for_another_backbone(ws):
    """An official file holds no config: built as the backbone asked (hrt_tiny, smaller to build than the default
    hrt_base), an hrt_nano file does not fit, and the message asks whether it is for another backbone."""
    weights = ws.weights.official_nano
    return Expect(infer_argv(ws, ws.image("a.png"), extra=("--backbone", "hrt_tiny"), weights=weights), 2,
                  (str(weights), "does not fit", "--backbone hrt_tiny", "another one"))


@infer_case
def infer_weights_with_a_pickle_payload(ws):
    weights = ws.weights.pickle_payload
    return Expect(infer_argv(ws, ws.image("a.png"), weights=weights), 2, (str(weights), "Python objects"),
                  check=payload_did_not_run(ws.weights))


@infer_case
def infer_weights_of_stage1(ws):
    weights = ws.weights.stage1
    return Expect(infer_argv(ws, ws.image("a.png"), weights=weights), 2, (str(weights), "stage-1 checkpoint"))


@infer_case
def infer_out_is_a_file(ws):
    ws.out.write_text("not a folder\n")
    return Expect(infer_argv(ws, ws.image("a.png")), 1, (str(ws.out), "is a file"), untouched=True)


@infer_case(skip_as_root="a read-only --out")
def infer_out_read_only(ws):
    ws.out.mkdir()
    ws.out.chmod(0o500)
    return Expect(infer_argv(ws, ws.image("a.png")), 2, (str(ws.out), "cannot write"), untouched=True)


@infer_case
def infer_exif_rotated_jpeg(ws):
    image = save_exif_rotated(ws, "a.jpg", 24, 40)
    return Expect(infer_argv(ws, image), 0, check=lambda: outputs_at(ws, "a", (24, 40)))


@infer_case
def infer_one_by_one_and_three_by_three_images(ws):
    dot, small = ws.image("dot.png", 1, 1), ws.image("small.png", 3, 3)

    def check():
        outputs_at(ws, "dot", (1, 1))
        outputs_at(ws, "small", (3, 3))
    return Expect(infer_argv(ws, dot, small), 0, check=check)


@infer_case
def infer_unusual_image_layouts(ws):
    layouts = save_layouts(ws, "photos")

    def check():
        for name, (_, size) in layouts.items():
            outputs_at(ws, name, size)
    return Expect(infer_argv(ws, str(ws.root / "photos")), 0, check=check)


@infer_case
def infer_non_ascii_and_space_name(ws):
    image = ws.image("мои фото/снимок 1.png", 20, 30)
    return Expect(infer_argv(ws, image), 0, check=lambda: outputs_at(ws, "снимок 1", (20, 30)))


@infer_case
def infer_input_named_dot_dot(ws):
    """`../../x.png` from data/a/b: the outputs are OUT/x_*, nothing is written anywhere else."""
    ws.image("data/x.png", 20, 30)
    cwd = ws.path("data/a/b")
    cwd.mkdir()

    def check():
        outputs_at(ws, "x", (20, 30))
        assert sorted(p.name for p in ws.out.iterdir()) == ["scores.csv", "x_heatmap.png", "x_mask.png"]
    return Expect(infer_argv(ws, "../../x.png"), 0, check=check, cwd=cwd)


@pytest.mark.parametrize("build", INFER_CASES)
def test_infer(build, ws, capsys, monkeypatch, reuse_loaded_model):
    skip_if_root_writes(build, ws)
    run_and_check(infer.command, ws, build(ws), capsys, monkeypatch)


# ----------------------------------------------------------------------------------- a 12000×9000 image to infer.py

LARGE_IMAGE_RUN = r"""
import json, os, resource, sys
import torch
from PIL import Image
torch.set_num_threads(1)
from stage2 import infer
from utils.entry import run_script

weights, folder, out, bytes_per_pixel = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
width, height = int(sys.argv[5]), int(sys.argv[6])
picture = Image.new("RGB", (width, height), (120, 90, 60))
picture.paste((200, 40, 40), (width // 4, height // 4, width // 2, height // 2))
picture.save(os.path.join(folder, "large.jpg"), quality=80)
del picture


def status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


start = status_bytes("VmSize")
limit = start + int(bytes_per_pixel * width * height)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    run_script(infer.command, ["--weights", weights, "--input", os.path.join(folder, "large.jpg"), "--out", out,
                               "--device", "cpu", "--num-workers", "0", "--input-size", "32", "--no-progress"])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"status": code, "start": start, "limit": limit, "peak": status_bytes("VmPeak")}))
"""


@pytest.fixture(scope="module", autouse=True)
def large_image_run(request, tmp_path_factory):
    """Started when the module starts, in the background on the second core (the other cases use one thread), and
    collected by its test; only when that test is selected."""
    if not any(item.name == "test_infer_large_image_in_bounded_memory" for item in request.session.items):
        yield None
        return
    weights = request.getfixturevalue("weights")
    folder = tmp_path_factory.mktemp("large")
    out = folder / "out"
    # glibc reserves 64 MB of address space per thread arena: that measures the allocator, not infer.py's data
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", LARGE_IMAGE_RUN, str(weights.good), str(folder), str(out), str(INFER_BYTES_PER_PIXEL),
         str(LARGE[0]), str(LARGE[1])], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process, folder, out
    if process.poll() is None:
        process.kill()
        process.wait()


def test_infer_large_image_in_bounded_memory(large_image_run):
    process, folder, out = large_image_run
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    width, height = LARGE
    assert report["status"] == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "failed" not in stderr
    assert image_size(out / "large_mask.png") == (height, width)
    assert image_size(out / "large_heatmap.png") == (height, width)
    with open(out / "scores.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert (row["name"], int(row["height"]), int(row["width"])) == ("large", height, width)
    assert sorted(p.name for p in folder.iterdir()) == ["large.jpg", "out"]  # nothing written beside the input
    print(f"infer.py on {width}×{height}: peak address space {(report['peak'] - report['start']) / 2**30:.2f} GiB "
          f"over the start ({(report['peak'] - report['start']) / (width * height):.1f} bytes a pixel), limit "
          f"{INFER_BYTES_PER_PIXEL} bytes a pixel")

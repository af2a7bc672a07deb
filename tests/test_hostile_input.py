"""Hostile and messy input (issue 16), each class defended where it is owned:

1. headers claiming huge sizes (`datasets.io`: refused before decoding; memory bounded under RLIMIT_AS),
2. paths that are not regular files (`datasets.io`, `datasets.flist`, `stage2/infer.py`, the checkpoint and pairs
   readers: named and refused, never opened),
3. masks in other conventions (`datasets.io.read_mask` for training and testing, `datasets.flist.check_rows` for
   generate_flist: refused with the conversion to use, never scored as all-authentic),
4. weights holding NaN or infinity (`models.checkpoint.read_checkpoint`),
7. file names from other systems (`utils.evaluation.loop`: one escaping for file names, CSV and JSON),
8. pair lists saved by spreadsheet programs (`datasets.adapters.pairs_from_file`),
9. writes that fail half-way (`utils.files.atomic_output`: `OutputWriteError` naming the output, no temporary left).

Every case asserts the error type, that the message names the file and the problem, and that no input changed.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import generate_flist
from datasets import adapters, io
from datasets.adapters import AdapterError
from datasets.dataset import CatchReadErrors, ForgeryDataset, collate_readable
from datasets.flist import FileListError, check_rows, mask_values, read_flist
from models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from models import build_stage2_model
from models.loading import load_checkpoint
from stage2 import infer
from utils.config import load_config
from utils.errors import UserError
from utils.evaluation.loop import UniqueNames, escape_text, evaluate, json_safe, safe_file_name, write_csv
from utils.files import OutputWriteError, atomic_output, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 40)


# ---------------------------------------------------------------------------------------------------------- helpers

def snapshot(*roots) -> dict:
    """Every file under `roots` (and each root itself): kind, size, modification time and, for regular files, the
    SHA-256 of the content; compared before and after to show that no input changed."""
    state = {}
    for root in map(Path, roots):
        for path in [root, *(root.rglob("*") if root.is_dir() else [])]:
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):  # a folder is its entries, listed here one by one
                state[str(path)] = "folder"
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else ""
            state[str(path)] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, digest)
    return state


def forged_region() -> np.ndarray:
    region = np.zeros(SHAPE, dtype=bool)
    region[8:20, 10:26] = True
    return region


def save_image(path: Path, seed: int = 0, shape=SHAPE) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
    return path


def save_mask(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(pixels, mode=mode).save(path) if mode else Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def fuse():
    """A test that opens a named pipe by mistake would block forever: fail it instead."""
    def blow(signum, frame):
        raise TimeoutError("blocked on a special file: it was opened")
    previous = signal.signal(signal.SIGALRM, blow)
    signal.setitimer(signal.ITIMER_REAL, 30)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


# The subprocesses import single modules of `datasets` without the package's __init__, which imports torch: a fresh
# torch import costs seconds, more than everything else these tests do.
LIGHT_PACKAGES = """
import os, sys, types
package = types.ModuleType("datasets")
package.__path__ = [os.path.join(os.getcwd(), "datasets")]
sys.modules["datasets"] = package
"""


def run_python(script: str, *args, timeout: int = 120) -> dict:
    """Run `script` in a fresh interpreter from the repository root; it prints one JSON object."""
    done = subprocess.run([sys.executable, "-c", LIGHT_PACKAGES + script, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------- 1. headers claiming huge sizes, written by hand per format

def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)  # BITMAPINFOHEADER, 24-bit
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 14 + 40) + info + bytes(64)


def gif_header(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def jpeg_header(width: int, height: int) -> bytes:
    def segment(marker: int, data: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(data) + 2) + data
    frame = struct.pack(">BHHB", 8, height, width, 3) + b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    scan = bytes([3]) + b"".join(bytes([i, 0]) for i in (1, 2, 3)) + b"\x00\x3f\x00"
    return b"\xff\xd8" + segment(0xC0, frame) + segment(0xDA, scan) + bytes(64) + b"\xff\xd9"


def tiff_header(width: int, height: int) -> bytes:
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 9 * 12 + 4),
               (277, 3, 1), (278, 4, height), (279, 4, 64)]  # 8-bit grey, one uncompressed strip
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(64)


def webp_header(width: int, height: int) -> bytes:
    canvas = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")  # VP8X chunk
    frame = b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", width & 0x3FFF, height & 0x3FFF) + bytes(32)
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + canvas + b"VP8 " + struct.pack("<I", len(frame)) + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


# (writer, claimed width, claimed height): each far above 200 megapixels, the largest its header can say or 100000².
HUGE_HEADERS = {"png": (png_header, 100_000, 100_000), "bmp": (bmp_header, 100_000, 100_000),
                "gif": (gif_header, 65_535, 65_535), "jpg": (jpeg_header, 65_535, 65_535),
                "tif": (tiff_header, 100_000, 100_000), "webp": (webp_header, 16_384, 16_384)}

BOUNDED_READ = """
import json, resource, sys
from datasets import io

def address_space():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

limit = address_space() + (256 << 20)  # what the interpreter holds now, plus 256 MB
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

def attempt(path):
    try:
        io.read_image(path)
        return "decoded"
    except MemoryError:
        return "MemoryError"
    except io.ImageReadError as error:
        return str(error)

results = {path: attempt(path) for path in sys.argv[2:]}
io.MAX_IMAGE_PIXELS = 10 ** 10  # the control: the limit raised, a 1.2 GB decode must run out of the address space
results["control"] = attempt(sys.argv[1])
print(json.dumps(results))
"""


def test_huge_headers_are_refused_before_decoding_with_memory_bounded(tmp_path):
    """Each format's header, written by hand, claims gigapixels over 64 bytes of data. Under an address-space limit
    of 256 MB above the interpreter's, every one is refused naming the file and its claimed size; the control (the
    pixel limit raised, a 20000×20000 PNG) runs out of memory, so the limit is what keeps the reader bounded."""
    paths = []
    for extension, (write, width, height) in HUGE_HEADERS.items():
        path = tmp_path / f"claims_huge.{extension}"
        path.write_bytes(write(width, height))
        paths.append(path)
    control = tmp_path / "control.png"
    control.write_bytes(png_header(20_000, 20_000))
    before = snapshot(tmp_path)

    results = run_python(BOUNDED_READ, control, *paths)

    for path in paths:
        _, width, height = HUGE_HEADERS[path.suffix[1:]]
        assert results[str(path)].startswith(f"cannot read '{path}': its header claims {width}×{height} pixels"), \
            results[str(path)]
        assert "MPC_MAX_IMAGE_PIXELS" in results[str(path)]
    assert results["control"] == "MemoryError"
    assert snapshot(tmp_path) == before


def test_pixel_limit_default_setting_and_environment(tmp_path, monkeypatch):
    """The default admits NIST16's 4000×3264 and a 12000×9000 photograph (header only); the environment variable
    lowers or raises it, the module setting overrides both, and a malformed value is a user error naming it."""
    monkeypatch.delenv(io.MAX_IMAGE_PIXELS_ENV, raising=False)
    assert io.max_image_pixels() == 200_000_000
    for width, height in ((4000, 3264), (12000, 9000)):
        header = tmp_path / f"{width}x{height}.png"
        header.write_bytes(png_header(width, height))
        assert io.image_size(header) == (height, width)
    image = save_image(tmp_path / "forty.png", shape=(40, 40))  # 1600 pixels
    before = snapshot(tmp_path)

    monkeypatch.setenv(io.MAX_IMAGE_PIXELS_ENV, "1500")
    with pytest.raises(io.ImageReadError, match=r"claims 40×40 pixels .* limit of 0\.0015 megapixels") as error:
        io.read_image(image)
    assert error.value.path == str(image)
    with pytest.raises(io.ImageReadError, match="claims 12000×9000"):
        io.image_size(tmp_path / "12000x9000.png")
    monkeypatch.setenv(io.MAX_IMAGE_PIXELS_ENV, "1600")
    assert io.read_image(image).shape == (40, 40, 3)
    monkeypatch.setattr(io, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(io.ImageReadError, match="limit of 0.001 megapixels"):
        io.read_mask(image)
    monkeypatch.setattr(io, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setenv(io.MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(UserError, match="MPC_MAX_IMAGE_PIXELS='lots'"):
        io.read_image(image)
    assert snapshot(tmp_path) == before


# ------------------------------------------- 1 and 3 under skip-bad: refused files are skipped and counted, not fatal

def test_refused_files_are_skipped_and_counted_in_testing_and_training(tmp_path):
    """A huge header and a mask drawn in red: with skip-bad the test loop scores the good row and lists both with
    their message; the training collation counts them; without skip-bad the first one stops the run, named."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(30_000, 30_000))
    red = np.zeros((*SHAPE, 3), dtype=np.uint8)
    red[forged_region()] = (255, 0, 0)
    rows = [(str(huge), ""),
            (str(save_image(tmp_path / "a.png", 1)), str(save_mask(tmp_path / "a_red.png", red))),
            (str(save_image(tmp_path / "b.png", 2)), str(save_mask(tmp_path / "b_gt.png",
                                                                    forged_region().astype(np.uint8) * 255)))]
    before = snapshot(tmp_path)

    def predict(images):
        return torch.full((images.shape[0], images.shape[2] // 4, images.shape[3] // 4), 0.9)

    dataset = ForgeryDataset(rows, mode="test", input_size=32)
    results = evaluate(predict, dataset, torch.device("cpu"), progress=False, skip_bad=True)
    assert [row["path"] for row in results["per_image"]] == [rows[2][0]]
    skipped = dict(results["skipped"])
    assert set(skipped) == {str(huge), rows[1][1]}
    assert "claims 30000×30000 pixels" in skipped[str(huge)]
    assert "red channel" in skipped[rows[1][1]]
    with pytest.raises(io.ImageReadError, match="claims 30000×30000"):
        evaluate(predict, dataset, torch.device("cpu"), progress=False)

    training = CatchReadErrors(ForgeryDataset(rows, mode="train", input_size=32, augment=False))
    batch = collate_readable([training[i] for i in range(3)])
    assert [bad for bad, _ in batch["bad_items"]] == [str(huge), rows[1][1]]
    assert batch["image"].shape[0] == 1
    assert snapshot(tmp_path) == before


# -------------------------------------------------------------------------------- 2. paths that are not regular files

@pytest.fixture
def special_files(tmp_path):
    """A named pipe, a socket, a character device and a folder, each with an image's name."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.png"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    folder = tmp_path / "folder.png"
    folder.mkdir()
    yield {"named pipe (FIFO)": fifo, "socket": sock_path, "character device": Path("/dev/zero"), "folder": folder}
    server.close()


READERS = {"read_image": io.read_image, "read_mask": io.read_mask, "image_size": io.image_size}


@pytest.mark.parametrize("reader", READERS)
def test_image_readers_refuse_special_files_without_opening_them(special_files, reader, tmp_path, fuse):
    before = snapshot(tmp_path)
    for kind, path in special_files.items():
        with pytest.raises(io.ImageReadError) as error:
            READERS[reader](path)
        assert str(error.value) == f"cannot read '{path}': is a {kind}, not a regular file (refused without " \
                                   "opening it)"
    assert snapshot(tmp_path) == before


def test_list_checker_script_inputs_and_other_readers_refuse_special_files(special_files, tmp_path, fuse, capsys):
    fifo, folder = special_files["named pipe (FIFO)"], special_files["folder"]
    good = save_image(tmp_path / "good.png")
    mask = save_mask(tmp_path / "good_gt.png", forged_region().astype(np.uint8) * 255)
    fifo_list = tmp_path / "list.npy"
    os.mkfifo(fifo_list)
    before = snapshot(tmp_path)

    report = check_rows([(str(fifo), str(mask)), (str(good), str(fifo)), (str(good), str(special_files["socket"]))])
    found = {(p.row, p.kind, p.path) for p in report.errors}
    assert found == {(0, "not a regular file", str(fifo)), (1, "not a regular file", str(fifo)),
                     (2, "not a regular file", str(special_files["socket"]))}
    assert all("named pipe" in p.detail for p in report.errors if p.path == str(fifo))

    with pytest.raises(SystemExit, match=f"--input {fifo}: is a named pipe"):
        infer.find_images([str(fifo)])
    assert infer.find_images([str(tmp_path)]) == [str(good), str(mask)]  # the pipe and the folder are passed over

    with pytest.raises(FileListError, match="list.npy': is a named pipe"):
        read_flist(fifo_list)
    with pytest.raises(CheckpointError, match=f"{fifo}: is a named pipe"):
        read_checkpoint(fifo)
    with pytest.raises(AdapterError, match="pairs file .*folder.png': is a folder"):
        adapters.pairs_from_file(folder)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------ 3. masks in other conventions

def coloured(colour) -> np.ndarray:
    pixels = np.zeros((*SHAPE, 3), dtype=np.uint8)
    pixels[forged_region()] = colour
    return pixels


def with_alpha(rgb_value: int) -> np.ndarray:
    pixels = np.full((*SHAPE, 4), rgb_value, dtype=np.uint8)
    pixels[:, :, 3] = np.where(forged_region(), 255, 0)
    return pixels


# name: (pixels, Pillow mode or None, words the message must hold, the conversion it must offer)
MISREAD_MASKS = {
    "red_on_black": (coloured((255, 0, 0)), None, "red channel", "--mask-convention colour"),
    "green_on_black": (coloured((0, 200, 0)), None, "green channel", "--mask-convention colour"),
    "grey_with_differing_channels": (coloured((210, 205, 90)), None, "red and green channel",
                                     "--mask-convention colour"),
    "shape_in_alpha_over_black": (with_alpha(0), "RGBA", "alpha channel draws a shape of 192 opaque pixels",
                                  "--mask-convention alpha"),
    "shape_in_alpha_over_white": (with_alpha(255), "RGBA", "alpha channel", "--mask-convention alpha"),
    "zero_one": (forged_region().astype(np.uint8), "L", "values are only 0 and 1 (192 non-zero pixels)",
                 "--mask-convention nonzero"),
    "zero_one_16_bit": (forged_region().astype(np.uint16), None, "values are only 0 and 1",
                        "--mask-convention nonzero"),
}


@pytest.mark.parametrize("name", MISREAD_MASKS)
def test_masks_the_rule_would_misread_are_refused_everywhere(name, tmp_path):
    """The same file is refused by the reader training and testing use and reported by generate_flist's check,
    each naming the file, what was found and the conversion to use."""
    pixels, mode, words, conversion = MISREAD_MASKS[name]
    mask = save_mask(tmp_path / f"{name}.png", pixels, mode)
    image = save_image(tmp_path / "image.png")
    before = snapshot(tmp_path)

    with pytest.raises(io.ImageReadError) as error:
        io.read_mask(mask)
    message = str(error.value)
    assert message.startswith(f"cannot read '{mask}': ") and words in message and conversion in message
    with pytest.raises(io.ImageReadError, match=conversion):
        ForgeryDataset([(str(image), str(mask))], mode="train", input_size=32, augment=False)[0]
    report = check_rows([(str(image), str(mask))])
    assert [(p.kind, p.path, p.row) for p in report.errors] == [("mask in another convention", str(mask), 0)]
    assert words in report.errors[0].detail and conversion in report.errors[0].detail
    assert snapshot(tmp_path) == before


# Masks the rule reads as their maker meant: they must pass untouched (the reference is OpenCV's official reading).
READ_AS_MEANT = {
    "blue_on_black": (coloured((0, 0, 255)), None),
    "white_on_black_rgb": (coloured((255, 255, 255)), None),
    "opaque_rgba": (np.dstack([coloured((255, 255, 255)), np.full(SHAPE, 255, np.uint8)]), "RGBA"),  # CASIA v2
    "shape_in_alpha_matching_colour": (np.dstack([coloured((255, 255, 255)),
                                                  np.where(forged_region(), 255, 0).astype(np.uint8)]), "RGBA"),
}


@pytest.mark.parametrize("name", READ_AS_MEANT)
def test_masks_the_rule_reads_as_meant_pass(name, tmp_path):
    pixels, mode = READ_AS_MEANT[name]
    mask = save_mask(tmp_path / f"{name}.png", pixels, mode)
    official = cv2.imread(str(mask), cv2.IMREAD_COLOR)[:, :, 0] > 127
    assert np.array_equal(official, forged_region())
    assert np.array_equal(io.read_mask(mask), official)
    assert check_rows([(str(save_image(tmp_path / "image.png")), str(mask))]).problems == []


def test_grey_jpeg_mask_and_truly_empty_mask_keep_their_meaning(tmp_path):
    """A grey mask stored as colour JPEG (channels differ by a few levels at the borders) reads as OpenCV reads it;
    an all-black file is not "another convention": the check calls it empty, the dataset scores it as the official
    test does (a tampered image with an empty mask)."""
    jpeg = tmp_path / "grey.jpg"
    Image.fromarray(np.repeat((forged_region() * 255).astype(np.uint8)[:, :, None], 3, axis=2)).save(jpeg, quality=75)
    assert np.array_equal(io.read_mask(jpeg), cv2.imread(str(jpeg), cv2.IMREAD_COLOR)[:, :, 0] > 127)
    black = save_mask(tmp_path / "black.png", np.zeros(SHAPE, np.uint8), "L")
    image = save_image(tmp_path / "image.png")
    assert [p.kind for p in check_rows([(str(image), str(black))]).errors] == ["mask empty"]
    item = ForgeryDataset([(str(image), str(black))], mode="test", input_size=32)[0]
    assert item["tampered"] and item["mask"].sum() == 0


def test_mask_conventions_convert_to_the_drawn_region(tmp_path, capsys):
    """The conversions the messages offer give back the region drawn, by hand: directly and through
    generate_flist.py, whose converted 0/255 masks then pass the check."""
    region = forged_region()
    (tmp_path / "masks").mkdir()
    red = save_mask(tmp_path / "masks" / "x.png", coloured((255, 0, 0)))
    zero_one = save_mask(tmp_path / "zero_one.png", region.astype(np.uint8), "L")
    alpha = save_mask(tmp_path / "alpha.png", with_alpha(0), "RGBA")
    for path, kind in ((red, "colour"), (zero_one, "nonzero"), (alpha, "alpha")):
        assert np.array_equal(mask_values(path, kind), np.where(region, 255, 0)), kind
    (tmp_path / "images").mkdir()
    save_image(tmp_path / "images" / "x.png")
    before = snapshot(tmp_path / "images", tmp_path / "masks")

    out = tmp_path / "lists"
    args = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--name", "Red", "--out",
            str(out), "--no-progress"]
    assert generate_flist.main(args) == 1  # refused as it is
    assert "mask in another convention" in capsys.readouterr().out
    assert generate_flist.main(args + ["--mask-convention", "colour"]) == 0
    rows = read_flist(out / "Red_1.npy")
    assert np.array_equal(np.asarray(Image.open(rows[0, 1])), np.where(region, 255, 0))
    assert check_rows(rows).problems == []
    assert snapshot(tmp_path / "images", tmp_path / "masks") == before


# ------------------------------------------------------------------------------ 4. weights holding NaN or infinity

def test_weights_with_nan_or_infinity_are_refused_naming_the_tensor(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    state["1.weight"][0, 2] = float("nan")
    official_style = tmp_path / "nan.pth"
    torch.save(state, official_style)
    ours = tmp_path / "inf.pth"
    good_state = model.state_dict()
    save_checkpoint({"stage": 2, "model": good_state, "best_score": float("-inf"), "step": 3,
                     "optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, float("inf"), -float("inf")])}}}},
                    ours)
    before = snapshot(tmp_path)

    with pytest.raises(CheckpointError) as error:
        read_checkpoint(official_style)
    assert str(error.value).startswith(f"{official_style}: tensor '1.weight' holds 1 NaN value(s) out of 4;")
    with pytest.raises(CheckpointError, match=r"tensor '1\.weight' holds 1 NaN"):
        load_checkpoint(model, official_style)
    with pytest.raises(CheckpointError, match=r"inf.pth: tensor 'optimizer\.state\.0\.exp_avg' holds 2 infinite"):
        read_checkpoint(ours, mmap=True)
    assert snapshot(tmp_path) == before


def test_finite_weights_with_infinite_plain_numbers_and_half_precision_load(tmp_path):
    """Only tensors are checked: a best score of -inf (no validation yet) is a plain float and is kept; integer
    tensors (RNG states) are left alone; half and bfloat16 tensors are checked too."""
    path = tmp_path / "fine.pth"
    save_checkpoint({"stage": 1, "model": {"w": torch.ones(3, dtype=torch.float16)}, "best_score": float("-inf"),
                     "rng": torch.arange(5, dtype=torch.uint8)}, path)
    assert read_checkpoint(path)["best_score"] == float("-inf")
    broken = tmp_path / "bf16.pth"
    torch.save({"w": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)}, broken)
    with pytest.raises(CheckpointError, match="tensor 'w' holds 1 NaN"):
        read_checkpoint(broken)


# ------------------------------------------------------------------------------- 7. file names from other systems

def test_names_from_other_systems_are_escaped_once_and_kept_apart():
    """Expected names written by hand: undecodable bytes and control characters as %XX, a leading '-' or '.'
    escaped, cut to 200 bytes on a character boundary, the escaping idempotent, collisions numbered."""
    undecodable = os.fsdecode(b"photo\xff\xfe.jpg")
    names = UniqueNames()
    assert names.for_image(f"/data/{undecodable}") == "photo%FF%FE"
    assert names.for_image("/data/two\nlines.png") == "two%0Alines"
    assert names.for_image("/data/two%0Alines.png") == "two%0Alines_2"  # the same escaped name: numbered
    assert names.for_image("/data/-rf.png") == "%2Drf"
    assert names.for_image("/data/.hidden.png") == "%2Ehidden"
    assert names.for_image("/data/tab\there\u2028.png") == "tab%09here%u2028"
    assert names.for_image("/data/café – ok.png") == "café – ok"  # printable Unicode is left alone
    long_name = names.for_image("/data/" + "é" * 150 + ".png")
    assert long_name == "é" * 100 and len(long_name.encode()) == 200
    for name in ("photo%FF%FE", "two%0Alines", "%2Drf"):
        assert safe_file_name(name) == name and escape_text(name) == name


@pytest.mark.usefixtures("one_thread")
def test_one_bad_name_never_loses_the_other_images_results(tmp_path):
    """infer.py on a folder whose names hold undecodable bytes, a newline and a leading dash: every image gets its
    mask and heat map under the escaped name; scores.csv is valid UTF-8 with one row per image, names and paths
    escaped the same way; a CSV and JSON written from the same rows agree."""
    weights = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    save_checkpoint({"stage": 2, "model": build_stage2_model("hrt_nano", head="catnet").state_dict(),
                     "config": load_config(None, ["STAGE", "2", "MODEL.BACKBONE", "hrt_nano"]).dump()}, weights)
    folder = tmp_path / "photos"
    folder.mkdir()
    names = {os.fsdecode(b"bad\xff\xfename.png"): "bad%FF%FEname", "two\nlines.png": "two%0Alines",
             "-rf.png": "%2Drf", "normal.png": "normal"}
    for seed, file_name in enumerate(names):
        save_image(folder / file_name, seed)
    before = snapshot(folder)
    out = tmp_path / "out"

    summary = infer.main(["--input", str(folder), "--weights", str(weights), "--out", str(out), "--device", "cpu",
                          "--num-workers", "0", "--input-size", "64", "--no-progress"])

    assert sorted(summary["processed"]) == sorted(names.values()) and not summary["failed"]
    for escaped in names.values():
        assert (out / f"{escaped}_mask.png").is_file() and (out / f"{escaped}_heatmap.png").is_file()
    text = (out / "scores.csv").read_bytes().decode("utf-8")  # strict: raises on anything that is not UTF-8
    rows = list(csv.DictReader(text.splitlines()))
    paths = {"bad%FF%FEname": "bad%FF%FEname.png", "two%0Alines": "two%0Alines.png", "%2Drf": "-rf.png",
             "normal": "normal.png"}  # a path never starts with '-': only control characters and bytes escaped
    assert {row["name"]: row["path"] for row in rows} == {name: str(folder / path) for name, path in paths.items()}
    assert snapshot(folder) == before

    table = tmp_path / "table.csv"
    write_csv(table, [{"name": "x", "path": str(folder / os.fsdecode(b"bad\xff\xfename.png"))}], ("name", "path"))
    as_json = json.loads(json.dumps(json_safe({"skipped": [[os.fsdecode(b"a\xff\nb"), "problem"]]})))
    assert list(csv.DictReader(table.open()))[0]["path"] == str(folder / "bad%FF%FEname.png")
    assert as_json == {"skipped": [["a%FF%0Ab", "problem"]]}


# ---------------------------------------------------------------------------- 8. pair lists from spreadsheet programs

SPREADSHEET_FILES = {
    "excel_csv_utf8_bom_crlf": ("\ufeffimage,mask\r\na.png,a_gt.png\r\nb.png\r\n\r\n\r\n".encode(),
                                [("a.png", "a_gt.png")], ["b.png"]),
    "semicolons_trailing_cells": (b"image;mask\r\na.png;a_gt.png;;\r\n;;\r\nb.png;\r\n",
                                  [("a.png", "a_gt.png")], ["b.png"]),
    "quoted_fields_holding_separators": (b'"x, 1.png","m;1.png"\n"y y.png",\n',
                                         [("x, 1.png", "m;1.png")], ["y y.png"]),
    "tab_separated_with_spaces_and_commas": ("a b.png\tm, 1.png\n".encode(), [("a b.png", "m, 1.png")], []),
    "utf16_unicode_text": ("a.png\tm é.png\r\n".encode("utf-16"), [("a.png", "m é.png")], []),
    "old_mac_line_ends_and_spaces": (b'a.png   "m 1.png"\rc.png d.png\r', [("a.png", "m 1.png"), ("c.png", "d.png")],
                                     []),
}


@pytest.mark.parametrize("name", SPREADSHEET_FILES)
def test_pair_lists_saved_by_spreadsheets_read_correctly(name, tmp_path):
    content, pairs, authentic = SPREADSHEET_FILES[name]
    path = tmp_path / "pairs.csv"
    path.write_bytes(content)
    listing = adapters.pairs_from_file(path)
    assert [(p.image, p.mask) for p in listing.pairs] == [(str(tmp_path / i), str(tmp_path / m)) for i, m in pairs]
    assert listing.authentic == [str(tmp_path / image) for image in authentic]
    assert path.read_bytes() == content


REFUSED_PAIR_FILES = {
    "mixed_separators": (b"a.png,b.png\nc.png;d.png\n", "both commas (line 1) and semicolons (line 2)"),
    "latin1_text": ("caf\xe9.png,m.png\n".encode("latin-1"), "line 1: not UTF-8 text (byte 0xE9)"),
    "unclosed_quote": (b'"a.png,b.png\n', "line 1: cannot be split into fields"),
    "three_paths": (b"a.png;b.png;c.png\n", "line 1: expected 'image;mask' or an image alone (semicolon-separated)"),
}


@pytest.mark.parametrize("name", REFUSED_PAIR_FILES)
def test_pair_lists_that_cannot_be_read_are_refused_saying_why(name, tmp_path):
    content, words = REFUSED_PAIR_FILES[name]
    path = tmp_path / "pairs.csv"
    path.write_bytes(content)
    with pytest.raises(AdapterError) as error:
        adapters.pairs_from_file(path)
    assert str(error.value).startswith(f"pairs file '{path}'") and words in str(error.value)
    assert path.read_bytes() == content


def test_generate_flist_reads_a_semicolon_csv_from_excel(tmp_path, capsys):
    save_image(tmp_path / "a b.png")
    save_mask(tmp_path / "a b_gt.png", forged_region().astype(np.uint8) * 255)
    save_image(tmp_path / "real.png", 3)
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes("\ufeffImage;Mask\r\na b.png;a b_gt.png\r\nreal.png;\r\n;\r\n".encode())
    before = snapshot(tmp_path)
    assert generate_flist.main(["--pairs", str(pairs), "--name", "Excel", "--out", str(tmp_path / "out"),
                                "--no-progress"]) == 0
    rows = read_flist(tmp_path / "out" / "Excel_2.npy")
    assert [tuple(row) for row in rows] == [(str(tmp_path / "a b.png"), str(tmp_path / "a b_gt.png")),
                                            (str(tmp_path / "real.png"), "")]
    after = snapshot(tmp_path)
    assert {path: state for path, state in after.items() if path in before and path != str(tmp_path)} == \
        {path: state for path, state in before.items() if path != str(tmp_path)}


# ---------------------------------------------------------------------------------------- 9. writes that fail half-way

FILE_SIZE_LIMIT = """
import json, resource, sys
from pathlib import Path
import numpy as np
from datasets.flist import write_flist
from utils.files import OutputWriteError, atomic_write_bytes, atomic_write_text

folder = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))  # 1 MB
writes = {"blob.bin": lambda path: atomic_write_bytes(path, bytes(2 << 20)),
          "per_image.csv": lambda path: atomic_write_text(path, ("x" * 100 + "\\n") * 20000),
          "L_20000.npy": lambda path: write_flist([("x" * 30, "")] * 20000, path.parent, "L")}
results = {}
for name, write in writes.items():
    try:
        write(folder / name)
        results[name] = "written"
    except OutputWriteError as error:
        results[name] = [str(error), error.path, error.errno]
    except BaseException as error:
        results[name] = [type(error).__name__, str(error)]
print(json.dumps(results))
"""


OUTPUTS = ("L_20000.npy", "blob.bin", "per_image.csv")


def test_writes_over_the_file_size_limit_fail_naming_the_output_and_keep_the_old_file(tmp_path):
    """Under RLIMIT_FSIZE (1 MB) in a subprocess, three writers of 2 MB or more: raw bytes, text and a file list
    (numpy). Each raises OutputWriteError naming its output with "File too large"; the earlier file at the path is
    whole and no temporary remains."""
    folder = tmp_path / "run"
    folder.mkdir()
    for name in OUTPUTS:
        (folder / name).write_bytes(b"the earlier, finished version")
    results = run_python(FILE_SIZE_LIMIT, folder)
    for name in OUTPUTS:
        message, path, errno = results[name]
        assert (message, path, errno) == (f"cannot write '{folder / name}': File too large", str(folder / name), 27)
        assert (folder / name).read_bytes() == b"the earlier, finished version"
    assert sorted(p.name for p in folder.iterdir()) == list(OUTPUTS)


def test_a_checkpoint_over_the_file_size_limit_fails_naming_it_not_with_torchs_message(tmp_path):
    """torch.save reports a failed write as an unrelated RuntimeError ("unexpected pos ..."); the writer names the
    checkpoint and the system's reason instead. Run in this process (a fresh torch import costs more than the rest
    of this file): the soft limit is lowered around the one write and restored."""
    path = tmp_path / "latest.pth"
    path.write_bytes(b"the earlier, finished checkpoint")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(OutputWriteError) as error:
            save_checkpoint({"stage": 2, "model": {"w": torch.zeros(1 << 19)}}, path)  # 2 MB of tensor
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(error.value) == f"cannot write '{path}': File too large" and error.value.path == str(path)
    assert path.read_bytes() == b"the earlier, finished checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


READ_ONLY_MIDWAY = """
import json, os, sys
from pathlib import Path
from utils.files import OutputWriteError, atomic_write_text

folder = Path(sys.argv[1])
if os.geteuid() == 0:  # permission bits do not stop root: become an ordinary user, owner of the folder
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
atomic_write_text(folder / "first.csv", "done before\\n")
os.chmod(folder, 0o555)  # the folder turns read-only in the middle of the run
try:
    atomic_write_text(folder / "second.csv", "never\\n")
    result = "written"
except OutputWriteError as error:
    result = [str(error), error.path, isinstance(error, OSError)]
os.chmod(folder, 0o755)
print(json.dumps({"second": result, "left": sorted(os.listdir(folder)), "first": (folder / "first.csv").read_text()}))
"""


def test_a_folder_turning_read_only_midway_fails_naming_the_output(tmp_path):
    """The run wrote one file, then its folder became read-only: the next write raises OutputWriteError (an OSError)
    naming that output; the first file is intact and nothing else is left. The folder is made outside pytest's
    private temporary folder so that an ordinary user can reach it when the tests run as root."""
    root = Path(tempfile.mkdtemp(prefix="mpc_read_only_"))
    try:
        root.chmod(0o755)
        folder = root / "out"
        folder.mkdir()
        if os.geteuid() == 0:
            os.chown(folder, 65534, 65534)
        result = run_python(READ_ONLY_MIDWAY, folder)
        assert result["second"] == [f"cannot write '{folder / 'second.csv'}': Permission denied",
                                    str(folder / "second.csv"), True]
        assert result["left"] == ["first.csv"] and result["first"] == "done before\n"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_other_errors_of_the_writing_block_pass_unchanged_and_leave_nothing(tmp_path):
    """Only failed writes become OutputWriteError: a block that fails for its own reason keeps its exception, and
    the previous file and the folder are as they were."""
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "{}\n")
    before = snapshot(tmp_path)
    with pytest.raises(FileNotFoundError):
        with atomic_output(target) as stream:
            stream.write(b"partial")
            open(tmp_path / "missing-input.txt")
    assert snapshot(tmp_path) == before
    (tmp_path / "file.txt").write_text("a file where the run expects its folder")
    with pytest.raises(OutputWriteError, match=f"cannot write '{tmp_path / 'file.txt' / 'x.csv'}': "):
        atomic_write_text(tmp_path / "file.txt" / "x.csv", "never")  # the folder cannot be made: named as well

"""File lists: the official `.npy` (N, 2) format and IMDLBenCo's JSON lists, written atomically and checked row by row.

A file list is a NumPy unicode array of shape (N, 2): (image path, mask path), one row per sample; an empty mask
path means an authentic image (an all-zero mask). Lists are saved as `<name>_<N>.npy`, as the official scripts do.

The same rows can be a `.json` list as IMDLBenCo's `JsonDataset` reads it: a JSON array of `[image path, mask path]`
pairs where the mask `"Negative"` marks an authentic image. `read_flist` reads both (by the file's extension) and
returns the same array; `"Negative"` becomes ''.

Relative paths in a list are relative to the current working directory, exactly as the official code opens them,
so official lists load unchanged.

Masks in a list always mean "> 127 = forged" (the official reader). Masks that need a conversion first (inverted
masks, Columbia's colour edge masks, 0/1 masks, masks drawn in colour or carried by transparency) are described by a
mask kind; `mask_values` applies it and `write_binary_mask` stores the result as a 0/255 PNG that the list can point
at. The check reports a mask the rule would misread (`datasets.io.mask_convention_problem`) with the kind to use.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets.io import (
    MASK_THRESHOLD, ImageReadError, MaskPixels, image_size, mask_convention_problem, not_a_regular_file, read_image,
    read_mask_pixels,
)
from utils.errors import UserError
from utils.files import atomic_output, atomic_write_text, write_png

MASK_KINDS = ("binary", "inverted", "columbia_edge", "nonzero", "colour", "alpha")
CHECK_IMAGE_MODES = ("header", "full")

# A mask pixel is "ambiguous" when it is neither near black nor near white. JPEG-stored masks (Columbia) carry
# ringing along region borders (< 0.25 % of pixels in the shared samples) and CASIA v2 has a few stray values
# (11 pixels in one mask); a genuinely soft or grey mask has far more. So a mask is reported as not binary when
# more than 1 % of its pixels are ambiguous.
AMBIGUOUS_LOW, AMBIGUOUS_HIGH = 10, 245
AMBIGUOUS_FRACTION = 0.01
# Forged regions are smaller than the image in every standard set (the largest in the shared samples is 49 %);
# a mask that is mostly "forged" most likely has the opposite polarity.
MOSTLY_FORGED_FRACTION = 0.5
# Columbia edge masks: the spliced region is the green one (G > 120, the rule CAT-Net's authors published; we also
# require green to dominate red, so that a white or yellow "other" pixel is not counted); red is the authentic part.
COLUMBIA_GREEN_THRESHOLD = 120

ERROR, WARNING = "error", "warning"


class FileListError(UserError, ValueError):
    """A file list that cannot be read or written; the message names the file."""


# ---------------------------------------------------------------------------------------------------- the format

def read_flist(path) -> np.ndarray:
    """Load a file list (`.npy`, or an IMDLBenCo `.json`) as an (N, 2) array of str (image path, mask path;
    '' = authentic)."""
    path = Path(path)
    problem = not_a_regular_file(path)
    if problem is not None:
        raise FileListError(f"file list '{path}': {problem}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json_flist(path)
    if suffix != ".npy":
        raise FileListError(f"file list '{path}': not a .npy or .json file (file lists are NumPy .npy arrays of shape "
                            f"(N, 2), or JSON arrays of [image, mask] pairs)")
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            raise FileListError(f"file list '{path}': not a readable .npy file (no NumPy header)")
    try:
        rows = np.load(path, allow_pickle=False)
    except ValueError as error:
        # np.load refuses pickled (object) arrays when allow_pickle=False; never unpickle a list.
        raise FileListError(f"file list '{path}': not a plain string array ({error})") from None
    except (OSError, EOFError) as error:
        raise FileListError(f"file list '{path}': not a readable .npy file ({error})") from None
    if not isinstance(rows, np.ndarray) or rows.dtype.kind not in "US":
        raise FileListError(f"file list '{path}': expected an array of path strings, found dtype {rows.dtype}")
    if rows.ndim != 2 or rows.shape[1] != 2:
        raise FileListError(f"file list '{path}': expected shape (N, 2) (image, mask), found {rows.shape}")
    if rows.shape[0] == 0:
        raise FileListError(f"file list '{path}': the list is empty")
    rows = rows.astype(str)
    if np.any(rows[:, 0] == ""):
        first = int(np.flatnonzero(rows[:, 0] == "")[0])
        raise FileListError(f"file list '{path}': row {first} has an empty image path")
    return rows


# ------------------------------------------------------------------------------------------- IMDLBenCo JSON lists

JSON_AUTHENTIC = "Negative"  # IMDLBenCo's mask entry for an authentic image (compared exactly, as IMDLBenCo does)
IMDLBENCO_DATASET_KINDS = ("ManiDataset", "JsonDataset", "BalancedDataset")
LIST_FORMATS = ("npy", "json")


def _shown(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json_flist(path: Path) -> np.ndarray:
    """An IMDLBenCo JSON list (`[[image, mask or "Negative"], ...]`) as the (N, 2) array `read_flist` returns
    (`read_flist` has checked that `path` is a regular file).

    Paths are kept as written (IMDLBenCo opens them as given, relative paths from the current directory, as our
    `.npy` lists are). `"Negative"` (and '') mean authentic. Anything else is refused naming the file and the entry:
    text that is not UTF-8, malformed JSON (with its line and column), a top level that is not an array, an empty
    array, an entry that is not a pair of strings, an empty image path, IMDLBenCo's other JSON files (the
    `test_dataset.json` object of dataset paths, a BalancedDataset list of [dataset class, path]).
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise FileListError(f"file list '{path}': not UTF-8 text (byte 0x{data[error.start]:02X} at offset "
                            f"{error.start}); JSON lists are UTF-8") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise FileListError(f"file list '{path}': not valid JSON (line {error.lineno}, column {error.colno}: "
                            f"{error.msg})") from None
    except RecursionError:
        raise FileListError(f"file list '{path}': JSON nested too deeply to be a list of [image, mask] pairs") from None
    if isinstance(entries, dict):
        hint = (" (this looks like an IMDLBenCo test_dataset.json, which maps names to datasets; give the lists it "
                "names instead)" if entries and all(isinstance(v, str) for v in entries.values()) else "")
        raise FileListError(f"file list '{path}': expected a JSON array of [image, mask] pairs, found an object{hint}")
    if not isinstance(entries, list):
        raise FileListError(f"file list '{path}': expected a JSON array of [image, mask] pairs, found "
                            f"{_shown(entries)}")
    if not entries:
        raise FileListError(f"file list '{path}': the list is empty")
    rows = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, list) or len(entry) != 2:
            raise FileListError(f"file list '{path}': entry {index} is {_shown(entry)}, expected a pair "
                                f"[image path, mask path or \"{JSON_AUTHENTIC}\"]")
        image, mask = entry
        for role, value in (("image path", image), ("mask path", mask)):
            if not isinstance(value, str):
                raise FileListError(f"file list '{path}': entry {index}: the {role} is {_shown(value)}, "
                                    f"expected a string")
        if image == "":
            raise FileListError(f"file list '{path}': entry {index} has an empty image path")
        if index == 0 and image in IMDLBENCO_DATASET_KINDS:
            raise FileListError(f"file list '{path}': entry 0 names the dataset class '{image}': this is an "
                                f"IMDLBenCo BalancedDataset list of datasets, not a list of images")
        rows.append((image, "" if mask == JSON_AUTHENTIC else mask))
    return np.asarray(rows, dtype=str).reshape(-1, 2)


def _json_text(array) -> str:
    """The JSON text of rows (`as_rows`), one `[image, mask]` pair a line, `"Negative"` for authentic rows, UTF-8
    paths kept as they are."""
    lines = []
    for index, (image, mask) in enumerate(array):
        if mask == JSON_AUTHENTIC:
            raise FileListError(f"row {index}: the mask path '{mask}' would read back as an authentic image in a JSON "
                                f"list; give it a folder (e.g. './{mask}')")
        lines.append("    " + json.dumps([str(image), str(mask) or JSON_AUTHENTIC], ensure_ascii=False))
    return "[\n" + ",\n".join(lines) + "\n]\n"


class RepeatedRows(Sequence):
    """(M, 2) pairs seen through an index map: `rows[index[i]]` is sample i (the training mixture's repeats,
    `datasets.mixture`: one int per sample, not a copy of its paths)."""

    def __init__(self, rows: np.ndarray, index: np.ndarray):
        self.rows = rows
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.rows[self.index[i]]

    def __array__(self, dtype=None, copy=None):
        return self.rows[self.index] if dtype is None else self.rows[self.index].astype(dtype)


def as_rows(rows) -> np.ndarray | RepeatedRows:
    """(N, 2) unicode array from any sequence of (image, mask) pairs; a lazily repeated `RepeatedRows` passes."""
    if isinstance(rows, RepeatedRows):
        return rows
    try:
        return np.asarray([(str(image), str(mask)) for image, mask in rows], dtype=str).reshape(-1, 2)
    except (TypeError, ValueError):
        raise ValueError("rows must be (N, 2) pairs of (image path, mask path), got "
                         f"{type(rows).__name__} of shape {np.shape(rows)}") from None


def write_flist(rows, out_dir, name: str, list_format: str = "npy") -> Path:
    """Save rows as `<out_dir>/<name>_<N>.npy` (or `.json`, IMDLBenCo's format) atomically (temp file + rename),
    creating `out_dir`."""
    if list_format not in LIST_FORMATS:
        raise ValueError(f"list_format must be one of {LIST_FORMATS}, got '{list_format}'")
    array = as_rows(rows)
    return _write_rows(array, Path(out_dir) / f"{name}_{len(array)}.{list_format}")


def write_flist_file(rows, path) -> Path:
    """Save rows at exactly `path`, in the format its extension names (.npy or .json), atomically."""
    return _write_rows(as_rows(rows), Path(path))


def _write_rows(array, path: Path) -> Path:
    """`write_flist_file` for rows already converted by `as_rows`."""
    if len(array) == 0:
        raise FileListError(f"file list '{path}': refusing to write an empty list")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            text = _json_text(array)
        except FileListError as error:
            raise FileListError(f"file list '{path}': {error}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, text)
    if suffix != ".npy":
        raise FileListError(f"file list '{path}': unknown list format '{path.suffix}' (.npy or .json)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as stream:
        np.save(stream, array, allow_pickle=False)
    return path


def relative_rows(rows, base_dir) -> np.ndarray:
    """Rows with every path written relative to `base_dir` (empty mask paths are kept)."""
    base = os.path.abspath(base_dir)

    def relative(value: str) -> str:
        return value if value == "" else os.path.relpath(os.path.abspath(value), base)

    return as_rows((relative(image), relative(mask)) for image, mask in as_rows(rows))


# ----------------------------------------------------------------------------------------------------- the masks

def mask_values(path, kind: str = "binary") -> np.ndarray:
    """A mask as uint8 H×W in list polarity (> 127 = forged), before thresholding.

    `binary`: the official reading (first channel of OpenCV's BGR order, i.e. blue; grey for grey masks).
    `inverted`: the same with 0 = forged (NIST16). `columbia_edge`: Columbia's colour edge map, where the spliced
    region is green (G > 120 and G > R). `nonzero`: any value above 0 is forged (0/1 masks). `colour`: any colour
    channel above 127 is forged (a mask drawn in red, green or any colour on black). `alpha`: the opaque part
    (alpha > 127) is forged. The last four come back as 0/255.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind '{kind}', expected one of {MASK_KINDS}")
    return _kind_values(read_mask_pixels(path), kind, path)


def _kind_values(pixels: MaskPixels, kind: str, path) -> np.ndarray:
    rgb = pixels.rgb
    if kind == "binary":
        return rgb[:, :, 2]
    if kind == "inverted":
        return 255 - rgb[:, :, 2]
    if kind == "columbia_edge":
        red, green = rgb[:, :, 0], rgb[:, :, 1]
        forged = (green > COLUMBIA_GREEN_THRESHOLD) & (green > red)
    elif kind == "nonzero":
        forged = rgb.max(axis=2) > 0
    elif kind == "colour":
        forged = rgb.max(axis=2) > MASK_THRESHOLD
    else:
        if pixels.alpha is None:
            raise ImageReadError(path, "has no alpha channel (mask convention 'alpha')")
        forged = pixels.alpha > MASK_THRESHOLD
    return np.where(forged, 255, 0).astype(np.uint8)


def write_binary_mask(values: np.ndarray, path) -> Path:
    """Save `values > 127` as a 0/255 8-bit PNG, atomically."""
    return write_png(path, np.where(values > MASK_THRESHOLD, 255, 0).astype(np.uint8))


# ------------------------------------------------------------------------------------------------------ checking

@dataclass(frozen=True)
class Problem:
    """One thing wrong with a row (or, with row None, with the pairing of two folders)."""

    severity: str
    kind: str
    path: str
    detail: str = ""
    row: int | None = None


@dataclass
class CheckReport:
    """The rows checked and every problem found; a row with an error is bad."""

    rows: np.ndarray
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [problem for problem in self.problems if problem.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [problem for problem in self.problems if problem.severity == WARNING]

    @property
    def bad_rows(self) -> set[int]:
        return {problem.row for problem in self.errors if problem.row is not None}

    def good_indices(self) -> list[int]:
        """The indices of the rows without errors, in order."""
        bad = self.bad_rows  # a set built from every problem: build it once, not once per row
        return [index for index in range(len(self.rows)) if index not in bad]

    def good_rows(self) -> np.ndarray:
        """The rows without errors, in their original order."""
        return self.rows[self.good_indices()].reshape(-1, 2)

    def summary(self, first: int = 3) -> str:
        """Counts, then errors and warnings by kind with the first few files named."""
        authentic = int(np.sum(self.rows[:, 1] == "")) if len(self.rows) else 0
        lines = [
            f"rows: {len(self.rows)} ({len(self.rows) - authentic} tampered, {authentic} authentic), "
            f"bad rows: {len(self.bad_rows)}, errors: {len(self.errors)}, warnings: {len(self.warnings)}"
        ]
        for severity, problems in (("error", self.errors), ("warning", self.warnings)):
            by_kind: dict[str, list[Problem]] = {}
            for problem in problems:
                by_kind.setdefault(problem.kind, []).append(problem)
            for kind, group in by_kind.items():
                lines.append(f"  {severity}: {kind}: {len(group)}")
                lines.extend(f"    {_describe(problem)}" for problem in group[:first])
                if len(group) > first:
                    lines.append(f"    ... and {len(group) - first} more")
        return "\n".join(lines)


def _describe(problem: Problem) -> str:
    where = f"row {problem.row}: " if problem.row is not None else ""
    return f"{where}{problem.path}" + (f" ({problem.detail})" if problem.detail else "")


def check_rows(
    rows,
    mask_kinds: Sequence[str] | None = None,
    check_images: str = "header",
    progress: bool = False,
) -> CheckReport:
    """Check every row of a list and return a report.

    Errors (the row is bad): image or mask missing, not a regular file or unreadable (corrupt, truncated, a header
    claiming more than `datasets.io.max_image_pixels()`), image/mask size mismatch, a `binary` mask the mask rule
    would misread (a 0/1 mask, a mask drawn in colour or carried by transparency: the detail names the mask kind
    that converts it), an empty mask (no forged pixel) on a tampered row, an all-forged mask. Warnings: a mask that
    is not binary (more than 1 % of its pixels outside [0, 10] ∪ [245, 255]; JPEG ringing and a few stray values
    stay under that), a mask that is mostly forged (> 50 %, probably inverted).

    Masks are decoded fully (their values are needed). Images: `check_images="header"` reads the size from the
    header and checks that the file is complete cheaply (JPEG ends with FFD9, PNG with its IEND chunk, TIFF
    strips/tiles end inside the file), decoding fully only when that cheap test fails or does not apply;
    `"full"` decodes every image.
    """
    if check_images not in CHECK_IMAGE_MODES:
        raise ValueError(f"check_images must be one of {CHECK_IMAGE_MODES}, got '{check_images}'")
    rows = as_rows(rows)
    kinds = list(mask_kinds) if mask_kinds is not None else ["binary"] * len(rows)
    if len(kinds) != len(rows):
        raise ValueError(f"{len(kinds)} mask kinds given for {len(rows)} rows")
    unknown = sorted(set(kinds) - set(MASK_KINDS))
    if unknown:
        raise ValueError(f"unknown mask kind(s) {unknown}, expected one of {MASK_KINDS}")
    report = CheckReport(rows=rows)
    for index in tqdm(range(len(rows)), desc="checking", unit="row", disable=not progress):
        image, mask = rows[index]
        report.problems.extend(_check_row(index, image, mask, kinds[index], check_images))
    return report


def _check_row(index: int, image: str, mask: str, kind: str, check_images: str) -> list[Problem]:
    problems = []
    image_shape = _check_image(image, check_images, index, problems)
    if mask == "":
        return problems
    if not os.path.exists(mask):
        return problems + [Problem(ERROR, "mask missing", mask, "no such file", index)]
    special = not_a_regular_file(mask)
    if special is not None:
        return problems + [Problem(ERROR, "not a regular file", mask, special, index)]
    try:
        pixels = read_mask_pixels(mask)
        values = _kind_values(pixels, kind, mask)
    except ImageReadError as error:
        return problems + [Problem(ERROR, "mask unreadable", mask, error.problem, index)]
    if image_shape is not None and values.shape != image_shape:
        problems.append(Problem(ERROR, "size mismatch", mask,
                                f"mask {values.shape[0]}x{values.shape[1]}, "
                                f"image {image_shape[0]}x{image_shape[1]}", index))
    convention = mask_convention_problem(pixels) if kind == "binary" else None
    if convention is not None:
        return problems + [Problem(ERROR, "mask in another convention", mask, convention, index)]
    problems.extend(_mask_value_problems(index, mask, values))
    return problems


def _mask_value_problems(index: int, mask: str, values: np.ndarray) -> list[Problem]:
    forged = values > MASK_THRESHOLD
    forged_fraction = float(forged.mean())
    if not forged.any():
        return [Problem(ERROR, "mask empty", mask, "no forged pixel on a tampered row", index)]
    if forged.all():
        return [Problem(ERROR, "mask all forged", mask, "every pixel is forged", index)]
    problems = []
    ambiguous = int(np.count_nonzero((values > AMBIGUOUS_LOW) & (values < AMBIGUOUS_HIGH)))
    if ambiguous > AMBIGUOUS_FRACTION * values.size:
        problems.append(Problem(WARNING, "mask not binary", mask,
                                f"{ambiguous} pixels ({100 * ambiguous / values.size:.1f} %) are neither "
                                f"near 0 nor near 255", index))
    if forged_fraction > MOSTLY_FORGED_FRACTION:
        problems.append(Problem(WARNING, "mask mostly forged", mask,
                                f"{100 * forged_fraction:.1f} % forged: the polarity may be inverted", index))
    return problems


def _check_image(image: str, check_images: str, index: int, problems: list) -> tuple[int, int] | None:
    """Append the image's problems; return its (H, W) when it is usable."""
    if not os.path.exists(image):
        problems.append(Problem(ERROR, "image missing", image, "no such file", index))
        return None
    special = not_a_regular_file(image)
    if special is not None:
        problems.append(Problem(ERROR, "not a regular file", image, special, index))
        return None
    try:
        if check_images == "header":
            shape = image_size(image)
            if _looks_complete(image):
                return shape
        return read_image(image).shape[:2]
    except ImageReadError as error:
        problems.append(Problem(ERROR, "image unreadable", image, error.problem, index))
        return None


_PNG_END = b"IEND\xaeB`\x82"
_TIFF_OFFSETS, _TIFF_COUNTS = (273, 324), (279, 325)  # strip / tile offsets and byte counts


def _looks_complete(path: str) -> bool:
    """Cheap test that a file was not cut short; False means "decode it to be sure", not "broken"."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(max(0, size - 64))
        tail = handle.read().rstrip(b"\x00")
    if head[:2] == b"\xff\xd8":
        return tail.endswith(b"\xff\xd9")
    if head == b"\x89PNG":
        return tail.endswith(_PNG_END)
    if head in (b"II*\x00", b"MM\x00*"):
        return _tiff_data_inside(path, size)
    return False


def _tiff_data_inside(path: str, size: int) -> bool:
    with Image.open(path) as image:
        tags = image.tag_v2
        offsets = next((tags[key] for key in _TIFF_OFFSETS if key in tags), None)
        counts = next((tags[key] for key in _TIFF_COUNTS if key in tags), None)
    if not offsets or not counts or len(offsets) != len(counts):
        return False
    return max(offset + count for offset, count in zip(offsets, counts)) <= size


def convert_masks(rows: np.ndarray, kinds: list[str], folder: Path) -> np.ndarray:
    """Write converted masks as 0/255 PNGs named by image stem; return rows pointing at them."""
    converted = []
    written: dict[Path, str] = {}
    for (image, mask), kind in zip(rows, kinds):
        if kind != "binary" and mask != "":
            target = folder / f"{Path(image).stem}.png"
            if target in written:
                raise FileListError(f"two images convert to the same mask '{target}': '{written[target]}' and "
                                    f"'{image}'")
            written[target] = image
            mask = str(write_binary_mask(mask_values(mask, kind), target).absolute())
        converted.append((image, mask))
    # A new array: the converted paths may be longer than the fixed-width strings of `rows`.
    return as_rows(converted)

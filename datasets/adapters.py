"""Pairing images with their masks: by name, from an explicit pairs file, and for each standard dataset.

Never by sorted position (the official script does that, docs/MPC_SPEC.md §9.11: one missing mask shifts every
later pair).
Every function returns a `Listing`: tampered pairs, authentic images, and pairing problems (an image with no mask,
a mask with no image, two files claiming the same name). Names match case-insensitively, with any of the image
extensions below. Each pair carries its mask kind (`binary`, `inverted`, `columbia_edge`, see `datasets.flist`).
"""
from __future__ import annotations

import codecs
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from datasets.flist import ERROR, Problem
from datasets.io import IMAGE_EXTENSIONS
from utils.files import not_a_regular_file
from utils.errors import UserError

NIST16_REFERENCE = "NC2016-manipulation-ref.csv"

KeyFunction = Callable[[Path], Optional[str]]


class AdapterError(UserError, ValueError):
    """A dataset folder or pairs file that does not have the expected layout; the message names it."""


@dataclass(frozen=True)
class Pair:
    """One tampered image and its mask, with how the mask must be read."""

    image: str
    mask: str
    mask_kind: str = "binary"


@dataclass
class Listing:
    """What a folder holds: tampered pairs, authentic images, and what could not be paired."""

    pairs: list[Pair] = field(default_factory=list)
    authentic: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def extend(self, other: "Listing") -> "Listing":
        self.pairs += other.pairs
        self.authentic += other.authentic
        self.problems += other.problems
        return self


# ------------------------------------------------------------------------------------------------ generic pairing

def image_files(folder, recursive: bool = False) -> list[Path]:
    """Image files (any case of the known extensions) in `folder`, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"'{folder}' is not a folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


def stem_key(suffix: str = "") -> KeyFunction:
    """Key = the lower-case file stem with `suffix` removed from its end when present."""
    suffix = suffix.lower()

    def key(path: Path) -> str:
        stem = path.stem.lower()
        return stem[: -len(suffix)] if suffix and stem.endswith(suffix) and stem != suffix else stem

    return key


def regex_key(pattern: str) -> KeyFunction:
    """Key = group 1 of `pattern` matched against the whole stem (case-insensitive); None (skip) otherwise."""
    compiled = re.compile(pattern, re.IGNORECASE)

    def key(path: Path) -> Optional[str]:
        match = compiled.fullmatch(path.stem)
        return match.group(1).lower() if match else None

    return key


def pair_by_key(
    images: Iterable[Path],
    masks: Iterable[Path],
    image_key: KeyFunction,
    mask_key: KeyFunction,
    mask_kind: str = "binary",
) -> Listing:
    """Pair images with masks whose keys are equal; a key of None leaves a file out of the pairing."""
    image_by_key = _index(images, image_key)
    mask_by_key = _index(masks, mask_key)
    listing = Listing()
    for key, paths in image_by_key.items():
        if len(paths) > 1:
            listing.problems.append(_duplicate(paths))
        elif key not in mask_by_key:
            listing.problems.append(Problem(ERROR, "image without mask", str(paths[0])))
        elif len(mask_by_key[key]) > 1:
            listing.problems.append(_duplicate(mask_by_key[key]))
        else:
            listing.pairs.append(Pair(str(paths[0]), str(mask_by_key[key][0]), mask_kind))
    listing.problems += [
        Problem(ERROR, "mask without image", str(path))
        for key, paths in mask_by_key.items() if key not in image_by_key for path in paths
    ]
    return listing


def _index(paths: Iterable[Path], key: KeyFunction) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for path in paths:
        name = key(path)
        if name is not None:
            index.setdefault(name, []).append(path)
    return index


def _duplicate(paths: list[Path]) -> Problem:
    return Problem(ERROR, "same name twice", str(paths[0]), "also " + ", ".join(str(p) for p in paths[1:]))


def pair_folders(images_dir, masks_dir, mask_suffix: str = "", mask_kind: str = "binary",
                 recursive: bool = False) -> Listing:
    """Pair `images_dir` with `masks_dir` by stem; a mask is named `<image stem><mask_suffix>.<any ext>`."""
    return pair_by_key(image_files(images_dir, recursive), image_files(masks_dir, recursive),
                       stem_key(), stem_key(mask_suffix), mask_kind)


def authentic_folder(folder, recursive: bool = False) -> Listing:
    """Every image of `folder` as an authentic row."""
    return Listing(authentic=[str(path) for path in image_files(folder, recursive)])


PAIR_SEPARATORS = {"\t": "tab", ",": "comma", ";": "semicolon"}
_QUOTED = re.compile(r'"[^"]*"')


def pairs_from_file(path, mask_kind: str = "binary") -> Listing:
    """Pairs listed in a text file: `image,mask` per line, separated by a comma, a semicolon or a tab (what
    spreadsheet programs save), or by spaces (`image mask`).

    Relative paths are relative to the file's folder. A line with only an image is an authentic image; blank lines,
    lines starting with '#', lines of empty cells and an `image,mask` header line are skipped. Files saved by
    spreadsheet programs read as they are: a UTF-8 byte-order mark, UTF-16 ("Unicode text"), Windows line endings,
    quoted fields (a path holding the separator or spaces) and trailing empty cells. The separator is the one the
    file uses outside quotes (a tab wins: paths do not hold tabs); a file mixing commas and semicolons, text that is
    not UTF-8, an unclosed quote or a line of three paths is refused with the line named.
    """
    path = Path(path)
    problem = not_a_regular_file(path)
    if problem is not None:
        raise AdapterError(f"pairs file '{path}': {problem}")
    lines = [(number, line.strip()) for number, line in enumerate(re.split(r"\r\n|\r|\n", _pairs_text(path)), start=1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    separator = _pairs_separator(path, lines)
    base = path.parent
    listing = Listing()
    for number, line in lines:
        fields = _pairs_fields(path, number, line, separator)
        if not fields or [part.lower() for part in fields] == ["image", "mask"]:
            continue
        if len(fields) > 2 or fields[0] == "":
            shown = f"'image{'<tab>' if separator == chr(9) else separator or ' '}mask'"
            raise AdapterError(f"pairs file '{path}', line {number}: expected {shown} or an image alone "
                               f"({PAIR_SEPARATORS.get(separator, 'space')}-separated), found {line!r}")
        image = str(base / fields[0])
        if len(fields) == 1:
            listing.authentic.append(image)
        else:
            listing.pairs.append(Pair(image, str(base / fields[1]), mask_kind))
    return listing


def _pairs_text(path: Path) -> str:
    data = path.read_bytes()
    # Excel's "Unicode text" is UTF-16 with a byte-order mark; its "CSV UTF-8" starts with a UTF-8 one (dropped).
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise AdapterError(f"pairs file '{path}', line {line}: not {encoding.upper().replace('-SIG', '')} text "
                           f"(byte 0x{data[error.start]:02X}); save it as UTF-8 (in Excel: 'CSV UTF-8')") from None


def _pairs_separator(path: Path, lines: list[tuple[int, str]]) -> str | None:
    """The separator the lines use outside quotes; None for spaces."""
    first_use = {}
    for number, line in lines:
        unquoted = _QUOTED.sub("", line)
        for separator in PAIR_SEPARATORS:
            if separator in unquoted:
                first_use.setdefault(separator, number)
    if "\t" in first_use:
        return "\t"
    if len(first_use) > 1:
        raise AdapterError(f"pairs file '{path}': both commas (line {first_use[',']}) and semicolons (line "
                           f"{first_use[';']}) separate fields; use one separator, and quote the paths that hold it")
    return next(iter(first_use), None)


def _pairs_fields(path: Path, number: int, line: str, separator: str | None) -> list[str]:
    """The non-empty leading fields of one line (trailing empty cells dropped)."""
    try:
        fields = next(csv.reader([line], delimiter=separator or " ", skipinitialspace=True, strict=True))
    except csv.Error as error:
        raise AdapterError(f"pairs file '{path}', line {number}: cannot be split into fields ({error}); check its "
                           f"quotes: {line!r}") from None
    fields = [field.strip() for field in fields]
    while fields and fields[-1] == "":
        fields.pop()
    return fields


# ----------------------------------------------------------------------------------------------- standard sets

def _folder(root: Path, *names: str, dataset: str) -> Path:
    """The first existing `root/<name>` (names matched case-insensitively); a clear error when none exists."""
    children = {child.name.lower(): child for child in root.iterdir() if child.is_dir()} if root.is_dir() else {}
    for name in names:
        if name.lower() in children:
            return children[name.lower()]
    raise AdapterError(f"{dataset}: '{root}' has no {' or '.join(n + '/' for n in names)} folder")


def _subfolders(root: Path, prefix: str) -> list[Path]:
    return sorted(child for child in root.iterdir() if child.is_dir() and child.name.lower().startswith(prefix))


def casia1(root: Path) -> Listing:
    """CASIA v1.0: `Tp/**/{stem}.jpg|png` ↔ `Gt/**/{stem}_gt.png`, or the public ground truth's `Sp/`, `CM/` mask
    folders; authentic images in any `Au*/` folder.

    Some original CASIA v1.0 image names differ from their masks' (the published `FileNameCorrection.xlsx`); apply
    that renaming first, the mismatches are reported otherwise.
    """
    images = image_files(_folder(root, "Tp", dataset="casia1"), recursive=True)
    mask_dirs = [child for child in root.iterdir() if child.is_dir() and child.name.lower() in ("gt", "sp", "cm")]
    if not mask_dirs:
        raise AdapterError(f"casia1: '{root}' has no Gt/ (or Sp/ and CM/) mask folder")
    masks = [path for folder in mask_dirs for path in image_files(folder, recursive=True)]
    listing = pair_by_key(images, masks, stem_key(), stem_key("_gt"))
    for folder in _subfolders(root, "au"):
        listing.extend(authentic_folder(folder, recursive=True))
    return listing


def casia2(root: Path) -> Listing:
    """CASIA v2.0: `Tp/{stem}.tif|jpg` ↔ `Gt/{stem}_gt.png`; authentic `Au/`."""
    listing = pair_folders(_folder(root, "Tp", dataset="casia2"), _folder(root, "Gt", dataset="casia2"), "_gt")
    for folder in _subfolders(root, "au"):
        listing.extend(authentic_folder(folder))
    return listing


def columbia(root: Path) -> Listing:
    """Columbia uncompressed: `4cam_splc/{stem}.tif` ↔ `mask/{stem}.*` (binary masks, as in FOCAL's copy) or the
    official `edgemask/{stem}_edgemask.jpg` colour maps (spliced region = green; converted); authentic
    `4cam_auth/`."""
    spliced = _folder(root, "4cam_splc", dataset="columbia")
    binary_masks = [folder for folder in (root / "mask", spliced / "mask") if folder.is_dir()]
    edge_masks = [folder for folder in (root / "edgemask", spliced / "edgemask") if folder.is_dir()]
    if binary_masks:
        listing = pair_folders(spliced, binary_masks[0])
    elif edge_masks:
        listing = pair_folders(spliced, edge_masks[0], "_edgemask", mask_kind="columbia_edge")
    else:
        raise AdapterError(f"columbia: '{root}' has no mask/ or edgemask/ folder")
    authentic = root / "4cam_auth"
    if authentic.is_dir():
        listing.extend(authentic_folder(authentic))
    return listing


def coverage(root: Path) -> Listing:
    """COVERAGE: `image/{N}t.tif` ↔ `mask/{N}forged.tif`; authentic `image/{N}.tif`. The `{N}copy` and `{N}paste`
    masks (source region, similar genuine object) are not the target and are left out."""
    images = image_files(_folder(root, "image", dataset="coverage"))
    masks = image_files(_folder(root, "mask", dataset="coverage"))
    listing = pair_by_key(images, masks, regex_key(r"(\d+)t"), regex_key(r"(\d+)forged"))
    listing.authentic += [str(path) for path in images if regex_key(r"(\d+)")(path) is not None]
    return listing


def nist16(root: Path) -> Listing:
    """NIST Nimble 2016: pairs from `pairs.txt` (as in the shared sample) or from the reference CSV
    `NC2016-manipulation-ref.csv` (pipe-separated; `ProbeFileName`, `ProbeMaskFileName` relative to the dataset
    root, `IsTarget` Y = manipulated, N = authentic). NIST reference masks are black where manipulated: inverted."""
    pairs_file = root / "pairs.txt"
    if pairs_file.is_file():
        return pairs_from_file(pairs_file, mask_kind="inverted")
    references = [path for path in (root / NIST16_REFERENCE, root / "reference" / "manipulation" / NIST16_REFERENCE)
                  if path.is_file()]
    if not references:
        raise AdapterError(f"nist16: '{root}' has neither pairs.txt nor {NIST16_REFERENCE} "
                           f"(at the root or in reference/manipulation/)")
    return _nist16_reference(references[0], root)


def _nist16_reference(csv_path: Path, root: Path) -> Listing:
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="|")
        missing = {"ProbeFileName", "ProbeMaskFileName", "IsTarget"} - set(reader.fieldnames or [])
        if missing:
            raise AdapterError(f"nist16: '{csv_path}' lacks the column(s) {sorted(missing)}")
        records = list(reader)
    listing, seen = Listing(), set()
    for record in records:
        probe, mask = record["ProbeFileName"].strip(), record["ProbeMaskFileName"].strip()
        if (probe, mask) in seen:
            continue
        seen.add((probe, mask))
        if record["IsTarget"].strip().upper() == "Y":
            if mask:
                listing.pairs.append(Pair(str(root / probe), str(root / mask), "inverted"))
            else:
                listing.problems.append(Problem(ERROR, "image without mask", str(root / probe),
                                                f"IsTarget=Y with no ProbeMaskFileName in {csv_path.name}"))
        else:
            listing.authentic.append(str(root / probe))
    return listing


def imd2020(root: Path) -> Listing:
    """IMD2020: `fake/{stem}.jpg` ↔ `mask/{stem}_mask.png`; or the original release, where each image and its
    `{stem}_mask.png` sit side by side in per-source subfolders and `{id}_orig.*` are the authentic images."""
    fake, masks = root / "fake", root / "mask"
    if fake.is_dir() and masks.is_dir():
        return pair_folders(fake, masks, "_mask")
    files = image_files(root, recursive=True)
    if not files:
        raise AdapterError(f"imd2020: '{root}' has neither fake/ and mask/ folders nor images in subfolders")

    def relative_key(suffix: str) -> KeyFunction:
        # Keys include the subfolder: stems repeat across sources only by chance, never within one.
        return lambda path: str(path.parent / stem_key(suffix)(path)).lower()

    is_mask = regex_key(r"(.+)_mask")
    is_original = regex_key(r"(.+)_orig")
    tampered = [path for path in files if is_mask(path) is None and is_original(path) is None]
    listing = pair_by_key(tampered, [path for path in files if is_mask(path) is not None],
                          relative_key(""), relative_key("_mask"))
    listing.authentic += [str(path) for path in files if is_original(path) is not None]
    return listing


def korus(root: Path) -> Listing:
    """Korus realistic tampering: `tampered/{stem}.TIF` ↔ `mask/{stem}_mask.PNG` (any case); authentic
    `pristine/`."""
    listing = pair_folders(_folder(root, "tampered", dataset="korus"), _folder(root, "mask", dataset="korus"),
                           "_mask")
    pristine = root / "pristine"
    if pristine.is_dir():
        listing.extend(authentic_folder(pristine))
    return listing


def noso(root: Path) -> Listing:
    """NoSo copy-move: `{NN}_mod[_{k}].png` ↔ `{NN}_mod[_{k}]_gt.png`, all in one folder; originals `{NN}.png`."""
    files = image_files(root)
    listing = pair_by_key(files, files, regex_key(r"(\d+_mod(?:_\d+)?)"), regex_key(r"(\d+_mod(?:_\d+)?)_gt"))
    listing.authentic += [str(path) for path in files if regex_key(r"(\d+)")(path) is not None]
    if not listing.pairs and not listing.problems:
        raise AdapterError(f"noso: '{root}' has no '{{NN}}_mod*.png' images")
    return listing


def dso1(root: Path) -> Listing:
    """DSO-1: `{stem}.png` images with masks of the same stem in a folder whose name contains 'mask' or 'gt';
    `normal-*` images are authentic. Some copies store white = authentic: the checker warns on mostly-forged
    masks, and `--invert-masks` flips them."""
    mask_dirs = [child for child in root.iterdir()
                 if child.is_dir() and ("mask" in child.name.lower() or child.name.lower() == "gt")]
    if len(mask_dirs) != 1:
        raise AdapterError(f"dso1: '{root}' needs exactly one mask folder (a name containing 'mask', or 'gt'); "
                           f"found {[p.name for p in mask_dirs]}")
    images = [path for path in image_files(root, recursive=True) if mask_dirs[0] not in path.parents]
    authentic = [path for path in images if path.stem.lower().startswith("normal")]
    tampered = [path for path in images if path not in authentic]
    listing = pair_by_key(tampered, image_files(mask_dirs[0]), stem_key(), stem_key())
    listing.authentic += [str(path) for path in authentic]
    return listing


ADAPTERS: dict[str, Callable[[Path], Listing]] = {
    "casia1": casia1, "casia2": casia2, "columbia": columbia, "coverage": coverage, "nist16": nist16,
    "imd2020": imd2020, "korus": korus, "noso": noso, "dso1": dso1,
}


def list_dataset(dataset: str, root) -> Listing:
    """Run the adapter of `dataset` (a key of ADAPTERS) on `root`."""
    if dataset not in ADAPTERS:
        raise AdapterError(f"unknown dataset '{dataset}'; known: {', '.join(ADAPTERS)}")
    root = Path(root)
    if not root.is_dir():
        raise AdapterError(f"{dataset}: root '{root}' is not a folder")
    return ADAPTERS[dataset](root)

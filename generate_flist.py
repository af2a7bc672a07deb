"""Build a checked file list (`<out>/<name>_<N>.npy`, the official (N, 2) format) for a dataset or plain folders.

    python generate_flist.py --dataset casia1 --root ../shared/data/CASIA1/samples_from_combine_png --name CASIAv1
    python generate_flist.py --images DIR --masks DIR --mask-suffix _gt --name MySet
    python generate_flist.py --pairs pairs.csv --authentic real/ --name MySet
    python generate_flist.py --show flist/CASIAv1_36.npy

Images and masks are paired by name, never by sorted position. Every row is checked (missing, unreadable or
truncated files, image/mask size mismatch, empty or all-forged masks are errors; non-binary and mostly-forged masks
are warnings). With errors nothing is written and the exit status is 1, unless --skip-bad, which writes the good rows
and `<name>_<N>.report.txt` beside the list.

Masks that need a conversion (inverted masks, Columbia edge masks) cannot be expressed in the official format, whose
reader means "> 127 = forged"; they are written as 0/255 PNGs under `<out>/masks/<name>/<image stem>.png` and the
list points at those. Plain binary masks are referenced where they are.

Paths are stored absolute, or relative to --relative-to DIR; relative paths in a list are opened relative to the
current directory (as the official code does), so run training and testing from DIR.
"""
import os
import sys

# The generic package name `datasets` must resolve to this repository's, even if HuggingFace `datasets` is installed.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from datasets.adapters import (  # noqa: E402
    ADAPTERS, AdapterError, Listing, authentic_folder, list_dataset, pair_folders, pairs_from_file,
)
from datasets.flist import (  # noqa: E402
    CHECK_IMAGE_MODES, FileListError, as_rows, check_rows, mask_values, read_flist, relative_rows,
    write_binary_mask, write_flist,
)
from datasets.io import ImageReadError  # noqa: E402
from utils.files import atomic_write_text  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="datasets: " + ", ".join(ADAPTERS) + "\nexit status: 0 written (or shown), 1 errors found "
               "(nothing written without --skip-bad), 2 bad arguments",
    )
    source = parser.add_argument_group("what to list (one of --dataset, --images/--masks, --pairs, --authentic)")
    source.add_argument("--dataset", choices=sorted(ADAPTERS), help="a standard dataset, found under --root")
    source.add_argument("--root", help="the dataset's folder (with --dataset)")
    source.add_argument("--with-authentic", action="store_true",
                        help="with --dataset: also list the set's authentic images (empty mask path)")
    source.add_argument("--images", help="folder of tampered images, paired with --masks by file stem")
    source.add_argument("--masks", help="folder of masks named <image stem><mask suffix>.<any image extension>")
    source.add_argument("--mask-suffix", default="", help="end of the mask stems, e.g. _gt, _mask, forged")
    source.add_argument("--pairs", help="text file of 'image,mask' or 'image mask' lines (relative to its folder)")
    source.add_argument("--authentic", action="append", default=[], metavar="DIR",
                        help="add every image of DIR as authentic (repeatable)")
    source.add_argument("--invert-masks", action="store_true",
                        help="masks mark forged pixels black (0 = forged); converted masks are written")
    output = parser.add_argument_group("output")
    output.add_argument("--name", help="list name; the file is <out>/<name>_<N>.npy")
    output.add_argument("--out", default="flist", help="output folder (default: flist)")
    output.add_argument("--relative-to", metavar="DIR",
                        help="store paths relative to DIR (default: absolute paths)")
    output.add_argument("--check-images", choices=CHECK_IMAGE_MODES, default="header",
                        help="header: size from the header plus a cheap completeness test (default); "
                             "full: decode every image")
    output.add_argument("--skip-bad", action="store_true",
                        help="write the good rows and a report when some rows have errors")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--show", metavar="LIST.npy", help="print an existing list's summary and first rows")
    parser.add_argument("--rows", type=int, default=5, help="with --show: how many rows to print (default 5)")
    return parser


def gather(args) -> Listing:
    """The pairs and authentic images the arguments ask for."""
    listing = Listing()
    if args.dataset:
        listing = list_dataset(args.dataset, args.root)
        if not args.with_authentic:
            listing.authentic = []
    elif args.images:
        listing = pair_folders(args.images, args.masks, args.mask_suffix)
    elif args.pairs:
        listing = pairs_from_file(args.pairs)
    for folder in args.authentic:
        listing.extend(authentic_folder(folder))
    return listing


def validate(parser: argparse.ArgumentParser, args) -> None:
    sources = [bool(args.dataset), bool(args.images or args.masks), bool(args.pairs)]
    if sum(sources) > 1:
        parser.error("give only one of --dataset, --images/--masks, --pairs")
    if not any(sources) and not args.authentic:
        parser.error("nothing to list: give --dataset and --root, --images and --masks, --pairs, or --authentic")
    if args.dataset and not args.root:
        parser.error("--dataset needs --root")
    if bool(args.images) != bool(args.masks):
        parser.error("--images and --masks go together")
    if not args.name:
        parser.error("--name is required")


def show(path: str, count: int) -> int:
    rows = read_flist(path)
    authentic = int(np.sum(rows[:, 1] == ""))
    print(f"{path}: {len(rows)} rows ({len(rows) - authentic} tampered, {authentic} authentic), dtype {rows.dtype}")
    for image, mask in rows[:count]:
        print(f"  {image}  ->  {mask or '(authentic)'}")
    if len(rows) > count:
        print(f"  ... and {len(rows) - count} more")
    return 0


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


def generate(args) -> int:
    listing = gather(args)
    pairs = listing.pairs
    rows = as_rows([(os.path.abspath(p.image), os.path.abspath(p.mask)) for p in pairs]
                   + [(os.path.abspath(image), "") for image in listing.authentic])
    flip = {"binary": "inverted"} if args.invert_masks else {}
    kinds = [flip.get(p.mask_kind, p.mask_kind) for p in pairs] + ["binary"] * len(listing.authentic)
    report = check_rows(rows, kinds, args.check_images, progress=not args.quiet)
    report.problems[:0] = listing.problems
    print(report.summary())
    if len(rows) == 0:
        print("error: no rows found", file=sys.stderr)
        return 1
    if report.errors and not args.skip_bad:
        print(f"not written: {len(report.errors)} error(s); fix them or pass --skip-bad to write the good rows",
              file=sys.stderr)
        return 1
    good = report.good_indices()
    if not good:
        print("not written: no good rows", file=sys.stderr)
        return 1
    out = Path(args.out)
    final = convert_masks(rows[good], [kinds[i] for i in good], out / "masks" / args.name)
    if args.relative_to:
        final = relative_rows(final, args.relative_to)
    path = write_flist(final, out, args.name)
    print(f"wrote {path} ({len(final)} rows)")
    if report.problems:
        report_path = atomic_write_text(path.with_suffix(".report.txt"),
                                        report.summary(first=len(report.problems)) + "\n")
        print(f"wrote {report_path}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.show:
            return show(args.show, args.rows)
        validate(parser, args)
        return generate(args)
    except (AdapterError, FileListError, ImageReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

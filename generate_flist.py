"""Build a checked file list (`<out>/<name>_<N>.npy`, the official (N, 2) format, and/or IMDLBenCo's `.json`) for a
dataset or plain folders; convert lists between the two formats; compare a dataset folder with its manifest.

    python generate_flist.py --dataset casia1 --root ../shared/data/CASIA1/samples_from_combine_png --name CASIAv1
    python generate_flist.py --images DIR --masks DIR --mask-suffix _gt --name MySet
    python generate_flist.py --pairs pairs.csv --authentic real/ --name MySet
    python generate_flist.py --show flist/CASIAv1_36.npy
    python generate_flist.py --dataset columbia --root /data/Columbia --name Columbia --format both
    python generate_flist.py --convert Columbia.json --out flist          # IMDLBenCo JSON -> flist/Columbia_<N>.npy
    python generate_flist.py --convert flist/CASIAv1_920.npy --out lists  # .npy -> lists/CASIAv1_920.json
    python generate_flist.py --dataset casia1 --root /data/CASIA1 --check-manifest
    python generate_flist.py --manifests
    python generate_flist.py --synthetic 2000 --size 512 --name synth --out data/synth [--sources my_photos/]

Images and masks are paired by name, never by sorted position. Every row is checked (missing, unreadable or
truncated files, image/mask size mismatch, empty or all-forged masks, a pair listed twice are errors; non-binary and
mostly-forged masks are warnings). With errors nothing is written and the exit status is 1, unless --skip-bad, which
writes the good rows and `<name>_<N>.report.txt` beside the list.

Masks that need a conversion (inverted masks, Columbia edge masks, --mask-convention) cannot be expressed in the
official format, whose reader means "> 127 = forged"; they are written as 0/255 PNGs under
`<out>/masks/<name>/<image stem>.png` and the list points at those. Plain binary masks are referenced where they are.

Paths are stored absolute, or relative to --relative-to DIR; relative paths in a list are opened relative to the
current directory (as the official code does), so run training and testing from DIR.

JSON lists are IMDLBenCo's: a JSON array of [image, mask] pairs, "Negative" as the mask of an authentic image (''
in .npy lists). Training, testing and --show read either format.

With --dataset, the images found are compared with the dataset's manifest (datasets/manifests.py: the numbers of
tampered and authentic images a complete copy holds): a difference is a warning naming the first missing files where
the names follow a rule, or an error with --strict-manifest.
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
    CHECK_IMAGE_MODES, ERROR, LIST_FORMATS, FileListError, Problem, as_rows, check_rows, convert_masks, read_flist,
    relative_rows, write_flist, write_flist_file,
)
from datasets.io import ImageReadError  # noqa: E402
from datasets.manifests import check_manifest, manifest_table  # noqa: E402
from datasets.synthetic import KINDS, SCENE_SHAPES, make_synthetic_set, parse_shape_range  # noqa: E402
from utils.entry import run_script  # noqa: E402
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
    source.add_argument("--mask-convention", choices=("nonzero", "colour", "alpha"),
                        help="masks not in the grey > 127 rule: nonzero (0/1 masks: any value > 0 is forged), colour "
                             "(drawn in any colour on black: any channel > 127), alpha (the opaque part is forged); "
                             "converted masks are written")
    output = parser.add_argument_group("output")
    output.add_argument("--name", help="list name; the file is <out>/<name>_<N>.npy")
    output.add_argument("--out", help="output folder (default: flist; with --convert: the input list's folder)")
    output.add_argument("--format", choices=LIST_FORMATS + ("both",),
                        help="npy: the official list (default); json: IMDLBenCo's JSON list ('Negative' = authentic); "
                             "both: the two side by side. With --convert: the format to write (default: the other "
                             "one)")
    output.add_argument("--relative-to", metavar="DIR",
                        help="store paths relative to DIR (default: absolute paths)")
    output.add_argument("--check-images", choices=CHECK_IMAGE_MODES, default="header",
                        help="header: size from the header plus a cheap completeness test (default); "
                             "full: decode every image")
    output.add_argument("--skip-bad", action="store_true",
                        help="write the good rows and a report when some rows have errors")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    manifest = parser.add_argument_group("dataset manifests (datasets/manifests.py)")
    manifest.add_argument("--strict-manifest", action="store_true",
                          help="with --dataset: a count that differs from the dataset's manifest is an error (nothing "
                               "written) instead of a warning")
    manifest.add_argument("--check-manifest", action="store_true",
                          help="with --dataset and --root: only compare the folder with the manifest; no list written, "
                               "no row checked")
    manifest.add_argument("--manifests", action="store_true", help="print the manifest table and exit")
    synthetic = parser.add_argument_group("synthetic forgeries (datasets/synthetic.py): images, masks and their list "
                                          "written into --out")
    synthetic.add_argument("--synthetic", type=int, metavar="N", help="write N synthetic images and list them")
    synthetic.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synthetic.add_argument("--seed", type=int, default=0, help="fixes every byte of the set (default 0)")
    synthetic.add_argument("--sources", help="folder of authentic photos to tamper (default: procedural scenes)")
    synthetic.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    synthetic.add_argument("--authentic-fraction", type=float, default=0.25, help="share of untouched images")
    synthetic.add_argument("--difficulty", type=float, default=0.25, help="0 = glaring noise/JPEG mismatch, 1 = subtle")
    synthetic.add_argument("--shapes", type=shape_range, default=SCENE_SHAPES, metavar="N or FEWEST,MOST",
                           help="flat shapes per procedural scene (default 3,8; 0 = plain scenes, the easiest to "
                                "learn from)")
    parser.add_argument("--show", metavar="LIST", help="print an existing list's (.npy or .json) summary and first "
                                                       "rows")
    parser.add_argument("--convert", metavar="LIST",
                        help="convert a list between .npy and IMDLBenCo .json (rows unchanged, 'Negative' <-> ''); "
                             "writes <out>/<name>_<N>.<format>, the name from --name or the input's file name")
    parser.add_argument("--rows", type=int, default=5, help="with --show: how many rows to print (default 5)")
    return parser


def gather(args) -> tuple[Listing, list]:
    """The pairs and authentic images the arguments ask for, and with --dataset the comparison with its manifest."""
    listing, checks = Listing(), []
    if args.dataset:
        listing = list_dataset(args.dataset, args.root)
        checks = check_manifest(args.dataset, listing, args.with_authentic)
        if not args.with_authentic:
            listing.authentic = []
    elif args.images:
        listing = pair_folders(args.images, args.masks, args.mask_suffix)
    elif args.pairs:
        listing = pairs_from_file(args.pairs)
    for folder in args.authentic:
        listing.extend(authentic_folder(folder))
    return listing, checks


def report_manifest(checks, strict: bool, stream=None) -> bool:
    """Print the manifest comparison (a difference on stderr unless `stream` is given); True when it differs and
    --strict-manifest makes that an error."""
    for check in checks:
        if check.ok:
            print(f"manifest: {check.message()}", file=stream or sys.stdout)
        else:
            print(f"{'error' if strict else 'warning'}: manifest: {check.message()}", file=stream or sys.stderr)
    return strict and not all(check.ok for check in checks)


def shape_range(text: str) -> tuple[int, int]:
    try:
        return parse_shape_range(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def write_synthetic(args) -> int:
    path = make_synthetic_set(args.out, args.synthetic, args.size, args.seed, sources=args.sources,
                              kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
                              authentic_fraction=args.authentic_fraction, difficulty=args.difficulty,
                              name=args.name, shapes=args.shapes, progress=not args.no_progress)
    print(path)
    return 0


def validate(parser: argparse.ArgumentParser, args) -> None:
    sources = [bool(args.dataset), bool(args.images or args.masks), bool(args.pairs), args.synthetic is not None]
    if args.convert:
        if any(sources) or args.authentic:
            parser.error("--convert takes a list only: no --dataset, --images/--masks, --pairs, --synthetic, "
                         "--authentic")
        if args.relative_to or args.skip_bad or args.check_manifest or args.strict_manifest:
            parser.error("--convert copies the rows as they are: --relative-to, --skip-bad and the manifest options "
                         "do not apply")
        return
    if sum(sources) > 1:
        parser.error("give only one of --dataset, --images/--masks, --pairs, --synthetic")
    if (args.check_manifest or args.strict_manifest) and not args.dataset:
        parser.error("--check-manifest and --strict-manifest go with --dataset (the standard sets have manifests)")
    if args.check_manifest:
        if not args.root:
            parser.error("--dataset needs --root")
        return
    if args.synthetic is not None and args.format not in (None, "npy"):
        parser.error("--synthetic writes an .npy list; convert it afterwards with --convert")
    if not any(sources) and not args.authentic:
        parser.error("nothing to list: give --dataset and --root, --images and --masks, --pairs, or --authentic")
    if args.dataset and not args.root:
        parser.error("--dataset needs --root")
    if bool(args.images) != bool(args.masks):
        parser.error("--images and --masks go together")
    if not args.name:
        parser.error("--name is required")
    if args.invert_masks and args.mask_convention:
        parser.error("give only one of --invert-masks, --mask-convention")


def show(path: str, count: int) -> int:
    rows = read_flist(path)
    authentic = int(np.sum(rows[:, 1] == ""))
    print(f"{path}: {len(rows)} rows ({len(rows) - authentic} tampered, {authentic} authentic), dtype {rows.dtype}")
    for image, mask in rows[:count]:
        print(f"  {image}  ->  {mask or '(authentic)'}")
    if len(rows) > count:
        print(f"  ... and {len(rows) - count} more")
    return 0


def duplicate_rows(rows) -> list[Problem]:
    """A pair listed twice would be trained on twice as often and scored twice: each repeat is an error, so that
    --skip-bad keeps the first."""
    first_row: dict[tuple[str, str], int] = {}
    problems = []
    for index, (image, mask) in enumerate(rows):
        key = (str(image), str(mask))
        if key in first_row:
            problems.append(Problem(ERROR, "duplicate row", key[0], f"the same pair as row {first_row[key]}", index))
        else:
            first_row[key] = index
    return problems


def first_error(report) -> str:
    """The first error in one line: what, which row and file, why."""
    problem = report.errors[0]
    where = f"row {problem.row}: " if problem.row is not None else ""
    detail = " ".join(problem.detail.split())
    return f"{problem.kind}: {where}'{problem.path}'" + (f" ({detail})" if detail else "")


def make_out_folder(out: Path) -> None:
    """--out is created before anything is written into it; a file in its place is named, not a traceback."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileListError(f"--out '{out}' is a file, not a folder") from None
    except OSError as error:
        raise FileListError(f"--out '{out}': cannot create the folder ({error.strerror})") from None


def list_file_name(name: str, count: int) -> str:
    """`<name>_<N>`, the official list naming; a name that already ends with _<N> is kept."""
    return name if name.endswith(f"_{count}") else f"{name}_{count}"


def convert(args) -> int:
    """Write the list `--convert` names in the other format (or --format), beside it or in --out."""
    source = Path(args.convert)
    rows = read_flist(source)
    source_format = source.suffix.lower().lstrip(".")
    formats = [f for f in LIST_FORMATS if f != source_format] if args.format is None else (
        list(LIST_FORMATS) if args.format == "both" else [args.format])
    out = Path(args.out) if args.out is not None else source.parent
    make_out_folder(out)
    name = list_file_name(args.name or source.stem, len(rows))
    authentic = int(np.sum(rows[:, 1] == ""))
    for list_format in formats:
        target = out / f"{name}.{list_format}"
        if target.resolve() == source.resolve():
            raise FileListError(f"--convert '{source}': the output would overwrite the input; give --out or --name")
        path = write_flist_file(rows, target)
        print(f"wrote {path} ({len(rows)} rows, {authentic} authentic)")
    return 0


def manifest_only(args) -> int:
    listing = list_dataset(args.dataset, args.root)
    checks = check_manifest(args.dataset, listing, with_authentic=True)
    print(f"{args.dataset} ({args.root}):")
    failed = report_manifest(checks, args.strict_manifest, stream=sys.stdout)
    return 1 if failed else 0


def generate(args) -> int:
    listing, checks = gather(args)
    if report_manifest(checks, args.strict_manifest):
        print("not written: the folder does not hold what the dataset's manifest says (--strict-manifest)",
              file=sys.stderr)
        return 1
    pairs = listing.pairs
    rows = as_rows([(os.path.abspath(p.image), os.path.abspath(p.mask)) for p in pairs]
                   + [(os.path.abspath(image), "") for image in listing.authentic])
    flip = {"binary": "inverted"} if args.invert_masks else {}
    if args.mask_convention:
        flip = {"binary": args.mask_convention}
    kinds = [flip.get(p.mask_kind, p.mask_kind) for p in pairs] + ["binary"] * len(listing.authentic)
    report = check_rows(rows, kinds, args.check_images, progress=not args.no_progress)
    report.problems[:0] = listing.problems
    report.problems += duplicate_rows(rows)
    print(report.summary())
    if len(rows) == 0:
        print("error: no rows found", file=sys.stderr)
        return 1
    if report.errors and not args.skip_bad:
        print(f"not written: {len(report.errors)} error(s), the first: {first_error(report)}; fix them (all are listed "
              "above) or pass --skip-bad to write the good rows", file=sys.stderr)
        return 1
    good = report.good_indices()
    if not good:
        print("not written: no good rows", file=sys.stderr)
        return 1
    out = Path(args.out)
    make_out_folder(out)
    final = convert_masks(rows[good], [kinds[i] for i in good], out / "masks" / args.name)
    if args.relative_to:
        final = relative_rows(final, args.relative_to)
    formats = list(LIST_FORMATS) if args.format == "both" else [args.format or "npy"]
    paths = [write_flist(final, out, args.name, list_format) for list_format in formats]
    path = paths[0]
    for written in paths:
        print(f"wrote {written} ({len(final)} rows)")
    if report.problems:
        report_path = atomic_write_text(path.with_suffix(".report.txt"),
                                        report.summary(first=len(report.problems)) + "\n")
        print(f"wrote {report_path}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.manifests:
            print(manifest_table())
            return 0
        if args.show:
            return show(args.show, args.rows)
        validate(parser, args)
        if args.convert:
            return convert(args)
        if args.check_manifest:
            return manifest_only(args)
        if args.out is None:
            args.out = "flist"
        return write_synthetic(args) if args.synthetic is not None else generate(args)
    except (AdapterError, FileListError, ImageReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    run_script(main)

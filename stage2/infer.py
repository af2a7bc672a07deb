"""Stage 2: localise forgeries in your own images (no ground truth): a mask, a heat map and a score per image.

    python stage2/infer.py --weights MPC_CATNet_stage2_weights.pth --input photos/ --out results/photos
    python stage2/infer.py --weights runs/stage2/best.pth --input a.jpg --input 'shots/*.png' --out out --save-prob

Pre-processing is the test protocol's (squash-resize to --input-size, /255), so the outputs mean what they mean in
testing; --resolution native runs each image at its own size instead (padded to a multiple of 32, in overlapping
tiles blended across the seams above --tile pixels a side, so that memory stays bounded on huge images). The model
runs through the fast inference path (models/inference.py: BatchNorm folded, channels-last, fused attention; maps
equal to the plain eval forward's up to float rounding); --plain uses the plain forward. Per image, in OUT:
<name>_mask.png (0/255 at the original size, the official > 127 rule), <name>_heatmap.png
(the probability map over the image), with --save-prob <name>_prob.npy (float32 in [0, 1], original size); one
scores.csv with the image-level score (the map's maximum, in [0, 1]). <name> is the file name less its extension,
made unique when two inputs share it. Unreadable files are reported and skipped; the exit code is 0 when at least
one image was processed (or already was).
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python stage2/infer.py`: make the repository's packages importable first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets.dataset import CatchReadErrors, ForgeryDataset, is_read_error
from datasets.io import IMAGE_EXTENSIONS, ImageReadError, not_a_regular_file
from utils.entry import run_script
from utils.evaluation.loop import (UniqueNames, add_backend_argument, add_batch_size_argument, add_resolution_arguments,
                                   escape_text, load_for_backend, predicted_items, single_item, tiling_from, write_csv)
from utils.evaluation.prediction import dataset_input_size, probability_predictor, write_mask, write_probability
from utils.evaluation.visualize import heatmap_overlay
from utils.files import write_png
from utils.interrupt import Interrupted, stop_requests
from utils.runtime import resolve_device

SCORE_COLUMNS = ("name", "path", "score", "height", "width")
SCORES_FILE = "scores.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, metavar="PATH",
                        help="an image file, a folder of images or a quoted glob; repeat for more")
    parser.add_argument("--weights", required=True,
                        help="our stage-2 checkpoint (runs/.../best.pth) or an official MPC_*_stage2_weights.pth")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--backbone", default=None, help="official weights only (default hrt_base)")
    parser.add_argument("--head", default=None, choices=("catnet", "casiav2"),
                        help="official weights only; default: recognised from the file's layer widths")
    add_backend_argument(parser)
    parser.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    parser.add_argument("--input-size", type=int, default=None,
                        help="squash-resize size (default: the size our checkpoint was trained at; 512, the "
                             "protocol's, for official weights)")
    parser.add_argument("--save-prob", action="store_true", help="also write <name>_prob.npy")
    parser.add_argument("--skip-existing", action="store_true", help="skip images whose outputs all exist")
    parser.add_argument("--recursive", action="store_true", help="look for images in sub-folders too")
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity over the image (default 0.5)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers reading the images (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    add_resolution_arguments(parser, default_fast=True)
    add_batch_size_argument(parser)
    return parser


def find_images(specs: list[str], recursive: bool = False) -> list[str]:
    """Files named directly, images inside folders, and files matching globs; in order, without repeats.

    A file named directly is always tried (its reading decides); in folders and globs only image extensions count.
    """
    found = []
    for spec in specs:
        if os.path.isfile(spec):
            found.append(spec)
            continue
        if os.path.exists(spec) and not os.path.isdir(spec):  # a named pipe, device or socket: never opened
            raise SystemExit(f"--input {spec}: {not_a_regular_file(spec)}")
        if os.path.isdir(spec):
            candidates = sorted(Path(spec).rglob("*") if recursive else Path(spec).iterdir())
        else:
            candidates = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            if not candidates:
                raise SystemExit(f"--input {spec}: no such file or folder, and no file matches it as a glob")
        found += [str(p) for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    unique = list(dict.fromkeys(os.path.abspath(p) for p in found))
    if not unique:
        raise SystemExit(f"no images found in {', '.join(specs)} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return unique


def output_paths(out: Path, name: str, save_prob: bool) -> dict[str, Path]:
    paths = {"mask": out / f"{name}_mask.png", "heatmap": out / f"{name}_heatmap.png"}
    if save_prob:
        paths["prob"] = out / f"{name}_prob.npy"
    return paths


class ImagesToLocalise(Dataset):
    """Test-mode items of images without ground truth (the protocol's pre-processing) plus the original RGB image,
    which the heat map is drawn over."""

    def __init__(self, paths: list[str], names: list[str], input_size: int | None):
        self.rows = [(path, "") for path in paths]  # an empty mask path = no ground truth
        self.names = names
        self.base = ForgeryDataset(self.rows, mode="test", input_size=input_size, keep_original=True)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        del item["mask"]  # all-zero stand-in for the missing ground truth
        item["name"] = self.names[index]
        return item


def read_scores(path: Path) -> dict[str, dict]:
    """Rows of an earlier scores.csv by name, so that skipped images keep their scores."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f) if row.get("name")}


def localise(model, dataset, out: Path, device, args, stop) -> tuple[dict[str, dict], list[tuple[str, str]], bool]:
    """Outputs of every readable image; (scores by name, failures, whether `stop()` ended it early)."""
    predict = probability_predictor(model, fast=args.fast)
    loader = DataLoader(CatchReadErrors(dataset), batch_size=1, num_workers=args.num_workers,
                        collate_fn=single_item)
    scores, failures = {}, []
    items = tqdm(loader, desc="localising", disable=args.no_progress, dynamic_ncols=True)
    for item, prediction in predicted_items(predict, items, lambda item: item["original"].shape[:2], device,
                                            args.tiling, args.batch_size):
        if stop():
            return scores, failures, True
        if is_read_error(item):
            failures.append((item["bad_file"], str(ImageReadError(item["bad_file"], item["error"]))))
            continue
        original = item["original"]
        paths = output_paths(out, item["name"], args.save_prob)
        write_mask(paths["mask"], prediction)
        write_png(paths["heatmap"], heatmap_overlay(original, prediction.probability(), args.alpha))
        if args.save_prob:
            write_probability(paths["prob"], prediction)
        scores[item["name"]] = {"name": item["name"], "path": item["path"], "score": prediction.score,
                                "height": original.shape[0], "width": original.shape[1]}
    return scores, failures, False


def main(argv=None) -> dict:
    """Returns {"processed": [names], "skipped": [names], "failed": [(path, problem)]}."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder")
    paths = find_images(args.input, args.recursive)
    namer = UniqueNames()
    names = [namer.for_image(p) for p in paths]
    todo = [(p, n) for p, n in zip(paths, names)
            if not (args.skip_existing and all(f.is_file() for f in output_paths(out, n, args.save_prob).values()))]
    skipped = [n for n in names if n not in {name for _, name in todo}]

    device = resolve_device(args.device)
    trained = load_for_backend(args, device)
    args = argparse.Namespace(**{**vars(args), "input_size": trained.input_size(args.input_size),  # a copy
                                 "tiling": tiling_from(args), "fast": args.fast and args.backend == "pytorch"})
    out.mkdir(parents=True, exist_ok=True)
    scores, failures, stopped = {}, [], False
    if todo:
        dataset = ImagesToLocalise([p for p, _ in todo], [n for _, n in todo],
                                   dataset_input_size(args.input_size, args.tiling))
        with stop_requests() as stop:
            scores, failures, stopped = localise(trained.model, dataset, out, device, args, stop)

    previous = read_scores(out / SCORES_FILE)
    rows = [scores.get(name) or previous[name] for name in names if name in scores or name in previous]
    write_csv(out / SCORES_FILE, rows, SCORE_COLUMNS)
    for path, problem in failures:
        print(f"failed: {escape_text(problem)}", file=sys.stderr)
    if stopped:
        raise Interrupted(f"interrupted after {len(scores)} of {len(todo)} images: their outputs and scores are in "
                          f"{out}; run the same command with --skip-existing to do the rest")
    failed_note = f": {', '.join(escape_text(os.path.basename(p)) for p, _ in failures)}" if failures else ""
    print(f"{len(paths)} images: {len(scores)} processed, {len(skipped)} skipped (outputs exist), "
          f"{len(failures)} failed{failed_note}; results in {escape_text(str(out))}")
    return {"processed": list(scores), "skipped": skipped, "failed": failures}


def command(argv: list[str]) -> int:
    """Exit status 0 when at least one image was processed (or already was)."""
    summary = main(argv)
    return 0 if summary["processed"] or summary["skipped"] else 1


if __name__ == "__main__":
    run_script(command)

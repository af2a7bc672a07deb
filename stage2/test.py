"""Stage 2: score trained weights on test file lists with the MPC protocol and every named variant (docs/METRICS.md).

    python stage2/test.py --weights runs/stage2/best.pth --out results/test
    python stage2/test.py --weights MPC_CATNet_stage2_weights.pth --flist flist/CASIAv1_920.npy --out res --save-masks
    python stage2/test.py --weights runs/stage2/best.pth --flist flist/Columbia_160.npy --robustness --out results/rob

Per image, as the official test.py: squash-resize to --input-size, sigmoid at 1/4, ×255 bilinear resize to the
ground truth's size, > 127. Writes OUT/metrics.json (every list), OUT/<list>/per_image.csv, OUT/settings.yaml,
with --save-masks / --save-prob OUT/<list>/masks/<name>.png and OUT/<list>/prob/<name>.npy, and with --robustness
or --perturb OUT/robustness.csv and OUT/robustness.png.

--resolution native runs each image at its own size instead (padded to a multiple of 32, in blended overlapping
tiles above --tile pixels a side): not the protocol, so its numbers are not comparable with published ones. --fast
uses the prepared inference model (models/inference.py): the same maps up to float rounding, faster; the plain
eval forward stays the default so that the protocol's numbers are exactly what they were.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python stage2/test.py`: make the repository's packages importable first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml

from datasets.dataset import ForgeryDataset
from datasets.flist import read_flist
from datasets.io import ImageReadError
from datasets.perturb import ROBUSTNESS_GRID, make_perturbation, parse_perturbations
from utils.config import get_default_config, load_config
from utils.entry import run_script
from models.registry import sha256_of
from utils.evaluation.loop import (PER_IMAGE_COLUMNS, EvaluationStopped, UniqueNames, add_backend_argument,
                                   add_batch_size_argument, add_resolution_arguments, environment, evaluate, json_safe,
                                   load_for_backend, tiling_from, write_csv)
from utils.evaluation.metrics import DATASET_METRICS
from utils.evaluation.prediction import dataset_input_size, probability_predictor, write_mask, write_probability
from utils.evaluation.visualize import plot_robustness
from utils.files import atomic_write_text
from utils.interrupt import Interrupted, stop_requests
from utils.runtime import resolve_device
from utils.training.builders import list_name

PROTOCOL = ("MPC: squash-resize to INPUT_SIZE, /255, sigmoid at 1/4, x255 bilinear (cv2) to the GT size, > 127; "
            "pixel metrics on tampered images, per-image mean")
METRIC_COLUMNS = DATASET_METRICS  # the primary MPC numbers first, then the variants, then image level
ROBUSTNESS_COLUMNS = ("dataset", "distortion", "level") + METRIC_COLUMNS
PLOTTED_METRICS = ("f1_fixed", "iou")
CHAIN_LEVEL = "x0.5+jpeg75"  # the fixed-level social-network chain, named on the plot's axis


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="our stage-2 checkpoint (runs/.../best.pth) or an official MPC_*_stage2_weights.pth")
    parser.add_argument("--flist", nargs="+", default=None,
                        help="test file lists (official .npy, or IMDLBenCo .json); default: DATA.TEST_LISTS of "
                             "--config, else of the checkpoint's config, else the official ten")
    parser.add_argument("--config", default=None,
                        help="experiment YAML for DATA.TEST_LISTS and TEST.NUM_WORKERS (the model settings of our "
                             "checkpoints always come from the config stored in them)")
    parser.add_argument("--backbone", default=None, help="official weights only (default hrt_base)")
    parser.add_argument("--head", default=None, choices=("catnet", "casiav2"),
                        help="official weights only; default: recognised from the file's layer widths")
    parser.add_argument("--out", required=True, help="results folder (refused if it already holds files)")
    parser.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default TEST.NUM_WORKERS)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="squash-resize size (default: the size our checkpoint was trained at; 512, the "
                             "protocol's, for official weights)")
    parser.add_argument("--save-masks", action="store_true",
                        help="write the binary masks (0/255 PNG, original size) to OUT/<list>/masks/")
    parser.add_argument("--save-prob", action="store_true",
                        help="write the probability maps (float32 .npy in [0, 1], original size) to OUT/<list>/prob/")
    parser.add_argument("--robustness", action="store_true", help="also run the docs/METRICS.md distortion grid")
    parser.add_argument("--perturb", default=None, metavar="SPEC",
                        help="also run these distortions, e.g. jpeg:70,resize:0.5,blur:7,noise:11,osn")
    parser.add_argument("--baselines", action="store_true",
                        help="also score the trivial all-forged and all-authentic predictions (rows '<list> all-forged', "
                             "'<list> all-authentic'), the floor a model must beat")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images or masks (counted in the report) instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out folder that is not empty")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    add_backend_argument(parser)
    add_resolution_arguments(parser, default_fast=False)
    add_batch_size_argument(parser)
    return parser


def check_out_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"--out {out} already holds files (earlier results?); choose a new folder or pass "
                         "--overwrite (files are then replaced one by one, each atomically)")


def settings_config(config, trained):
    """Where DATA.TEST_LISTS and TEST.NUM_WORKERS come from: --config (loaded), else our checkpoint's config, else
    defaults."""
    if config is not None:
        return config
    return trained.config if trained.config is not None else get_default_config()


def resolve_lists(args, config, trained) -> dict[str, str]:
    """{dataset name: file list path}; names are the lists' file stems, made unique."""
    paths = args.flist or settings_config(config, trained).DATA.TEST_LISTS
    if not paths:
        raise SystemExit("no test lists: pass --flist or set DATA.TEST_LISTS in --config")
    names = UniqueNames()
    return {names.take(list_name(p)): str(p) for p in paths}


def perturbations_from(args) -> list:
    perturbations = []
    if args.robustness:
        perturbations += [make_perturbation(name, level) for name, levels in ROBUSTNESS_GRID for level in levels]
    if args.perturb:
        try:
            perturbations += parse_perturbations(args.perturb)
        except ValueError as error:
            raise SystemExit(f"--perturb: {error}") from None
    return perturbations


def output_saver(folder: Path, save_masks: bool, save_prob: bool):
    """An `on_image` callback that names every image (unique per list) and writes what was asked; the names, in
    scoring order, go into the per-image CSV."""
    namer, names = UniqueNames(), []
    if save_masks:
        (folder / "masks").mkdir(parents=True, exist_ok=True)
    if save_prob:
        (folder / "prob").mkdir(parents=True, exist_ok=True)

    def on_image(item, prediction):
        name = namer.for_image(item["path"])
        names.append(name)
        if save_masks:
            write_mask(folder / "masks" / f"{name}.png", prediction)
        if save_prob:
            write_probability(folder / "prob" / f"{name}.npy", prediction)
    return on_image, names


def format_value(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return "-" if value is None else str(value)


def format_table(rows: list[dict], columns) -> str:
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def summary_row(name: str, results: dict) -> dict:
    row = {"dataset": name, "tampered": results["n_tampered"], "authentic": results["n_authentic"],
           "skipped": len(results["skipped"])}
    row.update({key: results[key] for key in METRIC_COLUMNS})
    return row


def save_settings(out: Path, args, argv, trained, lists, device, num_workers, perturbations) -> None:
    settings = {
        "protocol": PROTOCOL,
        "weights": os.path.abspath(args.weights),
        "weights_sha256_prefix": sha256_of(args.weights)[:16],
        "weights_format": trained.source_format,
        "backbone": trained.backbone,
        "head": trained.head,
        "load_notes": trained.notes,
        "lists": lists,
        "input_size": args.input_size,
        "resolution": args.resolution,
        "tiling": None if args.tiling is None else dataclasses.asdict(args.tiling),
        "backend": args.backend,
        "fast_path": args.fast,
        "batch_size": args.batch_size,
        "device": str(device),
        "num_workers": num_workers,
        "save_masks": args.save_masks,
        "save_prob": args.save_prob,
        "skip_bad": args.skip_bad,
        "perturbations": [p.name for p in perturbations],
        "argv": list(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
    }
    if trained.config is not None:
        settings["training_config"] = yaml.safe_load(trained.config.dump())
    atomic_write_text(str(out / "settings.yaml"), yaml.safe_dump(settings, sort_keys=False))


def plain_number(level):
    """3.0 -> 3 (noise and blur levels are parsed as floats), so that tables show the level as it was asked."""
    return int(level) if isinstance(level, float) and level.is_integer() else level


def run_robustness(predict, datasets_rows, clean_results, perturbations, args, device, num_workers) -> list[dict]:
    """One row per list and distortion level; the clean run comes first as the reference."""
    rows = []
    for name, rows_of_list in datasets_rows.items():
        rows.append({"dataset": name, "distortion": "clean", "level": None,
                     **{k: clean_results[name][k] for k in METRIC_COLUMNS}})
        for perturbation in perturbations:
            dataset = test_dataset(rows_of_list, args, perturbation)
            results = evaluate(predict, dataset, device, num_workers=num_workers, desc=f"{name} {perturbation.name}",
                               tiling=args.tiling, batch_size=args.batch_size,
                               progress=not args.no_progress, skip_bad=args.skip_bad)
            rows.append({"dataset": name, "distortion": perturbation.kind, "level": plain_number(perturbation.level),
                         **{k: results[k] for k in METRIC_COLUMNS}})
    return rows


def plot_rows(robustness_rows: list[dict]) -> list[dict]:
    """The distorted rows for `plot_robustness`: one point per (distortion, level), one line per list and metric."""
    datasets = list(dict.fromkeys(row["dataset"] for row in robustness_rows))
    points: dict[tuple, dict] = {}
    for row in robustness_rows:
        if row["distortion"] == "clean":
            continue
        level = CHAIN_LEVEL if row["level"] is None else row["level"]
        point = points.setdefault((row["distortion"], level), {"distortion": row["distortion"], "level": level})
        for metric in PLOTTED_METRICS:
            point[metric if len(datasets) == 1 else f"{row['dataset']} {metric}"] = row[metric]
    return list(points.values())


def test_dataset(rows, args, perturb=None) -> ForgeryDataset:
    """The list's images as the model sees them: squash-resized to --input-size, or at their own size (native)."""
    return ForgeryDataset(rows, mode="test", input_size=dataset_input_size(args.input_size, args.tiling),
                          perturb=perturb)


def constant_predictor(value: float):
    """A 'model' predicting `value` everywhere: the trivial baselines."""
    def predict(images):
        return torch.full((images.shape[0], images.shape[2] // 4, images.shape[3] // 4), value)
    return predict


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    check_out_folder(out, args.overwrite)
    # Loaded first, so that a bad --config is refused at once even when --flist and --num-workers leave it unused.
    config = load_config(args.config) if args.config else None
    perturbations = perturbations_from(args)
    device = resolve_device(args.device)
    if args.fast and args.backend == "onnxruntime":
        raise SystemExit("--fast is PyTorch's inference path; ONNX Runtime (--backend onnxruntime) runs the exported "
                         "graph as it is")
    trained = load_for_backend(args, device)
    args = argparse.Namespace(**{**vars(args), "input_size": trained.input_size(args.input_size),  # a copy
                                 "tiling": tiling_from(args)})
    lists = resolve_lists(args, config, trained)
    datasets_rows = {name: read_flist(path) for name, path in lists.items()}
    num_workers = (args.num_workers if args.num_workers is not None
                   else settings_config(config, trained).TEST.NUM_WORKERS)

    out.mkdir(parents=True, exist_ok=True)
    save_settings(out, args, argv, trained, lists, device, num_workers, perturbations)
    predict = probability_predictor(trained.model, fast=args.fast)
    results, summary = {}, []
    with stop_requests() as stop:
        for name, rows in datasets_rows.items():
            result = score_list(predict, name, rows, lists[name], out, args, device, num_workers, stop)
            results[name], table_rows = list_results(name, result, lists[name], rows, args, device, num_workers)
            summary += table_rows
    report = {"protocol": PROTOCOL, "resolution": args.resolution, "weights": os.path.abspath(args.weights),
              "datasets": results}
    robustness = None
    if perturbations:
        robustness = run_robustness(predict, datasets_rows, results, perturbations, args, device, num_workers)
    write_report(out, report, summary, robustness)
    return report


def score_list(predict, name, rows, list_path, out, args, device, num_workers, stop) -> dict:
    """Score one list, writing its per-image CSV (also for the images done when stopped) and masks."""
    on_image, names = output_saver(out / name, args.save_masks, args.save_prob)
    dataset = test_dataset(rows, args)
    csv_path = out / name / "per_image.csv"
    try:
        result = evaluate(predict, dataset, device, num_workers=num_workers, desc=name,
                          progress=not args.no_progress, on_image=on_image, skip_bad=args.skip_bad, stop=stop,
                          tiling=args.tiling, batch_size=args.batch_size)
    except ImageReadError as error:
        raise ImageReadError(error.path, f"{error.problem} (listed in {list_path}); pass --skip-bad to skip "
                                         "unreadable images and count them instead") from None
    except EvaluationStopped as stopped:
        for row, image_name in zip(stopped.rows, names):
            row["name"] = image_name
        write_csv(csv_path, stopped.rows, PER_IMAGE_COLUMNS)
        raise Interrupted(f"interrupted in {name} after {len(stopped.rows)} of {len(rows)} images: their per-image "
                          f"results are in {csv_path}; no metrics.json was written") from None
    for row, image_name in zip(result["per_image"], names):
        row["name"] = image_name
    write_csv(csv_path, result["per_image"], PER_IMAGE_COLUMNS)
    return result


def list_results(name, result, list_path, rows, args, device, num_workers) -> tuple[dict, list[dict]]:
    """A list's entry of metrics.json and its table rows (with the trivial baselines when asked)."""
    for _, problem in result["skipped"]:
        print(f"skipped: {problem}", file=sys.stderr)
    entry = {key: value for key, value in result.items() if key != "per_image"}
    entry["list"] = list_path
    table_rows = [summary_row(name, result)]
    if args.baselines:
        dataset = test_dataset(rows, args)
        for label, constant in (("all-forged", 1.0), ("all-authentic", 0.0)):
            baseline = evaluate(constant_predictor(constant), dataset, device, num_workers=num_workers,
                                desc=f"{name} {label}", progress=False, skip_bad=args.skip_bad, tiling=args.tiling,
                                batch_size=args.batch_size)
            entry[label] = {k: v for k, v in baseline.items() if k != "per_image"}
            table_rows.append(summary_row(f"{name} {label}", baseline))
    return entry, table_rows


def write_report(out: Path, report: dict, summary: list[dict], robustness: list[dict] | None) -> None:
    """metrics.json, table.txt (printed too) and, with distortions, robustness.csv and its plot."""
    if robustness:
        write_csv(out / "robustness.csv", robustness, ROBUSTNESS_COLUMNS)
        plot_robustness(plot_rows(robustness), out / "robustness.png")
        report["robustness"] = robustness
    atomic_write_text(str(out / "metrics.json"), json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    table = format_table(summary, ("dataset", "tampered", "authentic", "skipped") + METRIC_COLUMNS)
    if robustness:
        shown = [{**row, "level": None if row["level"] is None else f"{row['level']:g}"} for row in robustness]
        table += "\n\n" + format_table(shown, ROBUSTNESS_COLUMNS)
    atomic_write_text(str(out / "table.txt"), table + "\n")
    print(table)
    print(f"results in {out}")


if __name__ == "__main__":
    run_script(main)

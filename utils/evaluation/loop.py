"""Scoring a predictor on a file list by the MPC protocol (docs/METRICS.md), one image at a time, and the pieces the
test and inference scripts share: the prediction function, output names and files.

`predict` maps a 1×3×S×S image batch to a 1×h×w probability map in [0, 1] (the stage-2 head's sigmoid, or the
stage-1 k-means mask). The map is resized to the ground truth's original size as the official `test.py` does, then
every pixel metric is accumulated on tampered images and the image-level metrics on all of them.
"""
from __future__ import annotations

import csv
import io
import math
import platform
import unicodedata
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.dataset import CatchReadErrors, is_read_error
from datasets.io import ImageReadError
from utils.files import atomic_write_text
from utils.evaluation.metrics import PER_IMAGE_METRICS, PIXEL_KEYS, ImageMetrics, PixelMetrics
from utils.evaluation.prediction import ProbabilityMap, Tiling, predict_map, protocol_maps

# Columns of the per-image rows, in CSV order; pixel metrics are empty for authentic images.
PER_IMAGE_COLUMNS = ("name", "path", "tampered", "score", "height", "width", "forged_fraction",
                     "predicted_fraction") + tuple(PER_IMAGE_METRICS)


RESOLUTIONS = ("protocol", "native")


def add_resolution_arguments(parser, default_fast: bool) -> None:
    """The options test.py and infer.py share: the resolution the model sees, tiling, and the fast path."""
    parser.add_argument("--resolution", choices=RESOLUTIONS, default="protocol",
                        help="protocol (default): squash-resize to --input-size, what the published numbers mean; "
                             "native: the image at its own size, padded to a multiple of 32, tiled when large")
    parser.add_argument("--tile", type=int, default=Tiling.tile,
                        help=f"native: images larger than this (pixels a side, a multiple of 32) run in overlapping "
                             f"tiles of this size, blended across the seams; 0 = never tile (default {Tiling.tile})")
    parser.add_argument("--tile-overlap", type=int, default=Tiling.overlap,
                        help=f"native: overlap of neighbouring tiles in pixels, a multiple of 32 "
                             f"(default {Tiling.overlap})")
    if default_fast:
        parser.add_argument("--plain", dest="fast", action="store_false",
                            help="the plain eval forward instead of the fast inference path (same maps up to "
                                 "rounding, slower)")
    else:
        parser.add_argument("--fast", action="store_true",
                            help="the fast inference path (BatchNorm folded, channels-last, fused attention): the "
                                 "same maps up to float rounding (≤ 1e-5), faster; off by default so that the "
                                 "protocol's numbers stay bit for bit what they are")


BACKENDS = ("pytorch", "onnxruntime")


def add_backend_argument(parser) -> None:
    """test.py's and infer.py's --backend: PyTorch weights, or an .onnx file of stage2/export.py in ONNX Runtime."""
    parser.add_argument("--backend", choices=BACKENDS, default="pytorch",
                        help="onnxruntime: --weights is an .onnx file written by stage2/export.py, run by ONNX Runtime "
                             "on the CPU (the fast path does not apply)")


def load_for_backend(args, device: torch.device):
    """The `TrainedModel` --weights names for --backend (with --backbone/--head for official files)."""
    from models import load_trained_model
    from models.onnx_backend import load_onnx_model

    if args.backend == "onnxruntime":
        return load_onnx_model(args.weights, args.backbone, args.head)
    return load_trained_model(args.weights, args.backbone, args.head, device)


def add_batch_size_argument(parser) -> None:
    """test.py's and infer.py's --batch-size (the viewer runs one image at a time)."""
    parser.add_argument("--batch-size", type=int, default=1,
                        help="protocol resolution: images per forward pass (they share the input size; default 1). "
                             "The maps equal one image at a time's up to float rounding; on the CPU a larger batch "
                             "is slower per image, not faster")


def tiling_from(args) -> Tiling | None:
    """The `Tiling` of --resolution native (None for the protocol's squash-resize); a bad size, or a batch size
    other than 1 with native resolution (its images differ in size), is a SystemExit."""
    batch_size = getattr(args, "batch_size", 1)
    if batch_size < 1:
        raise SystemExit(f"--batch-size {batch_size}: must be at least 1")
    if args.resolution != "native":
        return None
    if batch_size != 1:
        raise SystemExit("--batch-size applies to --resolution protocol: at native resolution every image has its "
                         "own size and runs alone")
    try:
        return Tiling(args.tile, args.tile_overlap)
    except ValueError as error:
        raise SystemExit(f"--tile/--tile-overlap: {error}") from None


class EvaluationStopped(Exception):
    """`evaluate` stopped on request; `rows` are the per-image rows of the images scored before."""

    def __init__(self, rows: list[dict]):
        super().__init__(f"stopped after {len(rows)} images")
        self.rows = rows


def single_item(batch: list):
    """DataLoader collate for batch size 1 with items of different sizes: the item itself."""
    return batch[0]


def _mask_2d(mask: torch.Tensor) -> np.ndarray:
    """The dataset's original-size mask (H×W or 1×H×W float) as a bool H×W array."""
    return mask.reshape(mask.shape[-2:]).numpy() > 0.5


def predicted_items(predict: Callable[[torch.Tensor], torch.Tensor], items: Iterable[dict],
                    size_of: Callable[[dict], tuple[int, int]], device: torch.device, tiling: Tiling | None = None,
                    batch_size: int = 1) -> Iterator[tuple[dict, ProbabilityMap | None]]:
    """Each item of `items` (a `CatchReadErrors` loader's) with its prediction at `size_of(item)`, in order: a read
    error with None. Squash-resized images (no `tiling`) go through `predict` up to `batch_size` at a time, stacked
    (they share the input size); at native resolution each image runs alone (`predict_map`)."""
    pending: list[dict] = []

    def flush() -> list[tuple[dict, ProbabilityMap]]:
        if not pending:
            return []
        maps = protocol_maps(predict, [item["image"] for item in pending], [size_of(item) for item in pending],
                             device)
        done = list(zip(pending, maps))
        pending.clear()
        return done

    for item in items:
        if is_read_error(item) or tiling is not None:
            yield from flush()
            yield item, None if is_read_error(item) else predict_map(predict, item["image"], size_of(item), device,
                                                                     tiling)
            continue
        pending.append(item)
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], dataset, device: torch.device, num_workers: int = 0,
             desc: str = "evaluating", progress: bool = True, on_image: Callable | None = None,
             skip_bad: bool = False, stop: Callable[[], bool] = lambda: False, tiling=None,
             batch_size: int = 1) -> dict:
    """Metrics of `predict` on `dataset` (a `ForgeryDataset` in test/val mode: masks at their original size).

    `on_image(item, prediction)` is called for every image with its `ProbabilityMap` at the original size (saving
    masks, probability maps, logging a few predictions). An unreadable image or mask raises `ImageReadError` naming
    the file, or with `skip_bad` is left out and listed in `skipped` as (path, message). When `stop()` says so
    (a Ctrl-C, see `utils.interrupt`), scoring stops between images with `EvaluationStopped`, which carries the
    rows of the images done. `tiling` (a `prediction.Tiling`): the dataset gives images at their own size
    (`input_size=None`), predicted at native resolution; without it, `batch_size` squash-resized images go through
    `predict` at a time (`predicted_items`). Returns the merged pixel and image metrics, `per_image` rows (every
    scored image, columns `PER_IMAGE_COLUMNS` less `name`) and `skipped`.
    """
    loader = DataLoader(CatchReadErrors(dataset), batch_size=1, shuffle=False, num_workers=num_workers,
                        collate_fn=single_item)
    pixel, image_level = PixelMetrics(), ImageMetrics()
    rows, skipped = [], []
    items = tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for item, prediction in predicted_items(predict, items, lambda item: item["mask"].shape[-2:], device, tiling,
                                            batch_size):
        if stop():
            raise EvaluationStopped(rows)
        if is_read_error(item):
            error = ImageReadError(item["bad_file"], item["error"])
            if not skip_bad:
                raise error
            skipped.append((item["bad_file"], str(error)))
            continue
        gt = _mask_2d(item["mask"])
        tampered = item["tampered"]
        row = {"path": item["path"], "tampered": tampered, "score": prediction.score}
        if tampered:  # pixel metrics on tampered images only, as in MPC
            row.update(pixel.update(prediction.values_255, gt, name=item["path"]))
            del row["name"]
        else:
            row.update(height=gt.shape[0], width=gt.shape[1])
        image_level.update(float(prediction.values_255.max()), int(tampered))
        rows.append(row)
        if on_image is not None:
            on_image(item, prediction)
    if not rows:
        raise RuntimeError(f"{desc}: no image could be scored ({len(skipped)} skipped as unreadable)")
    image_results = image_level.compute()
    pixel_results = pixel.compute() if image_results["n_tampered"] else dict.fromkeys(PIXEL_KEYS, math.nan)
    results = {**pixel_results, **image_results}
    results["per_image"] = rows
    results["skipped"] = skipped
    return results


def mpc_score(results_per_set: dict[str, dict]) -> float:
    """The official validation score: the mean of F1 and IoU over the validation sets (docs/MPC_SPEC.md §3)."""
    values = [r[key] for r in results_per_set.values() for key in ("f1_fixed", "iou")]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else 0.0


def validation_summary(results_per_set: dict[str, dict]) -> dict:
    """What a training validation logs: the score, then each set's F1 and IoU."""
    summary = {"score": mpc_score(results_per_set)}
    for name, result in results_per_set.items():
        summary[f"{name}_f1"] = result["f1_fixed"]
        summary[f"{name}_iou"] = result["iou"]
    return summary


def finite_or_none(value):
    """NaN (an undefined metric) -> None: empty in CSV, null in JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_safe(value):
    """Nested dicts/lists/tuples with NaN replaced by None and text escaped as in the CSV (`escape_text`), for
    strict JSON."""
    if isinstance(value, dict):
        return {escape_text(key) if isinstance(key, str) else key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, str):
        return escape_text(value)
    return finite_or_none(value)


def environment() -> dict:
    """Versions and machine, for the settings saved beside results."""
    import sklearn  # slow to import; only needed here

    info = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
            "opencv": cv2.__version__, "scikit-learn": sklearn.__version__, "machine": platform.node(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---- output files ---------------------------------------------------------------------------------------------------
# Names from other systems (archives unpacked from other platforms, files made by scripts) may hold what breaks an
# output: bytes that are not UTF-8 (Python keeps them as lone surrogates U+DC80..U+DCFF, which UTF-8 text cannot
# hold), control characters such as a newline (they split CSV rows and log lines), Unicode line separators. Each is
# written as %XX, its byte value (%uXXXX for the rare code points above U+00FF): one escaping for file names, CSV
# and JSON, idempotent, so an escaped name passes through every writer unchanged.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
# File names also lose a leading '-' (read as an option by the shell tools that meet it) and '.' (hidden), and are
# cut to 200 bytes: the longest output name adds "_heatmap.png" and a "_N" suffix to stay under the usual 255.
_LEADING_ESCAPES = {"-": "%2D", ".": "%2E"}
MAX_NAME_BYTES = 200


def escape_text(text: str) -> str:
    """`text` with undecodable bytes, control characters and line separators written as %XX."""
    if text.isprintable():
        return text
    parts = []
    for char in text:
        code = ord(char)
        if unicodedata.category(char) not in _ESCAPED_CATEGORIES:
            parts.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by os.fsdecode as a lone surrogate
            parts.append(f"%{code - 0xDC00:02X}")
        else:
            parts.append(f"%{code:02X}" if code <= 0xFF else f"%u{code:04X}")
    return "".join(parts)


def safe_file_name(name: str) -> str:
    """`escape_text(name)` that is also safe as a file name: no leading '-' or '.', at most 200 UTF-8 bytes."""
    name = escape_text(name)
    if name[:1] in _LEADING_ESCAPES:
        name = _LEADING_ESCAPES[name[0]] + name[1:]
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        name = encoded[:MAX_NAME_BYTES].decode("utf-8", errors="ignore")  # never half a character
    return name


class UniqueNames:
    """Output names that never collide: `take("x")` gives `x`, then `x_2`, `x_3`, ... in order of arrival. Compared
    case-insensitively, for file systems that are. Names are made safe first (`safe_file_name`), so a name from
    another system (undecodable bytes, a newline, a leading dash) still gets its outputs, escaped the same way in
    the files' names, the CSV and the JSON."""

    def __init__(self):
        self._taken: set[str] = set()

    def take(self, name: str) -> str:
        name = safe_file_name(name) or "image"
        unique, count = name, 1
        while unique.lower() in self._taken:
            count += 1
            unique = f"{name}_{count}"
        self._taken.add(unique.lower())
        return unique

    def for_image(self, path) -> str:
        """The image's file name less its last extension (inner dots kept: `a.b.jpg` -> `a.b`), made unique (the
        same stem in two folders)."""
        return self.take(Path(str(path)).stem or "image")


def _csv_cell(value):
    if finite_or_none(value) is None:
        return ""
    return escape_text(value) if isinstance(value, str) else value


def write_csv(path, rows: list[dict], columns) -> None:
    """Rows as CSV with the given columns, atomically; NaN and missing values are left empty, text is escaped
    (`escape_text`: one row per line, always valid UTF-8)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_cell(row.get(key)) for key in columns})
    atomic_write_text(str(path), buffer.getvalue())

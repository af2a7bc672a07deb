"""Scoring a predictor on a file list by the MPC protocol (METRICS.md), one image at a time, and the pieces the
test and inference scripts share: loading trained stage-2 weights, the prediction function, output names and files.

`predict` maps a 1×3×S×S image batch to a 1×h×w probability map in [0, 1] (the stage-2 head's sigmoid, or the
stage-1 k-means mask). The map is resized to the ground truth's original size as the official `test.py` does, then
every pixel metric is accumulated on tampered images and the image-level metrics on all of them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from fvcore.common.config import CfgNode
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets.io import ImageReadError
from models import HEADS, OUR_FORMAT, CheckpointError, build_stage2_model, load_checkpoint, read_checkpoint
from utils.files import atomic_write_bytes, atomic_write_text, write_png
from utils.config import get_default_config
from utils.evaluation.metrics import ImageMetrics, PixelMetrics, binarize, upsample_probability

PROTOCOL_INPUT_SIZE = 512  # MPC squash-resizes every test image to 512×512

# Columns of the per-image rows, in CSV order; pixel metrics are empty for authentic images.
PER_IMAGE_COLUMNS = ("name", "path", "tampered", "score", "height", "width", "forged_fraction",
                     "predicted_fraction", "f1_fixed", "iou", "f1_best", "f1_permuted", "auc")
# Dataset-level pixel metrics (`PixelMetrics.compute`), NaN when a list holds no tampered image.
PIXEL_KEYS = ("n_images", "f1_fixed", "iou", "f1_best", "f1_permuted", "f1_pooled", "auc_mean", "auc_skipped",
              "auc_pooled")


class CatchReadErrors(Dataset):
    """Wraps a dataset of (image, mask) rows so that an unreadable item comes back as `{"error": problem,
    "bad_file": the file at fault, "path": image path, "index": i}` instead of raising inside a DataLoader worker,
    where the exception would lose its type and its clear message."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except ImageReadError as error:
            return {"error": error.problem, "bad_file": error.path, "path": str(self.dataset.rows[index][0]),
                    "index": index}


def single_item(batch: list):
    """DataLoader collate for batch size 1 with items of different sizes: the item itself."""
    return batch[0]


def _mask_2d(mask: torch.Tensor) -> np.ndarray:
    """The dataset's original-size mask (H×W or 1×H×W float) as a bool H×W array."""
    return mask.reshape(mask.shape[-2:]).numpy() > 0.5


def _listed_as_tampered(dataset, index: int) -> bool:
    """A row with a mask path is a tampered image, even when its mask is empty: the official test scores such an
    image (F1 = 0); a row without one is authentic."""
    return bool(str(dataset.rows[index][1]))


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], dataset, device: torch.device, num_workers: int = 0,
             desc: str = "evaluating", progress: bool = True, on_image: Callable | None = None,
             skip_bad: bool = False) -> dict:
    """Metrics of `predict` on `dataset` (a `ForgeryDataset` in test/val mode: masks at their original size).

    `on_image(item, prob_255)` is called for every image with the map at the original size (saving masks, probability
    maps, logging a few predictions). An unreadable image or mask raises `ImageReadError` naming the file, or with
    `skip_bad` is left out and listed in `skipped` as (path, message). Returns the merged pixel and image metrics,
    `per_image` rows (every scored image, columns `PER_IMAGE_COLUMNS` less `name`) and `skipped`.
    """
    loader = DataLoader(CatchReadErrors(dataset), batch_size=1, shuffle=False, num_workers=num_workers,
                        collate_fn=single_item)
    pixel, image_level = PixelMetrics(), ImageMetrics()
    rows, skipped = [], []
    for item in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        if "error" in item:
            error = ImageReadError(item["bad_file"], item["error"])
            if not skip_bad:
                raise error
            skipped.append((item["path"], str(error)))
            continue
        prob = predict(item["image"].unsqueeze(0).to(device))[0].float().cpu()
        gt = _mask_2d(item["mask"])
        prob_255 = upsample_probability(prob, gt.shape)
        tampered = _listed_as_tampered(dataset, item["index"])
        score = float(prob_255.max())
        row = {"path": item["path"], "tampered": tampered, "score": score / 255.0}
        if tampered:  # pixel metrics on tampered images only, as in MPC
            row.update(pixel.update(prob_255, gt, name=item["path"]))
            del row["name"]
        else:
            row.update(height=gt.shape[0], width=gt.shape[1])
        image_level.update(score, int(tampered))
        rows.append(row)
        if on_image is not None:
            on_image(item, prob_255)
    if not rows:
        raise RuntimeError(f"{desc}: no image could be scored ({len(skipped)} skipped as unreadable)")
    image_results = image_level.compute()
    pixel_results = pixel.compute() if image_results["n_tampered"] else dict.fromkeys(PIXEL_KEYS, math.nan)
    results = {**pixel_results, **image_results}
    results["per_image"] = rows
    results["skipped"] = skipped
    return results


def mpc_score(results_per_set: dict[str, dict]) -> float:
    """The official validation score: the mean of F1 and IoU over the validation sets (MPC_SPEC §3)."""
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
    """Nested dicts/lists/tuples with NaN replaced by None, for strict JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return finite_or_none(value)


# ---- trained stage-2 weights ----------------------------------------------------------------------------------------
@dataclass
class TrainedModel:
    """A stage-2 model in eval mode and what it was built from."""

    model: torch.nn.Module
    weights: str
    source_format: str  # OUR_FORMAT (ours) or "official state_dict"
    backbone: str
    head: str
    config: object = None  # the training config (CfgNode) stored in our checkpoints
    load_report: object = None
    notes: list[str] = field(default_factory=list)

    def input_size(self, asked: int | None = None) -> int:
        """The squash-resize size: what was asked, else the size our checkpoint was trained at, else the
        protocol's 512 (official weights)."""
        if asked:
            return asked
        return int(self.config.DATA.INPUT_SIZE) if self.config is not None else PROTOCOL_INPUT_SIZE


def head_from_state_dict(state, source: str) -> str:
    """The head (`models.HEADS` name) whose hidden widths match the `decoder.classifier` convolutions of an official
    state_dict: the CATNet and CASIAv2 releases differ by one 128->64 layer."""
    convs = {}
    for key, value in state.items():
        parts = str(key).removeprefix("module.").split(".")
        if (len(parts) == 4 and parts[:2] == ["decoder", "classifier"] and parts[2].isdigit() and parts[3] == "weight"
                and isinstance(value, torch.Tensor) and value.ndim == 4):
            convs[int(parts[2])] = tuple(value.shape)
    if not convs:
        raise CheckpointError(f"{source}: holds no localization head (no 'decoder.classifier.*' weights); a stage-1 "
                              "backbone or an ImageNet checkpoint cannot localise: pass stage-2 weights")
    hidden = tuple(shape[0] for _, shape in sorted(convs.items())[:-1])
    for name, widths in HEADS.items():
        if widths == hidden:
            return name
    raise CheckpointError(f"{source}: its head has hidden widths {list(hidden)}, which match no known head "
                          f"({', '.join(f'{n}: {list(w)}' for n, w in HEADS.items())})")


def _our_config(checkpoint: dict, path: str):
    if int(checkpoint.get("stage", 0)) != 2:
        raise CheckpointError(f"{path}: a stage-{checkpoint.get('stage')} checkpoint; testing and inference need the "
                              "stage-2 model (backbone + head)")
    cfg = get_default_config()
    try:
        cfg.merge_from_other_cfg(CfgNode.load_cfg(checkpoint["config"]))
    except Exception as error:
        raise CheckpointError(f"{path}: its stored config cannot be read ({error})") from None
    cfg.freeze()
    return cfg


def load_trained_model(path: str, backbone: str | None = None, head: str | None = None,
                       device: torch.device = torch.device("cpu")) -> TrainedModel:
    """Build the stage-2 model that `path` holds and load it (every tensor required).

    Our checkpoints carry their config, which names the backbone and head; an official bare state_dict takes
    `backbone` (default hrt_base) and its head is recognised from its layer widths (CATNet or CASIAv2 release).
    A `backbone`/`head` that contradicts our checkpoint's config is an error.
    """
    path = str(path)
    contents = read_checkpoint(path, mmap=True)  # mapped: the tensors are not held twice while loading
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path}: not a state dict (the file holds a {type(contents).__name__})")
    notes = []
    if contents.get("format") == OUR_FORMAT:
        config = _our_config(contents, path)
        found = {"backbone": config.MODEL.BACKBONE, "head": config.MODEL.HEAD}
        for what, asked in (("backbone", backbone), ("head", head)):
            if asked is not None and asked != found[what]:
                raise CheckpointError(f"{path}: --{what} {asked} contradicts the checkpoint's config "
                                      f"(MODEL.{what.upper()} {found[what]}); leave --{what} out for our checkpoints")
        backbone, head, source_format = found["backbone"], found["head"], OUR_FORMAT
    elif isinstance(contents.get("model"), dict):
        raise CheckpointError(f"{path}: an ImageNet classification checkpoint ({{'model': ...}}), not a stage-2 model")
    else:
        config, source_format = None, "official state_dict"
        detected = head_from_state_dict(contents, path)
        if head is not None and head != detected:
            raise CheckpointError(f"{path}: --head {head} asked for, but the file's head is {detected}")
        head, backbone = detected, backbone or "hrt_base"
        notes.append(f"head {head} recognised from the file's layer widths")
    model = build_stage2_model(backbone, head=head)
    try:
        report = load_checkpoint(model, contents)
    except CheckpointError as error:
        hint = "" if config is not None else f"; it was built as --backbone {backbone}: is the file for another one?"
        raise CheckpointError(f"{path}: {error}{hint}") from None
    model.eval().to(device)
    return TrainedModel(model, path, source_format, backbone, head, config, report, notes)


def probability_predictor(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images B×3×S×S in [0, 1] -> B×S/4×S/4 probabilities: the one-logit head's sigmoid, as the official test."""
    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model(images))[:, 0]
    return predict


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
class UniqueNames:
    """Output names that never collide: `take("x")` gives `x`, then `x_2`, `x_3`, ... in order of arrival. Compared
    case-insensitively, for file systems that are."""

    def __init__(self):
        self._taken: set[str] = set()

    def take(self, name: str) -> str:
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


def write_mask(path, prob_255: np.ndarray) -> None:
    """The official binary mask (> 127 on the 0-255 map) as a 0/255 PNG."""
    write_png(path, binarize(prob_255).astype(np.uint8) * 255)


def probability_01(prob_255: np.ndarray) -> np.ndarray:
    """The 0-255 map back on [0, 1] as float32 (clipped: bilinear resizing may overshoot 255 by a rounding error)."""
    return np.clip(prob_255 / np.float32(255.0), 0.0, 1.0).astype(np.float32)


def write_probability(path, prob_255: np.ndarray) -> None:
    """The probability map in [0, 1] as a float32 `.npy`, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, probability_01(prob_255))
    atomic_write_bytes(str(path), buffer.getvalue())


def write_csv(path, rows: list[dict], columns) -> None:
    """Rows as CSV with the given columns, atomically; NaN and missing values are left empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if finite_or_none(row.get(key)) is None else row[key] for key in columns})
    atomic_write_text(str(path), buffer.getvalue())

"""An interactive local viewer: upload an image, see where a stage-2 model thinks it was tampered with.

    python stage2/app.py --weights weights/mpc_demo_hrt_nano_stage2.pth [--folder photos/] [--port 7860]

Serves a page on 127.0.0.1 (Gradio; `make app` installs requirements-app.txt and runs this with the demo weights).
The page shows, for an uploaded image or one picked from --folder:

- the heat map over the image: the same pixels as stage2/infer.py's <name>_heatmap.png for the same image, weights
  and opacity (the same reader, pre-processing, `predict_map` and `heatmap_overlay`; infer.py's --resolution,
  --tile, --tile-overlap and --plain options, with its defaults, here and in the page);
- the binary mask at a threshold t (a slider): a pixel is forged when its value on the official 0-255 scale is
  > int(t * 255), the official rule, so t = 0.5 gives exactly the protocol's mask (`ProbabilityMap.mask()`);
- the image-level score (the map's maximum);
- with a ground-truth mask, F1 and IoU at t and at 0.5, the best F1 over thresholds and the pixel AUC (computed by
  utils.evaluation.metrics);
- "what if": the robustness distortions of datasets/perturb.py (JPEG, resize, blur, noise, the social-network
  chain) applied to the image before anything else, as `stage2/test.py --perturb` does, and the new map beside the
  first (at the image's original size, so it compares with the ground truth);
- downloads: the mask at t (PNG, 0/255), the heat map (PNG) and the probability map (float32 .npy in [0, 1]).

The weights are any stage-2 checkpoint of ours or an official stage-2 file (a path), or the name of a registry entry
whose file is in weights/; loaded models are kept. Errors (an unreadable image, a bad weights file) are shown in the
page and the server keeps running.
"""
from __future__ import annotations

import argparse
import atexit
import math
import os
import shutil
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python stage2/app.py`: make the repository's packages importable first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from datasets.dataset import ForgeryDataset
from datasets.io import IMAGE_EXTENSIONS, read_mask
from datasets.perturb import ROBUSTNESS_GRID, make_perturbation
from models import load_trained_model
from models.registry import load_registry
from utils.errors import UserError
from utils.evaluation.loop import RESOLUTIONS, add_resolution_arguments, tiling_from
from utils.evaluation.metrics import PixelMetrics, binary_f1, official_iou
from utils.evaluation.prediction import (ProbabilityMap, Tiling, dataset_input_size, predict_map, probability_predictor,
                                         write_probability)
from utils.evaluation.visualize import heatmap_overlay
from utils.files import write_png
from utils.runtime import resolve_device

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = REPO / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "mpc_demo_hrt_nano_stage2.pth"
DEFAULT_ALPHA = 0.5  # stage2/infer.py's --alpha default
PROTOCOL_THRESHOLD = 0.5  # the official int(0.5 * 255) = 127
IMAGE_HEIGHT = 240  # pixels of each picture in the page (the files keep the image's size)
DISTORTIONS = dict(ROBUSTNESS_GRID)  # name -> the robustness grid's levels (docs/METRICS.md)


# ----------------------------------------------------------------------------------------------- weights


def registry_choices() -> list[str]:
    """Names of the registered stage-2 weights (an unreadable registry lists none)."""
    try:
        return [entry["name"] for entry in load_registry() if "stage2" in entry["file"]]
    except UserError:
        return []


def resolve_weights(text: str) -> Path:
    """A registry name (its file looked up in weights/) or a path to a weights file."""
    text = (text or "").strip()
    if not text:
        raise UserError("no weights given: pick a registry entry or type the path of a stage-2 weights file")
    try:
        entries = {entry["name"]: entry for entry in load_registry()}
    except UserError:
        entries = {}
    if text in entries:
        entry = entries[text]
        path = WEIGHTS_DIR / entry["file"]
        if not path.is_file():
            where = "; ".join(entry.get("urls") or []) or entry.get("source", "its source")
            raise UserError(f"registry entry {text!r}: its file {entry['file']} is not in {WEIGHTS_DIR}; download it "
                            f"({where}) into that folder, or type the path where it is")
        return path
    return Path(text).expanduser()


class ModelCache:
    """Loaded models and their predictors by file (path, size and modification time: a file rewritten in place is
    loaded again) and path (plain or fast)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._models = {}
        self._predictors = {}
        self._lock = threading.Lock()

    def _key(self, weights: str) -> tuple:
        path = resolve_weights(weights)
        try:
            stat = path.stat()
            return str(path.resolve()), stat.st_size, stat.st_mtime_ns
        except OSError:
            return str(path), None, None  # load_trained_model says what is wrong with it

    def get(self, weights: str):
        """The `TrainedModel` of `weights` (a registry name or a path)."""
        key = self._key(weights)
        with self._lock:
            if key not in self._models:
                self._models[key] = load_trained_model(key[0], device=self.device)
            return self._models[key]

    def predictor(self, weights: str, fast: bool):
        """(the `TrainedModel`, its `probability_predictor`), prepared once per model and path."""
        trained = self.get(weights)
        key = (self._key(weights), bool(fast))
        with self._lock:
            if key not in self._predictors:
                self._predictors[key] = probability_predictor(trained.model, fast=bool(fast))
            return trained, self._predictors[key]


# ----------------------------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Analysis:
    """One image through one model: the image the heat map is drawn over and the map at the original size."""

    path: str
    original: np.ndarray  # RGB uint8, as read (after the distortion, if any)
    prediction: ProbabilityMap
    distortion: str | None = None
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # names its download folder


@dataclass(frozen=True)
class Settings:
    """How the model sees an image, as stage2/infer.py's options say (`add_resolution_arguments`): the fast path or
    the plain forward, the protocol's squash-resize (`tiling` None) or the image's own size (a `Tiling`)."""

    fast: bool = True
    tiling: Tiling | None = None


def settings_from(args) -> Settings:
    return Settings(fast=bool(getattr(args, "fast", False)), tiling=tiling_from(args))


def default_settings() -> Settings:
    """stage2/infer.py's defaults: its options come from the same `add_resolution_arguments(default_fast=True)`."""
    parser = argparse.ArgumentParser()
    add_resolution_arguments(parser, default_fast=True)
    return settings_from(parser.parse_args([]))


def analyse(trained, predict, image_path: str, device: torch.device, settings: Settings = Settings(),
            distortion=None) -> Analysis:
    """Read and pre-process as stage2/infer.py does (a test-mode ForgeryDataset item without ground truth, kept
    original; squash-resized to the model's input size, or at its own size with a tiling), then `predict_map`
    (`predict`: `ModelCache.predictor`) at the image's original size. `distortion` (a datasets.perturb callable) is
    applied to the image first, as in the robustness tests; its map is at the size of the image before the
    distortion (the ground truth's), except at native resolution, where it is at the distorted image's size."""
    input_size = dataset_input_size(trained.input_size(), settings.tiling)
    dataset = ForgeryDataset([(str(image_path), "")], mode="test", input_size=input_size, keep_original=True,
                             perturb=distortion)
    item = dataset[0]
    original = item["original"]
    size = original.shape[:2] if settings.tiling is not None else tuple(int(s) for s in item["size"])
    prediction = predict_map(predict, item["image"], size, device, settings.tiling)
    return Analysis(str(image_path), original, prediction, getattr(distortion, "name", None))


def heatmap(analysis: Analysis, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """stage2/infer.py's <name>_heatmap.png pixels."""
    return heatmap_overlay(analysis.original, analysis.prediction.probability(), alpha)


def threshold_255(threshold: float) -> int:
    """The threshold t in [0, 1] on the official 0-255 scale: int(t * 255), as the official int(0.5 * 255) = 127
    (rounded to 6 decimals first, so that a slider's 0.6 is 153 and not 152)."""
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the threshold must lie in [0, 1], got {threshold}")
    return int(math.floor(round(threshold * 255, 6)))


def mask_at(prediction: ProbabilityMap, threshold: float = PROTOCOL_THRESHOLD) -> np.ndarray:
    """The forged pixels (bool) at t: value > int(t * 255) on the 0-255 scale; t = 0.5 is ProbabilityMap.mask()."""
    if threshold_255(threshold) == threshold_255(PROTOCOL_THRESHOLD):
        return prediction.mask()
    return prediction.values_255 > threshold_255(threshold)


def read_ground_truth(path: str, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask by the official mask rule (datasets.io.read_mask), at the image's size."""
    gt = read_mask(path)
    if gt.shape != tuple(shape):
        raise UserError(f"the ground truth {os.path.basename(path)} is {gt.shape[0]}×{gt.shape[1]} but the image is "
                        f"{shape[0]}×{shape[1]}")
    return gt


def scores_against(prediction: ProbabilityMap, gt: np.ndarray, threshold: float) -> dict:
    """F1 and IoU at t (metrics.binary_f1, metrics.official_iou) and the protocol's per-image row (PixelMetrics:
    f1_fixed and iou at 0.5, f1_best, auc)."""
    predicted = mask_at(prediction, threshold)
    tp = int(np.count_nonzero(predicted & gt))
    fp = int(np.count_nonzero(predicted & ~gt))
    fn = int(np.count_nonzero(~predicted & gt))
    row = PixelMetrics().update(prediction.values_255, gt)
    return {"f1": binary_f1(tp, fp, fn), "iou": official_iou(tp, fp, fn), "f1_fixed": row["f1_fixed"],
            "iou_fixed": row["iou"], "f1_best": row["f1_best"], "auc": row["auc"]}


def metrics_text(prediction: ProbabilityMap, gt: np.ndarray | None, threshold: float) -> str:
    if gt is None:
        return "Upload a ground-truth mask to see F1 and IoU."
    if gt.shape != prediction.shape:
        return (f"No F1/IoU: the map is {prediction.shape[0]}×{prediction.shape[1]} (the distorted image's size, at "
                f"native resolution), the ground truth {gt.shape[0]}×{gt.shape[1]}.")
    s = scores_against(prediction, gt, threshold)
    auc = "n/a (one class)" if math.isnan(s["auc"]) else f"{s['auc']:.4f}"
    return (f"| | F1 | IoU |\n|---|---:|---:|\n"
            f"| at threshold {threshold:.2f} | {s['f1']:.4f} | {s['iou']:.4f} |\n"
            f"| protocol (0.5) | {s['f1_fixed']:.4f} | {s['iou_fixed']:.4f} |\n\n"
            f"Best F1 over thresholds: {s['f1_best']:.4f}; pixel AUC: {auc}")


def write_downloads(folder: Path, stem: str, analysis: Analysis, threshold: float, alpha: float) -> dict[str, Path]:
    """The three files offered for download: <stem>_mask.png (at t), <stem>_heatmap.png, <stem>_prob.npy, under
    `folder` (one per analysis) in sub-folders by threshold and opacity; a file already written is not written
    again (moving the threshold rewrites only the mask, and a large image's .npy is written once)."""
    paths = {"mask": folder / f"t{threshold_255(threshold)}" / f"{stem}_mask.png",
             "heatmap": folder / f"a{float(alpha):.4f}" / f"{stem}_heatmap.png", "prob": folder / f"{stem}_prob.npy"}
    writers = {"mask": lambda path: write_png(path, mask_at(analysis.prediction, threshold).astype(np.uint8) * 255),
               "heatmap": lambda path: write_png(path, heatmap(analysis, alpha)),
               "prob": lambda path: write_probability(path, analysis.prediction)}
    for what, path in paths.items():
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            writers[what](path)
    return paths


# Analyses whose download files stay on disk: the page shows two at a time (the image and its "what if"); a long
# session over large images would otherwise fill the temporary disk (a 12000×9000 map's .npy alone is 432 MB).
KEPT_ANALYSES = 8


def keep_recent_downloads(root: Path, current: Path, keep: int = KEPT_ANALYSES) -> None:
    """Mark `current` (an analysis folder under `root`) as just used, and delete all but the `keep` most recently
    used analysis folders; `current` always stays."""
    current.touch()
    others = sorted((p for p in root.iterdir() if p.is_dir() and p != current),
                    key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in others[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)


def folder_images(folder: str | None) -> list[str]:
    """The image files directly in `folder`, sorted by name."""
    if not folder:
        return []
    path = Path(folder)
    if not path.is_dir():
        raise SystemExit(f"--folder {folder}: not a folder")
    return [str(p) for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def distortion_from(kind: str | None, level):
    """A datasets.perturb distortion from the page's fields; None for "none"."""
    if not kind or kind == "none":
        return None
    if DISTORTIONS[kind] == (None,):
        return make_perturbation(kind)
    if level is None or (isinstance(level, str) and not level.strip()):
        raise UserError(f"the distortion '{kind}' needs a level, e.g. {DISTORTIONS[kind][0]}")
    if isinstance(level, float) and level.is_integer():
        level = int(level)
    try:
        return make_perturbation(kind, level)
    except ValueError as error:
        raise UserError(str(error)) from None


# ----------------------------------------------------------------------------------------------- the page


def problem_text(error: BaseException) -> str:
    if isinstance(error, (UserError, ValueError, OSError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def build_app(default_weights: str, folder: str | None = None, device: torch.device = torch.device("cpu"),
              settings: Settings | None = None):
    """The page (a gradio Blocks, not launched). `settings` start as stage2/infer.py's defaults."""
    import gradio as gr

    settings = default_settings() if settings is None else settings
    tiling = settings.tiling or Tiling()  # what "native" uses when picked in the page

    cache = ModelCache(device)
    downloads_root = Path(tempfile.mkdtemp(prefix="mpc_app_"))
    atexit.register(shutil.rmtree, downloads_root, ignore_errors=True)
    weight_choices = list(dict.fromkeys([default_weights, *registry_choices()]))
    images_in_folder = folder_images(folder)

    def fail(error: BaseException) -> str:
        text = problem_text(error)
        gr.Warning(text)
        return f"**Error:** {text}"

    def image_panel(analysis: Analysis, threshold: float, alpha: float, gt):
        """(heat map, mask at t, score text, metrics text, mask file, heat-map file, probability file)."""
        stem = Path(analysis.path).stem + (f"_{analysis.distortion.replace(':', '')}" if analysis.distortion else "")
        files = write_downloads(downloads_root / analysis.key, stem, analysis, threshold, alpha)
        keep_recent_downloads(downloads_root, downloads_root / analysis.key)
        mask = mask_at(analysis.prediction, threshold).astype(np.uint8) * 255
        score = f"Image-level score: **{analysis.prediction.score:.4f}**"
        if analysis.distortion:
            score += f" (after {analysis.distortion})"
        return (heatmap(analysis, alpha), mask, score, metrics_text(analysis.prediction, gt, threshold),
                str(files["mask"]), str(files["heatmap"]), str(files["prob"]))

    empty_panel = (None, None, "", "", None, None, None)

    def chosen(resolution, fast) -> Settings:
        return Settings(fast=bool(fast), tiling=tiling if resolution == "native" else None)

    def localise(path, weights, threshold, alpha, gt_path, resolution, fast):
        """Everything for a new image, weights or settings: (state, status, original, clean panel, what-if panel)."""
        if not path:
            return (None, "Upload an image or pick one.", None) + empty_panel + empty_panel
        try:
            run = chosen(resolution, fast)
            trained, predict = cache.predictor(weights, run.fast)
            clean = analyse(trained, predict, path, device, run)
            gt = read_ground_truth(gt_path, clean.prediction.shape) if gt_path else None
        except Exception as error:  # noqa: BLE001  shown in the page; the server carries on
            return (None, fail(error), None) + empty_panel + empty_panel
        state = {"clean": clean, "perturbed": None, "gt": gt, "weights": weights, "settings": run}
        seen = "its own size" if run.tiling else f"{trained.input_size()}² (squash-resized)"
        status = (f"{os.path.basename(path)}: {clean.original.shape[1]}×{clean.original.shape[0]}; weights "
                  f"{os.path.basename(trained.weights)} ({trained.backbone} + {trained.head}); the model sees "
                  f"{seen}, {'fast' if run.fast else 'plain'} path")
        return (state, status, clean.original) + image_panel(clean, threshold, alpha, gt) + empty_panel

    def redraw(state, threshold, alpha):
        """A new threshold or opacity: no model run."""
        if not state:
            return ("",) + empty_panel + empty_panel
        try:
            clean = image_panel(state["clean"], threshold, alpha, state["gt"])
            perturbed = (image_panel(state["perturbed"], threshold, alpha, state["gt"]) if state["perturbed"]
                         else empty_panel)
        except Exception as error:  # noqa: BLE001
            return (fail(error),) + empty_panel + empty_panel
        return ("",) + clean + perturbed

    def set_ground_truth(state, gt_path, threshold, alpha):
        if not state:
            return (state, "Upload an image first.") + empty_panel + empty_panel
        try:
            gt = read_ground_truth(gt_path, state["clean"].prediction.shape) if gt_path else None
        except Exception as error:  # noqa: BLE001
            return (state, fail(error)) + empty_panel + empty_panel
        state = {**state, "gt": gt}
        return (state,) + redraw(state, threshold, alpha)

    def what_if(state, kind, level, threshold, alpha):
        if not state:
            return (state, "Upload an image first.") + empty_panel
        try:
            distortion = distortion_from(kind, level)
            if distortion is None:
                return ({**state, "perturbed": None}, "") + empty_panel
            trained, predict = cache.predictor(state["weights"], state["settings"].fast)
            perturbed = analyse(trained, predict, state["clean"].path, device, state["settings"], distortion)
            state = {**state, "perturbed": perturbed}
            return (state, "") + image_panel(perturbed, threshold, alpha, state["gt"])
        except Exception as error:  # noqa: BLE001
            return (state, fail(error)) + empty_panel

    def default_level(kind):
        levels = DISTORTIONS.get(kind, (None,))
        if levels == (None,):
            return gr.update(value=None, interactive=False)
        return gr.update(value=levels[len(levels) // 2], interactive=True)

    with gr.Blocks(title="MPC forgery localization viewer") as page:
        gr.Markdown("## MPC forgery localization viewer\nUpload an image (or pick one), choose the weights; the map "
                    "follows the test protocol (squash-resize, sigmoid, bilinear upsampling to the image's size).")
        state = gr.State(None)
        current = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", elem_id="upload")
                picker = gr.Dropdown(choices=images_in_folder, value=None,
                                     label=f"…or an image of --folder {Path(folder).name if folder else ''}",
                                     visible=bool(images_in_folder), elem_id="picker")
                weights = gr.Dropdown(choices=weight_choices, value=default_weights, allow_custom_value=True,
                                      label="Weights: a registry entry or the path of a stage-2 weights file",
                                      elem_id="weights")
                threshold = gr.Slider(0.0, 1.0, value=PROTOCOL_THRESHOLD, step=0.01, elem_id="threshold",
                                      label="Threshold (0.5: the protocol's; forged where value·255 > int(t·255))")
                alpha = gr.Slider(0.0, 1.0, value=DEFAULT_ALPHA, step=0.05, label="Heat-map opacity",
                                  elem_id="alpha")
                with gr.Row():
                    resolution = gr.Radio(list(RESOLUTIONS), value="native" if settings.tiling else "protocol",
                                          label="Resolution (protocol: squash-resize, as tested)",
                                          elem_id="resolution")
                    fast = gr.Checkbox(value=settings.fast, label="Fast inference path", elem_id="fast")
                gt_file = gr.File(label="Ground-truth mask (optional)", elem_id="gt")
                status = gr.Markdown("Upload an image or pick one.", elem_id="status")
            with gr.Column(scale=3):
                with gr.Row():
                    original = gr.Image(label="Image", type="numpy", format="png", interactive=False,
                                        elem_id="original", height=IMAGE_HEIGHT)
                    heat = gr.Image(label="Heat map", type="numpy", format="png", interactive=False, elem_id="heatmap",
                                    height=IMAGE_HEIGHT)
                    mask = gr.Image(label="Mask", type="numpy", format="png", interactive=False, elem_id="mask",
                                    image_mode="L", height=IMAGE_HEIGHT)
                with gr.Row():
                    with gr.Column():
                        score = gr.Markdown(elem_id="score")
                        metrics = gr.Markdown(elem_id="metrics")
                    with gr.Column():
                        mask_file = gr.DownloadButton("Mask PNG", elem_id="download_mask", size="sm")
                        heat_file = gr.DownloadButton("Heat map PNG", elem_id="download_heatmap", size="sm")
                        prob_file = gr.DownloadButton("Probability .npy", elem_id="download_prob", size="sm")
                with gr.Accordion("What if: a robustness distortion (datasets/perturb.py) applied first", open=True):
                    with gr.Row():
                        kind = gr.Dropdown(choices=["none", *DISTORTIONS], value="jpeg", label="Distortion",
                                           elem_id="kind")
                        level = gr.Number(value=DISTORTIONS["jpeg"][len(DISTORTIONS["jpeg"]) // 2], elem_id="level",
                                          label="Level (JPEG quality, resize factor, blur kernel, noise σ)")
                        apply = gr.Button("Apply", elem_id="apply")
                    with gr.Row():
                        heat2 = gr.Image(label="Heat map after the distortion", type="numpy", format="png",
                                         interactive=False, elem_id="heatmap2", height=IMAGE_HEIGHT)
                        mask2 = gr.Image(label="Mask after the distortion", type="numpy", format="png",
                                         interactive=False, elem_id="mask2", image_mode="L", height=IMAGE_HEIGHT)
                        with gr.Column():
                            score2 = gr.Markdown(elem_id="score2")
                            metrics2 = gr.Markdown(elem_id="metrics2")
                            mask_file2 = gr.DownloadButton("Mask PNG", elem_id="download_mask2", size="sm")
                            heat_file2 = gr.DownloadButton("Heat map PNG", elem_id="download_heatmap2", size="sm")
                            prob_file2 = gr.DownloadButton("Probability .npy", elem_id="download_prob2", size="sm")

        panel = [heat, mask, score, metrics, mask_file, heat_file, prob_file]
        panel2 = [heat2, mask2, score2, metrics2, mask_file2, heat_file2, prob_file2]
        run_inputs = [current, weights, threshold, alpha, gt_file, resolution, fast]
        run_outputs = [state, status, original, *panel, *panel2]
        upload.change(lambda f: f, inputs=upload, outputs=current).then(localise, run_inputs, run_outputs)
        picker.change(lambda f: f, inputs=picker, outputs=current).then(localise, run_inputs, run_outputs)
        for control in (weights, resolution, fast):
            control.change(localise, run_inputs, run_outputs)
        threshold.change(redraw, [state, threshold, alpha], [status, *panel, *panel2])
        alpha.change(redraw, [state, threshold, alpha], [status, *panel, *panel2])
        gt_file.change(set_ground_truth, [state, gt_file, threshold, alpha], [state, status, *panel, *panel2])
        kind.change(default_level, kind, level)
        apply.click(what_if, [state, kind, level, threshold, alpha], [state, status, *panel2])
    return page


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                        help="the weights the page starts with: a stage-2 checkpoint, an official stage-2 file or a "
                             "registry entry's name (default: the shipped demo weights)")
    parser.add_argument("--folder", default=None, help="a folder whose images the page offers to pick")
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default 7860)")
    parser.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    add_resolution_arguments(parser, default_fast=True)  # stage2/infer.py's options, with its defaults
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local viewer: no usage reports
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("the viewer needs gradio: run `make app`, or install requirements-app.txt with "
                         "`python stage2/install_app.py`") from None
    page = build_app(args.weights, args.folder, resolve_device(args.device), settings_from(args))
    page.queue().launch(server_name="127.0.0.1", server_port=args.port, inbrowser=False, show_error=True)


if __name__ == "__main__":
    main()

"""Inference speed: the fast path (`models.inference.prepare_for_inference`) against the plain eval forward.

Two tables, and two more on request:

1. **Window attention** on HRT-B's four branches at --size (windows of 7², head_dim 39): the explicit softmax
   against `scaled_dot_product_attention` with the relative position bias as the mask, forward without gradients
   (inference) and forward + backward with the bias gradient (stage-1 training); milliseconds (median) and the MiB
   autograd keeps for backward. This is the measurement behind `models.hrformer.window_softmax_attention`.
2. **Inference** at --size², batch --batch, --threads threads, per model: the plain path as it was before this
   path existed (explicit-softmax attention), the plain path as shipped (eval forward, fused attention), the
   fast path, and the model exported to ONNX (models/export.py, once per model before the rows) run by ONNX
   Runtime with --threads intra-op threads (when onnx and onnxruntime are installed, requirements.txt;
   --no-onnx leaves the row out). Speed: one process per model runs the paths' calls interleaved (1, 2, 3, 4, 1,
   2, ...), so that other jobs on a shared machine slow them alike: images/s = median of --runs calls per path after a
   warm-up, and the process CPU seconds per image (all threads; steadier than wall time under load). Peak memory:
   a fresh process per row, the growth of its max RSS over a warm-up and one call beyond what it held once the
   model was built (and prepared: the fast row also holds the plain model it was prepared from, so that the
   preparation's own peak does not hide the forward's). Also the largest difference of each path's probabilities
   (sigmoid of the logits) and logits from the first row's. Weights: the fixture fill rule
   (shared/fixtures/README.md, every float tensor by its name), the same in every row; input: one seeded random
   image.
3. `--flips`: on the real tampered images of ../shared/data (squash-resized to --size, as the protocol), how many
   output pixels fall on the other side of the 0.5 threshold in the fast path than in the plain path, with the
   demo weights (weights/mpc_demo_hrt_nano_stage2.pth) and with rule-filled HRT-B (--flips-images-base images;
   its logits lie far below 0, so it says little).
4. `--roofline`: the floor under any float32 path on this machine: the model's work per image (GFLOP of its
   convolutions and linear layers by torch's FlopCounterMode, of the window attention's two products, and the
   elements that pass through GELU) at this machine's best float32 matrix-product rate (a 2048³ product) and its
   in-place GELU rate, beside the plain and fast paths' times and half the plain path's (a 2× speed-up).

    .venv/bin/python bench/inference.py [--models hrt_base hrt_small] [--size 512] [--threads 2] [--runs 5] [--flips]
                                        [--roofline] [--no-onnx]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import models.hrformer as hrformer  # noqa: E402
from models.inference import prepare_for_inference  # noqa: E402
from tests.official_fill import fill_value  # noqa: E402

PATHS = ("plain, explicit attention", "plain", "fast")
ONNX_PATH = "onnxruntime"
HRT_BASE_HEADS = (2, 4, 8, 16)
HEAD_DIM = 39  # HRT-B: widths 78·2^i over heads 2·2^i


def machine_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rule_filled_model(backbone: str) -> torch.nn.Module:
    model = models.build_stage2_model(backbone, "catnet")
    # The fixtures README's deterministic fill rule, keyed by the state_dict name (the tests' own copy of it).
    weights = {name: torch.from_numpy(fill_value(name, tuple(t.shape)))
               for name, t in model.state_dict().items() if t.is_floating_point()}
    model.load_state_dict(weights, strict=False)
    return model.eval()


FUSED_WHERE_POSSIBLE = hrformer.window_softmax_attention


def explicit_attention(q, k, v, bias):
    """The official order of operations, whatever the gradient needs: the plain path before the fused kernel."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
    return torch.softmax(scores, dim=-1) @ v


def fused_attention(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))


# --- table 1: window attention ---------------------------------------------------------------------------------

def _median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _saved_mib(fn) -> float:
    """MiB of the distinct tensors autograd keeps for backward during fn()."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values()) / 2**20


def attention_table(size: int, batch: int, runs: int) -> None:
    print(f"\nwindow attention, HRT-B branches at {size}², batch {batch}: median ms of {runs} runs; "
          "saved = MiB kept for backward")
    print(f"{'branch':<7} {'windows×heads':>14} | {'inference: explicit':>19} {'SDPA':>7} | "
          f"{'training f+b: explicit':>22} {'SDPA':>7} | {'saved: explicit':>15} {'SDPA':>6}")
    generator = torch.Generator().manual_seed(0)
    for branch, heads in enumerate(HRT_BASE_HEADS):
        side = math.ceil(size / 4 / 2**branch / 7)
        windows = batch * side * side
        q, k, v = (torch.randn(windows, heads, 49, HEAD_DIM, generator=generator) for _ in range(3))
        table = torch.randn(heads, 49, 49, generator=generator)
        row = {}
        for name, attend in (("explicit", explicit_attention), ("SDPA", fused_attention)):
            with torch.no_grad():
                row[name, "inference"] = _median_ms(lambda: attend(q, k, v, table), runs)
            leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
            grad = torch.ones(windows, heads, 49, HEAD_DIM)
            row[name, "training"] = _median_ms(lambda: attend(*leaves).backward(grad), runs)
            row[name, "saved"] = _saved_mib(lambda: attend(*leaves))
        print(f"{branch:<7} {f'{windows}×{heads}':>14} | {row['explicit', 'inference']:19.1f} "
              f"{row['SDPA', 'inference']:7.1f} | {row['explicit', 'training']:22.1f} {row['SDPA', 'training']:7.1f} | "
              f"{row['explicit', 'saved']:15.1f} {row['SDPA', 'saved']:6.1f}")


# --- table 2: inference, one row per process ---------------------------------------------------------------------

def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mb() -> float:
    """The resident set now (Linux /proc/self/statm), not the high-water mark: building and filling the model
    peaks above what it then holds, and a max-RSS baseline would hide the calls' own growth under that peak."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def onnx_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def _paths(onnx: bool) -> tuple[str, ...]:
    return PATHS + (ONNX_PATH,) if onnx else PATHS


def export_onnx_file(backbone: str, out_file: str) -> str:
    """The rule-filled model exported to ONNX, once per model by the parent process: the rows' processes only load
    it, so that their times and peaks are ONNX Runtime's, not the exporter's."""
    from models.export import onnx_model_bytes

    metadata = {"backbone": backbone, "head": "catnet", "input_size": "512", "source": "bench: the fill rule"}
    Path(out_file).write_bytes(onnx_model_bytes(rule_filled_model(backbone), metadata))
    return out_file


def _runner(model: torch.nn.Module, path: str, onnx_file: str | None = None):
    """images → logits by one of PATHS or ONNX_PATH; the fast path is prepared from `model` (which stays alive); the
    ONNX path runs `onnx_file` (the same weights, export_onnx_file) in ONNX Runtime with torch's thread count."""
    if path == "fast":
        return prepare_for_inference(model)
    if path == ONNX_PATH:
        from models.onnx_backend import OnnxRuntimeModel

        return OnnxRuntimeModel(onnx_file, threads=torch.get_num_threads())

    def run(images):
        if path == "plain, explicit attention":
            hrformer.window_softmax_attention = explicit_attention  # what WindowAttention.forward calls
        try:
            with torch.inference_mode():
                return model(images)
        finally:
            hrformer.window_softmax_attention = FUSED_WHERE_POSSIBLE
    return run


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads: less sensitive than wall time to other jobs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_times(backbone: str, size: int, batch: int, runs: int, out_file: str, paths: tuple[str, ...],
                  onnx_file: str | None = None) -> dict:
    """Every path of one model in this process, calls interleaved (path 1, 2, 3, 1, 2, 3, ...) so that other jobs on
    the machine slow them alike; medians of wall and CPU seconds. The logits go to out_file for the comparison."""
    model = rule_filled_model(backbone)
    runners = {path: _runner(model, path, onnx_file) for path in paths}
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    logits = {path: run(images).float().contiguous() for path, run in runners.items()}  # warm-up
    wall, cpu = {path: [] for path in paths}, {path: [] for path in paths}
    for _ in range(runs):
        for path, run in runners.items():
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            run(images)
            wall[path].append(time.perf_counter() - start)
            cpu[path].append(_cpu_seconds() - cpu_start)
    torch.save(logits, out_file)
    return {path: {"images_per_s": batch / statistics.median(wall[path]),
                   "cpu_s_per_image": statistics.median(cpu[path]) / batch} for path in paths}


def measure_peak(backbone: str, path: str, size: int, batch: int, onnx_file: str | None = None) -> dict:
    """Peak memory of one path, in this fresh process: growth of the max RSS over a warm-up and one call."""
    model = rule_filled_model(backbone)
    run = _runner(model, path, onnx_file)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    gc.collect()
    baseline = _current_rss_mb()
    run(images)
    run(images)
    return {"peak_mb": _max_rss_mb() - baseline}


def _subprocess(args, *mode: str, onnx_file: str | None = None) -> dict:
    command = [sys.executable, __file__, *mode, "--size", str(args.size), "--batch", str(args.batch),
               "--runs", str(args.runs), "--threads", str(args.threads),
               *(["--onnx-file", onnx_file] if onnx_file else ["--no-onnx"])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(mode)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def inference_table(args) -> None:
    print(f"\ninference at {args.size}², batch {args.batch}, {args.threads} threads: images/s = median of "
          f"{args.runs} calls per path after a warm-up, the paths' calls interleaved in one process; CPU s = its "
          "CPU seconds per image (all threads); peak = growth of max RSS (a fresh process per row); differences "
          "against the first row of the model")
    print(f"{'model':<10} {'path':<26} {'images/s':>9} {'s/image':>8} {'speed-up':>9} {'CPU s':>6} {'peak MB':>8} "
          f"{'max |Δ prob|':>13} {'max |Δ logit|':>14}")
    with tempfile.TemporaryDirectory() as folder:
        for backbone in args.models:
            out_file = os.path.join(folder, f"{backbone}.pt")
            onnx_file = export_onnx_file(backbone, os.path.join(folder, f"{backbone}.onnx")) if args.onnx else None
            times = _subprocess(args, "--times", backbone, out_file, onnx_file=onnx_file)
            logits = torch.load(out_file, weights_only=True)
            reference, base_speed = logits[PATHS[0]], times[PATHS[0]]["images_per_s"]
            for path in _paths(args.onnx):
                peak = _subprocess(args, "--peak", backbone, path, onnx_file=onnx_file)["peak_mb"]
                row = times[path]
                prob_diff = (torch.sigmoid(logits[path]) - torch.sigmoid(reference)).abs().max().item()
                logit_diff = (logits[path] - reference).abs().max().item()
                print(f"{backbone:<10} {path:<26} {row['images_per_s']:9.3f} {1 / row['images_per_s']:8.2f} "
                      f"{row['images_per_s'] / base_speed:8.2f}× {row['cpu_s_per_image']:6.2f} {peak:8.0f} "
                      f"{prob_diff:13.1e} {logit_diff:14.1e}", flush=True)


# --- table 4: the floor under any float32 path on this machine ------------------------------------------------

def _gemm_gflops(threads: int, runs: int) -> float:
    """This machine's float32 matrix-product rate: median GFLOP/s of 2048³ products (MKL, --threads threads)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / _median_ms(lambda: a @ b, runs) * 1e-6


def _gelu_gelements(runs: int) -> float:
    """Exact (erf) GELU rate, giga-elements/s, in place on a 16 M-element tensor (the fast path's GELU)."""
    x = torch.randn(2**24)
    return 2**24 / _median_ms(lambda: torch.ops.aten.gelu_(x), runs) * 1e-6


def model_work(backbone: str, size: int) -> dict:
    """What one image at size² asks of any implementation: GFLOP of the convolutions and linear layers (torch's
    FlopCounterMode on the plain eval forward), GFLOP of the window attention's two products per head (q·kᵀ and
    a·v over the padded windows: 4 · padded tokens · window² · width), and the elements that pass through GELU
    (three per FFN: hidden, hidden, width per token)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = rule_filled_model(backbone)
    blocks = [m for m in model.modules() if isinstance(m, hrformer.TransformerBlock)]
    shapes = []
    hooks = [block.register_forward_pre_hook(lambda m, inputs: shapes.append((m, inputs[0].shape)))
             for block in blocks]
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.rand(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    attention, gelu = 0, 0
    for block, (_, width, height, breadth) in shapes:
        w = block.attn.window_size
        padded = math.ceil(height / w) * w * math.ceil(breadth / w) * w
        attention += 4 * padded * w * w * width
        gelu += height * breadth * (2 * block.mlp.fc1.out_channels + width)
    return {"gflop": counter.get_total_flops() / 1e9, "attention_gflop": attention / 1e9, "gelu_m": gelu / 1e6}


def roofline_table(args) -> None:
    """The least time any float32 path needs here: the model's products at the machine's best matrix-product rate,
    plus its GELUs at the in-place GELU rate (layer norms, adds, copies and the softmax left out: a floor, not an
    estimate), beside half the plain path's time (the 2× goal) and the paths' measured times."""
    gemm, gelu_rate = _gemm_gflops(args.threads, args.runs), _gelu_gelements(args.runs)
    print(f"\nfloor at {args.size}², batch 1, {args.threads} threads: matrix products at {gemm:.0f} GFLOP/s (median "
          f"2048³ float32 product here), exact GELU at {gelu_rate:.2f} G elements/s (in place); paths: median of "
          f"{args.runs} calls")
    print(f"{'model':<10} {'conv+linear GFLOP':>17} {'attention GFLOP':>15} {'GELU M elements':>15} "
          f"{'floor s':>8} {'plain s':>8} {'plain/2 s':>9} {'fast s':>7} {'floor vs plain':>14}")
    for backbone in args.models:
        work = model_work(backbone, args.size)
        floor = (work["gflop"] + work["attention_gflop"]) / gemm + work["gelu_m"] / 1e3 / gelu_rate
        model = rule_filled_model(backbone)
        plain, fast = _runner(model, "plain"), _runner(model, "fast")
        images = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        plain_s, fast_s = (_median_ms(lambda run=run: run(images), args.runs) / 1e3 for run in (plain, fast))
        print(f"{backbone:<10} {work['gflop']:17.1f} {work['attention_gflop']:15.1f} {work['gelu_m']:15.0f} "
              f"{floor:8.2f} {plain_s:8.2f} {plain_s / 2:9.2f} {fast_s:7.2f} {plain_s / floor:13.2f}×",
              flush=True)


# --- table 3: threshold flips on real images ----------------------------------------------------------------------

def shared_tampered_images() -> list[Path]:
    data = ROOT.parent / "shared" / "data"
    patterns = ["CASIA1/*/Tp/*", "CASIA2_samples/Tp/*", "Columbia_samples/4cam_splc/*", "NoSo_copymove/*_mod*.png",
                "NIST16_samples/probe/*", "IMD2020_samples/fake/*", "Korus_RealisticTampering_samples/tampered/*"]
    return sorted(p for pattern in patterns for p in data.glob(pattern) if not p.stem.endswith("_gt"))


def flips_table(args) -> None:
    import cv2

    from datasets.io import read_image

    paths = shared_tampered_images()
    if not paths:
        print("\nthreshold flips: ../shared/data is absent, skipped")
        return
    demo = models.load_trained_model(str(ROOT / "weights" / "mpc_demo_hrt_nano_stage2.pth")).model
    candidates = [("demo weights (hrt_nano)", demo, args.flips_images),
                  ("rule-filled hrt_base", rule_filled_model("hrt_base"), args.flips_images_base)]
    print(f"\nthreshold flips: {len(paths)} real tampered images of ../shared/data squash-resized to {args.size}², "
          f"output maps {args.size // 4}²; pixels on the other side of 0.5 in the fast path than in the plain path")
    print(f"{'weights':<26} {'images':>7} {'pixels':>11} {'flipped':>8} {'images with a flip':>19} "
          f"{'max |Δ prob|':>13}")
    for label, model, limit in candidates:
        fast = prepare_for_inference(model)
        flipped, with_flip, pixels, largest = 0, 0, 0, 0.0
        for path in paths[:limit]:
            image = cv2.resize(read_image(path), (args.size, args.size), interpolation=cv2.INTER_LINEAR)
            batch = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            with torch.inference_mode():
                plain = torch.sigmoid(model(batch))
            quick = torch.sigmoid(fast(batch))
            count = int(((plain > 0.5) != (quick > 0.5)).sum())
            flipped, with_flip, pixels = flipped + count, with_flip + (count > 0), pixels + plain.numel()
            largest = max(largest, (plain - quick).abs().max().item())
        print(f"{label:<26} {min(len(paths), limit):7d} {pixels:11d} {flipped:8d} {with_flip:19d} "
              f"{largest:13.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["hrt_base", "hrt_small"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--flips", action="store_true", help="also count threshold flips on ../shared/data")
    parser.add_argument("--flips-images", type=int, default=1000, help="at most this many images for --flips")
    parser.add_argument("--flips-images-base", type=int, default=12,
                        help="at most this many images for --flips with HRT-B (the costly one)")
    parser.add_argument("--roofline", action="store_true",
                        help="also print the floor: the model's products and GELUs at this machine's best rates")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false",
                        help="leave out the ONNX Runtime row (left out anyway when onnx/onnxruntime are missing)")
    parser.add_argument("--onnx-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--times", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--peak", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.onnx and not onnx_available():
        args.onnx = False
        if not (args.times or args.peak):
            print("onnx/onnxruntime are not installed (pip install -r requirements.txt): no ONNX Runtime row")
    if args.times:
        backbone, out_file = args.times
        print(json.dumps(measure_times(backbone, args.size, args.batch, args.runs, out_file, _paths(args.onnx),
                                       args.onnx_file)))
        return
    if args.peak:
        print(json.dumps(measure_peak(*args.peak, args.size, args.batch, args.onnx_file)))
        return
    print(f"machine: {machine_name()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"{args.threads} threads, load average at start {os.getloadavg()[0]:.1f}")
    if not args.skip_attention:
        attention_table(args.size, args.batch, max(args.runs, 5))
    inference_table(args)
    if args.flips:
        flips_table(args)
    if args.roofline:
        roofline_table(args)
    load = os.getloadavg()[0]
    shared = (f" (above {args.threads}: other jobs shared the CPUs; read the times with care)"
              if load > args.threads else "")
    print(f"\nload average at the end {load:.1f}{shared}")


if __name__ == "__main__":
    main()

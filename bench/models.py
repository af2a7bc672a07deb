"""Size, FLOPs and CPU latency of the stage-2 models (backbone + catnet head).

For each backbone: parameters, FLOPs counted by fvcore's ``FlopCountAnalysis`` at each ``--sizes`` (fvcore counts
one multiply-add as one flop, as MPC's own snippet does), and the median forward latency over ``--repeats`` runs
(eval mode, no_grad, after one warm-up) at ``--latency-size``. Prints a table headed by the machine.

    .venv/bin/python bench/models.py [--models hrt_tiny hrt_small hrt_base hrnet_w18] [--sizes 512 1024]
                                     [--latency-size 512] [--repeats 5] [--threads 2]
"""
import argparse
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)  # fvcore uses the deprecated torch.jit API
from fvcore.nn import FlopCountAnalysis  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402


def count_flops(model: torch.nn.Module, size: int) -> float:
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, torch.zeros(1, 3, size, size))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total()


def median_latency(model: torch.nn.Module, size: int, repeats: int) -> float:
    x = torch.rand(1, 3, size, size)
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["hrt_tiny", "hrt_small", "hrt_base", "hrnet_w18"])
    parser.add_argument("--head", default="catnet", choices=sorted(models.HEADS))
    parser.add_argument("--sizes", nargs="*", type=int, default=[512, 1024], help="square input sizes for FLOPs (none: skip)")
    parser.add_argument("--latency-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.node()} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU, float32, batch 1"
    )
    flop_columns = [f"GFLOPs@{s}" for s in args.sizes]
    header = ["model", "params (M)", *flop_columns, f"latency@{args.latency_size} (ms, median of {args.repeats})"]
    rows = []
    for name in args.models:
        model = models.build_stage2_model(name, args.head).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        flops = [f"{count_flops(model, size) / 1e9:.2f}" for size in args.sizes]
        latency = median_latency(model, args.latency_size, args.repeats) * 1e3
        rows.append([f"{name}+{args.head}", f"{params:.2f}", *flops, f"{latency:.0f}"])
        print(f"  done {name}", file=sys.stderr, flush=True)

    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()

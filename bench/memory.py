"""Stage-1 step memory and time, plain vs activation checkpointing (RUNTIME.ACTIVATION_CHECKPOINTING).

The real stage-1 step (stage1/train.py's TwoViews and loss_terms: two DropPath views, the multi-view loss at the
official cap of 5000 samples, AdamW) on synthetic forgeries, for each batch size and each granularity. Every
configuration runs in a fresh process so that its peak is its own: on the CPU the growth of the process's maximum
RSS over what it held once the model and optimiser were built (with glibc's mmap threshold fixed at 128 KiB, so that
freed tensors leave the process at once and RSS follows the live tensors; `--mmap-threshold 0` keeps glibc's
adaptive default, under which fragmentation adds to RSS from step to step); on CUDA the allocator's peak. The first
step is the reference: taken from the same weights, batch and random state in every configuration, its gradients
are compared with the plain step's of the same batch size (largest per-tensor relative difference ‖Δ‖/‖g‖ over the
tensors whose gradient is not rounding alone, and the largest absolute one). The steps after it are timed (median).

    python bench/memory.py                                   # HRT-B 512², batch 1, 2, 4; off, block, module
    python bench/memory.py --batches 1 2 --modes off module --repeats 3 --threads 1
    python bench/memory.py --model hrt_tiny --size 256 --batches 1 --repeats 1     # a quick look

A configuration whose estimated peak (extrapolated from the same mode's measured peaks at smaller batches, plus
10 %) exceeds the memory available now is not started, and the table says so: the plain step at 512² needs about
12 GB per image. `--keep DIR` keeps each configuration's result, so that an interrupted run resumes where it was.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from datasets.dataset import ForgeryDataset, collate_readable
from datasets.synthetic import make_synthetic_set
from models import build_stage1_model
from stage1.train import TwoViews, loss_terms
from utils.config import load_config
from utils.training.builders import build_optimizer, prepare_model

MODES = ("off", "block", "module")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _available_mb() -> float:
    """MemAvailable of /proc/meminfo (Linux); infinity where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def synthetic_batch(size: int, batch_size: int, folder: str) -> dict:
    """`batch_size` forged synthetic images at `size`², without augmentation: the same batch in every process."""
    flist = make_synthetic_set(folder, num=batch_size, size=size, seed=0, authentic_fraction=0.0, progress=False)
    dataset = ForgeryDataset(np.load(flist), mode="train", input_size=size, augment=False)
    return collate_readable([dataset[i] for i in range(batch_size)])


def measure_one(model_name: str, size: int, batch_size: int, mode: str, repeats: int, device: torch.device,
                grads_file: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        batch = synthetic_batch(size, batch_size, folder)
    batch = {key: value.to(device) for key, value in batch.items() if torch.is_tensor(value)}
    cfg = load_config(None, ["MODEL.BACKBONE", model_name, "RUNTIME.ACTIVATION_CHECKPOINTING", mode])
    torch.manual_seed(0)
    model = build_stage1_model(model_name, drop_path_rate=cfg.MODEL.DROP_PATH_RATE)
    model = prepare_model(cfg, model, device, world_size=1).train()
    optimizer = build_optimizer(cfg, model.parameters())
    train_step, two_views = loss_terms(cfg), TwoViews(model)

    def step() -> dict:
        losses = train_step(two_views, batch)
        losses["total"].backward()
        return losses

    baseline_mb = _peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(1)  # the reference step: same DropPath draws and loss samples in every configuration
    reference = step()
    torch.save({name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None},
               grads_file)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times, cpu_times = [], []
    for _ in range(repeats):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = _peak_rss_mb() - baseline_mb
    return {"step_s": statistics.median(times), "cpu_s": statistics.median(cpu_times), "times": times, "peak_mb": peak_mb,
            "loss": float(reference["total"].detach())}


def gradient_difference(reference_file: str, other_file: str) -> tuple[float, float]:
    """(largest ‖Δ‖/‖g‖ over the tensors whose gradient is not tiny, largest |Δ|) between two saved gradient sets.

    Tiny: a norm below 1e-6 of the largest tensor's, such as the biases that feed a train-mode BatchNorm, whose
    exact gradient is 0 and whose computed one is rounding alone; they count in the absolute column only."""
    reference, other = (torch.load(f, weights_only=True) for f in (reference_file, other_file))
    if set(reference) != set(other):
        raise RuntimeError("the two steps produced gradients for different parameters")
    norms = {name: float(g.double().norm()) for name, g in reference.items()}
    floor = 1e-6 * max(norms.values(), default=0.0)
    relative, absolute = 0.0, 0.0
    for name, g in reference.items():
        difference = (other[name].double() - g.double())
        absolute = max(absolute, float(difference.abs().max()))
        if norms[name] > floor:
            relative = max(relative, float(difference.norm()) / norms[name])
    return relative, absolute


def run_configuration(args, mode: str, batch_size: int, grads_file: str) -> dict:
    command = [sys.executable, __file__, "--one", mode, str(batch_size), grads_file, "--model", args.model,
               "--size", str(args.size), "--repeats", str(args.repeats), "--device", args.device,
               "--threads", str(args.threads)]
    env = dict(os.environ)
    if args.mmap_threshold:
        # glibc serves allocations above this size with mmap and unmaps them when freed: RSS then follows the live
        # tensors, as an accelerator allocator's peak does. With glibc's adaptive default (up to 32 MiB), freed
        # activations stay in the heap and RSS grows with fragmentation from step to step.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimated_peak_mb(measured: dict[int, float], batch_size: int) -> float:
    """A configuration's peak at `batch_size` from its measured peaks at other batch sizes: the line through the
    two largest, or proportional to the one; 0 when nothing is known."""
    if not measured:
        return 0.0
    sizes = sorted(measured)
    if len(sizes) == 1:
        return measured[sizes[0]] * batch_size / sizes[0]
    (b1, p1), (b2, p2) = [(b, measured[b]) for b in sizes[-2:]]
    return p2 + (batch_size - b2) * (p2 - p1) / (b2 - b1)


def measured_or_cached(args, mode: str, batch_size: int, folder: str) -> dict:
    """Run one configuration, or reuse its result from --keep (a run stopped part-way resumes where it was)."""
    result_file = os.path.join(folder, f"result_{mode}_{batch_size}.json")
    if os.path.exists(result_file):
        with open(result_file) as f:
            return {**json.load(f), "cached": True}
    result = run_configuration(args, mode, batch_size, os.path.join(folder, f"grads_{mode}_{batch_size}.pt"))
    if "error" not in result:
        with open(result_file, "w") as f:
            json.dump(result, f)
    return result


def table_rows(args, device: torch.device, folder: str) -> list[list]:
    rows = []
    peaks: dict[str, dict[int, float]] = {mode: {} for mode in args.modes}
    for batch_size in args.batches:
        plain = None
        for mode in args.modes:
            estimate = 1.1 * estimated_peak_mb(peaks[mode], batch_size)
            available = _available_mb()
            result_file = os.path.join(folder, f"result_{mode}_{batch_size}.json")
            if device.type == "cpu" and estimate > available and not os.path.exists(result_file):
                rows.append([batch_size, mode, f"not run: needs ≈ {estimate / 1024:.1f} GB, "
                             f"{available / 1024:.1f} GB available"])
                print(f"# skipped {mode} at batch {batch_size}: {rows[-1][-1]}", flush=True)
                continue
            r = measured_or_cached(args, mode, batch_size, folder)
            print(f"# {mode} batch {batch_size}: {json.dumps(r)}", flush=True)
            if "error" in r:
                rows.append([batch_size, mode, f"failed: {r['error']}"])
                continue
            peaks[mode][batch_size] = r["peak_mb"]
            grads_file = os.path.join(folder, f"grads_{mode}_{batch_size}.pt")
            if mode == "off":
                plain = (r, grads_file)
                rows.append([batch_size, mode, f"{r['step_s']:.1f}", f"{r['cpu_s']:.1f}", "1.00×",
                             f"{r['peak_mb']:.0f}", "100 %", "0 (reference)", "0"])
                continue
            versus, difference = ["— (no plain step)", "—"], ["—", "—"]
            if plain:
                versus = [f"{r['step_s'] / plain[0]['step_s']:.2f}× (CPU {r['cpu_s'] / plain[0]['cpu_s']:.2f}×)",
                          f"{100 * r['peak_mb'] / plain[0]['peak_mb']:.0f} %"]
                relative, absolute = gradient_difference(plain[1], grads_file)
                difference = [f"{relative:.1e}", f"{absolute:.1e}"]
            rows.append([batch_size, mode, f"{r['step_s']:.1f}", f"{r['cpu_s']:.1f}", versus[0],
                         f"{r['peak_mb']:.0f}", versus[1], *difference])
    return rows


def machine_line(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, {total_gb:.0f} GiB "
            f"({_available_mb() / 1024:.1f} GiB available, load average {os.getloadavg()[0]:.1f}), {gpu}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hrt_base")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the reference step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per process (default: torch's); 1 keeps timings steady on a shared machine")
    parser.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the measured processes (bytes; 0 = glibc's default)")
    parser.add_argument("--keep", help="folder keeping each configuration's result and gradients; configurations "
                                       "already there are not run again (default: a temporary folder)")
    parser.add_argument("--one", nargs=3, metavar=("MODE", "BATCH", "GRADS_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        mode, batch_size, grads_file = args.one[0], int(args.one[1]), args.one[2]
        print(json.dumps(measure_one(args.model, args.size, batch_size, mode, args.repeats, device, grads_file)))
        return

    print(machine_line(device))
    peak = "allocator peak" if device.type == "cuda" else (
        "growth of the process's max RSS, glibc mmap threshold " +
        (f"{args.mmap_threshold} B" if args.mmap_threshold else "adaptive (default)"))
    print(f"{args.model} at {args.size}², two views, DropPath 0.2, AdamW; step time = median of {args.repeats} "
          f"steps after the reference step; peak = {peak}", flush=True)
    header = ["batch", "checkpointing", "step s", "CPU s", "time vs plain", "peak MB", "peak vs plain",
              "max grad ‖Δ‖/‖g‖", "max grad |Δ|"]
    with contextlib.ExitStack() as stack:
        folder = args.keep or stack.enter_context(tempfile.TemporaryDirectory())
        os.makedirs(folder, exist_ok=True)
        rows = table_rows(args, device, folder)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()

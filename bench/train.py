"""Stage-1 training step, broken down: data, the two forward passes, the loss, backward, the optimiser; peak memory;
and the overhead ratio (step − 2 × one backbone forward+backward) / step — the share of a step not spent in the
backbone itself (mostly the multi-view loss, which the official loop computes with n×n matrices in Python loops).

    python bench/train.py                          # HRT-T/S/B at 256² and 512², CPU or the first GPU
    python bench/train.py --models hrt_tiny --sizes 256 --repeats 3

Each configuration runs in a fresh process so that peak memory (max RSS on the CPU, max allocated on CUDA) is its
own. Times are medians over --repeats steps after one warm-up step.
"""
from __future__ import annotations

import argparse
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

import torch

from datasets.dataset import ForgeryDataset, collate_readable
from datasets.synthetic import make_synthetic_set
from losses import multi_view_pixel_contrast
from models import build_stage1_model
from stage1.train import scale1_mask


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device, fn):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def measure_one(model_name: str, size: int, batch_size: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        flist = make_synthetic_set(folder, num=batch_size * 2, size=size, seed=0, authentic_fraction=0.0,
                                   progress=False)
        import numpy as np
        dataset = ForgeryDataset(np.load(flist), mode="train", input_size=size, augment=True)
        model = build_stage1_model(model_name, drop_path_rate=0.2).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows = []
        for _ in range(repeats + 1):
            batch, t_data = _timed(device, lambda: collate_readable([dataset[i] for i in range(batch_size)]))
            images, masks = batch["image"].to(device), scale1_mask(batch["mask"]).to(device)
            view1, t_fwd1 = _timed(device, lambda: model(images))
            view2, t_fwd2 = _timed(device, lambda: model(images))
            losses, t_loss = _timed(device, lambda: multi_view_pixel_contrast(view1, view2, masks))
            _, t_bwd = _timed(device, lambda: losses["total"].backward())
            _, t_opt = _timed(device, lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
            # one backbone forward+backward with a trivial loss: the floor a two-view step cannot go under
            def backbone_pass():
                sum(m.mean() for m in model(images)).backward()
            _, t_backbone = _timed(device, backbone_pass)
            optimizer.zero_grad(set_to_none=True)
            rows.append({"data": t_data, "fwd1": t_fwd1, "fwd2": t_fwd2, "loss": t_loss, "backward": t_bwd,
                         "optimizer": t_opt, "backbone_fb": t_backbone})
        rows = rows[1:]
        result = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        result["step"] = statistics.median(sum(v for k, v in r.items() if k != "backbone_fb") for r in rows)
        result["overhead"] = (result["step"] - 2 * result["backbone_fb"]) / result["step"]
        if device.type == "cuda":
            result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            result["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
        return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["hrt_tiny", "hrt_small", "hrt_base"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.batch_size, args.repeats, device)))
        return

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs {gpu}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; batch {args.batch_size}, "
          f"median of {args.repeats} steps")
    header = ["model", "size", "data", "fwd1", "fwd2", "loss", "backward", "optim", "step s", "backbone f+b",
              "overhead", "peak MB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for model_name in args.models:
        for size in args.sizes:
            command = [sys.executable, __file__, "--one", model_name, str(size), "--batch-size", str(args.batch_size),
                       "--repeats", str(args.repeats), "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {model_name} | {size} | failed: {done.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {model_name} | {size} | {r['data']:.3f} | {r['fwd1']:.3f} | {r['fwd2']:.3f} | {r['loss']:.3f} | "
                  f"{r['backward']:.3f} | {r['optimizer']:.3f} | {r['step']:.3f} | {r['backbone_fb']:.3f} | "
                  f"{100 * r['overhead']:.0f} % | {r['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

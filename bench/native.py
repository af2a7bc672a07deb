"""Native resolution against the protocol's squash-resize, image by image: how far the maps differ.

For every image of the given file lists, the map of `--resolution protocol` (squash-resize to the weights' input size)
and of `--resolution native` (the image at its own size, tiled above --tile), both at the image's size through
utils/evaluation/prediction.py, with the same weights. Prints per list: images, pixels, the share of pixels on the
other side of 0.5, the mean |Δ probability|, F1 at 0.5 both ways (tampered images), and seconds per image both ways.

    python generate_flist.py --dataset columbia --root ../shared/data/Columbia_samples --out /tmp/lists
    python bench/native.py --weights weights/mpc_demo_hrt_nano_stage2.pth --flist /tmp/lists/*.npy
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from datasets.dataset import ForgeryDataset
from datasets.flist import read_flist
from models import load_trained_model
from utils.evaluation.prediction import Tiling, predict_map, probability_predictor
from utils.training.builders import list_name


def f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    denominator = predicted.sum() + truth.sum()
    return float(2 * np.sum(predicted & truth) / denominator) if denominator else 1.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--flist", nargs="+", required=True)
    parser.add_argument("--tile", type=int, default=Tiling.tile)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="both ways through the fast inference path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = load_trained_model(args.weights)
    predict = probability_predictor(trained.model, fast=args.fast)
    size, device, tiling = trained.input_size(), torch.device("cpu"), Tiling(args.tile, min(128, args.tile // 2))
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch "
          f"{torch.__version__}, {args.threads} threads; weights {args.weights} ({trained.backbone}, input {size}²); "
          f"tile {tiling.tile}, overlap {tiling.overlap}")
    header = ["list", "images", "pixels", "sides of 0.5 differ", "mean abs Δ prob", "F1 protocol", "F1 native",
              "s/image protocol", "s/image native"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in args.flist:
        rows = read_flist(path)
        protocol = ForgeryDataset(rows, mode="test", input_size=size)
        native = ForgeryDataset(rows, mode="test", input_size=None)
        pixels = flipped = 0
        differences, f1_protocol, f1_native, seconds_protocol, seconds_native = [], [], [], [], []
        for index in range(len(rows)):
            item_p, item_n = protocol[index], native[index]
            shape = tuple(int(n) for n in item_p["size"])
            start = time.perf_counter()
            map_p = predict_map(predict, item_p["image"], shape, device)
            seconds_protocol.append(time.perf_counter() - start)
            start = time.perf_counter()
            map_n = predict_map(predict, item_n["image"], shape, device, tiling)
            seconds_native.append(time.perf_counter() - start)
            pixels += map_p.mask().size
            flipped += int(np.sum(map_p.mask() != map_n.mask()))
            differences.append(float(np.abs(map_p.probability() - map_n.probability()).mean()))
            if item_p["tampered"]:
                truth = item_p["mask"][0].numpy() > 0.5
                f1_protocol.append(f1(map_p.mask(), truth))
                f1_native.append(f1(map_n.mask(), truth))
        mean = (lambda values: f"{np.mean(values):.3f}" if values else "-")
        print(f"| {list_name(path)} | {len(rows)} | {pixels:,} | {100 * flipped / pixels:.1f} % | "
              f"{np.mean(differences):.3f} | {mean(f1_protocol)} | {mean(f1_native)} | "
              f"{statistics.median(seconds_protocol):.2f} | {statistics.median(seconds_native):.2f} |", flush=True)


if __name__ == "__main__":
    main()

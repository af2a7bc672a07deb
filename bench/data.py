"""Data-loading throughput of the training pipeline (read, augment, squash-resize to 512², 1/4 mask).

    python bench/data.py [--source synthetic|shared] [--images 64] [--runs 3] [--workers 0 2]

`synthetic` writes a small seeded set to a temporary folder; `shared` builds CASIAv2 and IMD2020 lists on the fly
from ../shared/data (research samples, never committed). Each run is one pass over `--images` samples through a
DataLoader (batch 4), worker start-up included; the table gives the median over runs and the range.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from datasets.dataset import ForgeryDataset, collate_readable  # noqa: E402
from datasets.synthetic import make_synthetic_set  # noqa: E402
from utils.training.sampling import ResumableSampler, SeededItems  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"


def shared_rows() -> np.ndarray:
    """CASIAv2 (Tp/{stem}.* ↔ Gt/{stem}_gt.png) and IMD2020 (fake/{stem}.jpg ↔ mask/{stem}_mask.png) pairs."""
    rows = []
    for folder, images, masks, suffix in (("CASIA2_samples", "Tp", "Gt", "_gt.png"),
                                          ("IMD2020_samples", "fake", "mask", "_mask.png")):
        for image in sorted((SHARED_DATA / folder / images).glob("*")):
            mask = SHARED_DATA / folder / masks / f"{image.stem}{suffix}"
            if mask.is_file():
                rows.append((str(image), str(mask)))
    if not rows:
        raise SystemExit(f"no CASIA2/IMD2020 samples under {SHARED_DATA}; use --source synthetic")
    return np.array(rows)


def images_per_second(rows: np.ndarray, workers: int, augment: bool, count: int, seed: int) -> float:
    index = np.arange(count) % len(rows)
    dataset = ForgeryDataset(rows[index], mode="train", augment=augment, seed=seed)
    loader = DataLoader(SeededItems(dataset), batch_size=4, num_workers=workers, collate_fn=collate_readable,
                        sampler=ResumableSampler(len(dataset), 4, seed=seed))  # as the trainer loads
    start = time.perf_counter()
    loaded = sum(len(batch["path"]) for batch in loader)
    return loaded / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("synthetic", "shared"), default="synthetic")
    parser.add_argument("--images", type=int, default=64, help="samples per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--synthetic-size", type=int, default=640, help="side of the synthetic images")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        if args.source == "shared":
            rows = shared_rows()
        else:
            rows = np.load(make_synthetic_set(folder, 16, args.synthetic_size, seed=0, progress=False))
        print(f"machine: {platform.processor() or platform.machine()} ({platform.node()}), "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
              f"OpenCV {cv2.__version__} threads {cv2.getNumThreads()}")
        print(f"source: {args.source} ({len(rows)} unique images), {args.images} samples per run, "
              f"median of {args.runs} runs, batch 4, input 512², worker start-up included")
        print(f"{'augment':>8} {'workers':>8} {'images/s':>10} {'min':>8} {'max':>8}")
        for augment in (True, False):
            for workers in args.workers:
                speeds = [images_per_second(rows, workers, augment, args.images, seed) for seed in range(args.runs)]
                print(f"{'on' if augment else 'off':>8} {workers:>8} {statistics.median(speeds):>10.1f} "
                      f"{min(speeds):>8.1f} {max(speeds):>8.1f}")


if __name__ == "__main__":
    main()

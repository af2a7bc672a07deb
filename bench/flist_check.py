"""Time of checking a file list row by row (`datasets.flist.check_rows`): header mode against full decoding.

    python bench/flist_check.py [--runs 3]

Lists every set of ../shared/data (research samples, never committed) through its adapter and checks it with
`--check-images header` (header + cheap completeness test; masks are always decoded) and `full` (every image
decoded). The table gives the median seconds over runs, the range, and milliseconds per row.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets.adapters import list_dataset  # noqa: E402
from datasets.flist import check_rows  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
SETS = (("casia1", "CASIA1/samples_from_combine_png"), ("casia2", "CASIA2_samples"),
        ("columbia", "Columbia_samples"), ("noso", "NoSo_copymove"), ("nist16", "NIST16_samples"),
        ("imd2020", "IMD2020_samples"), ("korus", "Korus_RealisticTampering_samples"))


def seconds(rows: np.ndarray, kinds: list[str], mode: str) -> float:
    start = time.perf_counter()
    report = check_rows(rows, kinds, check_images=mode)
    elapsed = time.perf_counter() - start
    if report.errors:
        raise SystemExit(f"unexpected errors:\n{report.summary()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        raise SystemExit(f"no shared samples at {SHARED_DATA}")
    print(f"machine: {platform.processor() or platform.machine()} ({platform.node()}), {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, torch threads {torch.get_num_threads()} (unused: NumPy + Pillow only)")
    print(f"median of {args.runs} runs; header = image header + completeness test, full = decode every image")
    print(f"{'set':>9} {'rows':>5} {'mode':>7} {'seconds':>8} {'min':>7} {'max':>7} {'ms/row':>7}")
    for dataset, folder in SETS:
        listing = list_dataset(dataset, SHARED_DATA / folder)
        rows = np.array([(p.image, p.mask) for p in listing.pairs])
        kinds = [p.mask_kind for p in listing.pairs]
        for mode in ("header", "full"):
            times = [seconds(rows, kinds, mode) for _ in range(args.runs)]
            median = statistics.median(times)
            print(f"{dataset:>9} {len(rows):>5} {mode:>7} {median:>8.3f} {min(times):>7.3f} {max(times):>7.3f} "
                  f"{1000 * median / len(rows):>7.1f}")


if __name__ == "__main__":
    main()

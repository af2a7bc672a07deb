"""Stage 2: export trained weights as an ONNX model or a safetensors release.

    python stage2/export.py --weights runs/stage2/best.pth --format onnx --out mpc.onnx
    python stage2/export.py --weights MPC_CATNet_stage2_weights.pth --format safetensors --out mpc_catnet.safetensors

--weights is any stage-2 weights file that test.py and infer.py take (ours, an official release, or a .safetensors
release). ONNX: images (B, 3, H, W) float32 in [0, 1] → logits (B, 1, H/4, W/4), batch, height and width dynamic,
H and W multiples of 32; before the file is written ONNX Runtime runs it against PyTorch on three input shapes and
the differences are printed (a difference above --tolerance writes nothing). Run it with
`stage2/infer.py --backend onnxruntime --weights mpc.onnx`. safetensors: the state_dict's tensors with the config as
metadata, loaded wherever the original is. An existing --out is kept unless --force. ONNX needs the optional
packages onnx and onnxruntime (in requirements.txt).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python stage2/export.py`: make the repository's packages importable first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.export import DEFAULT_TOLERANCE, SIZE_MULTIPLE, ExportError, export_onnx, export_safetensors
from utils.entry import run_script

SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="stage-2 weights: ours, an official release, a .safetensors")
    parser.add_argument("--format", required=True, choices=tuple(SUFFIXES), help="what to write")
    parser.add_argument("--out", required=True, help="the file to write (.onnx or .safetensors)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--backbone", default=None, help="official weights only (default hrt_base)")
    parser.add_argument("--head", default=None, choices=("catnet", "casiav2"),
                        help="official weights only; default: recognised from the file's layer widths")
    parser.add_argument("--check-sizes", nargs="+", default=None, metavar="SIZE",
                        help=f"ONNX: input sizes of the check, S or HxW, multiples of {SIZE_MULTIPLE}; the first "
                             "runs at batch 2 (default: S/2 at batch 2, S×S and S×1.5S for the model's input size S)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="ONNX: largest |ONNX Runtime − PyTorch| logit accepted, per unit of the largest |logit| "
                             f"above 1 (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads of the check (default: torch's)")
    return parser


def check_shapes(sizes: list[str] | None) -> list[tuple[int, int, int, int]] | None:
    """`S` or `HxW` per size; batch 2 for the first (the batch is dynamic), 1 for the rest."""
    if sizes is None:
        return None
    shapes = []
    for index, text in enumerate(sizes):
        match = re.fullmatch(r"(\d+)(?:[x×](\d+))?", text.strip())
        if not match:
            raise ExportError(f"--check-sizes {text}: expected S or HxW, e.g. 256 or 256x384")
        height = int(match.group(1))
        width = int(match.group(2) or height)
        if not height or not width or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ExportError(f"--check-sizes {text}: height and width must be positive multiples of {SIZE_MULTIPLE}")
        shapes.append((2 if index == 0 else 1, 3, height, width))
    return shapes


def main(argv=None) -> dict:
    """Returns {"out": path, "checks": [OnnxCheck] (ONNX only), "seconds": float}."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != SUFFIXES[args.format]:
        raise ExportError(f"--out {out}: --format {args.format} writes a {SUFFIXES[args.format]} file")
    start = time.perf_counter()
    checks = []
    if args.format == "onnx":
        checks = export_onnx(args.weights, out, args.backbone, args.head, overwrite=args.force,
                             shapes=check_shapes(args.check_sizes), tolerance=args.tolerance, threads=args.threads)
        for check in checks:
            print(f"check: {check}")
    else:
        export_safetensors(args.weights, out, args.backbone, args.head, overwrite=args.force)
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {args.format}) from {args.weights} in {seconds:.1f} s")
    return {"out": out, "checks": checks, "seconds": seconds}


if __name__ == "__main__":
    run_script(main)

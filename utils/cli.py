"""The command line both training scripts share: `--config FILE`, flags, then `KEY VALUE` config overrides."""
from __future__ import annotations

import argparse
import os

from utils.config import load_config


def training_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/…)")
    parser.add_argument("--out", required=True, help="run folder: config.yaml, latest.pth, best.pth, logs")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/latest.pth (model, optimiser, scheduler, step, sampler, RNG)")
    parser.add_argument("--seed", type=int, default=None, help="overrides RUNTIME.SEED")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (overrides RUNTIME.DEVICE)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="overrides SOLVER.MAX_STEPS (0 = until stopped by hand, needs SOLVER.RUN_FOREVER True)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.LR 5e-5 DATA.NUM_WORKERS 2")
    return parser


def config_from_args(args, stage: int):
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides += ["RUNTIME.SEED", str(args.seed)]
    if args.device is not None:
        overrides += ["RUNTIME.DEVICE", args.device]
    if args.max_steps is not None:
        overrides += ["SOLVER.MAX_STEPS", str(args.max_steps)]
    cfg = load_config(args.config, overrides)
    if cfg.STAGE != stage:
        raise SystemExit(f"{args.config} is a stage-{cfg.STAGE} config; this script trains stage {stage}")
    if cfg.SOLVER.MAX_STEPS <= 0 and not cfg.SOLVER.RUN_FOREVER:
        raise SystemExit("SOLVER.MAX_STEPS is 0: set a number of steps, or SOLVER.RUN_FOREVER True to train until "
                         "stopped by hand (the official behaviour)")
    return cfg


def resume_path(args) -> str | None:
    if not args.resume:
        if os.path.exists(os.path.join(args.out, "latest.pth")):
            raise SystemExit(f"{args.out} already holds a run (latest.pth); pass --resume to continue it or choose "
                             "another --out (nothing is overwritten)")
        return None
    path = os.path.join(args.out, "latest.pth")
    if not os.path.exists(path):
        raise SystemExit(f"--resume: no checkpoint at {path}")
    return path

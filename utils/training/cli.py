"""The command line both training scripts share: `--config FILE`, flags, then `KEY VALUE` config overrides."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import torch

from utils import distributed
from utils.config import ConfigError, load_config
from utils.logging import get_logger
from utils.runtime import resolve_device, seed_everything


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
    if len(overrides) % 2:  # checked before the flags below add their pairs, so that the message shows what was typed
        raise ConfigError(f"overrides come in KEY VALUE pairs; got an odd number: {overrides}")
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


@dataclass
class Run:
    """What a training script starts from: its arguments, config, checkpoint to resume, device, process rank."""
    args: argparse.Namespace
    cfg: object
    checkpoint: str | None
    device: torch.device
    rank: int
    world_size: int
    logger: logging.Logger


def start_run(argv, stage: int, description: str) -> Run:
    """Parse the command line, resolve the config, refuse to overwrite an existing run (before any work), join the
    process group, seed this process and open the log: the start both training scripts share."""
    args = training_parser(description).parse_args(argv)
    cfg = config_from_args(args, stage=stage)
    checkpoint = resume_path(args)
    device = resolve_device(cfg.RUNTIME.DEVICE)
    rank, world_size = distributed.init_distributed(device)
    seed_everything(cfg.RUNTIME.SEED + rank)
    logger = get_logger(f"stage{stage}", args.out if rank == 0 else None)
    return Run(args, cfg, checkpoint, device, rank, world_size, logger)

"""A logger that prints to the console and, on the main process, appends to OUT/log.txt."""
from __future__ import annotations

import logging
import os
import sys


def get_logger(name: str, out_dir: str | None = None) -> logging.Logger:
    logger = logging.getLogger(f"mpc.{name}")
    if logger.handlers:
        return logger
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(out_dir, "log.txt"))
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger

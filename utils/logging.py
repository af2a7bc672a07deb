"""A logger that prints to the console and, on the main process, appends to OUT/log.txt."""
from __future__ import annotations

import logging
import os
import sys


def get_logger(name: str, out_dir: str | None = None) -> logging.Logger:
    """A fresh set of handlers each call: a second run in the same process logs to its own folder."""
    logger = logging.getLogger(f"mpc.{name}")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
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

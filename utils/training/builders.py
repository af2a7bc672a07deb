"""Building a stage's data, model placement and optimiser from the config (shared by both training scripts)."""
from __future__ import annotations

import os

import numpy as np
import torch

from datasets.dataset import ForgeryDataset, collate_readable
from datasets.flist import read_flist
from datasets.mixture import build_training_rows, split_holdout
from models.activation_checkpointing import set_activation_checkpointing
from utils.config import ConfigError


def list_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def build_datasets(cfg, logger):
    """(training dataset, {name: validation dataset}, collate function) from DATA.*.

    Validation uses the lists named in DATA.VAL_LISTS when there are any (the official code names two test sets);
    otherwise a seeded held-out split of the training lists' unique images, so that model selection never sees a
    test set.
    """
    entries = [(str(path), int(repeat)) for path, repeat in cfg.DATA.TRAIN_LISTS]
    if not entries:
        raise ConfigError("DATA.TRAIN_LISTS is empty: name at least one file list to train on")
    if cfg.DATA.VAL_LISTS:
        val_sets = {list_name(p): read_flist(p) for p in cfg.DATA.VAL_LISTS}
        logger.info("validating on the named lists " + ", ".join(cfg.DATA.VAL_LISTS))
    else:
        entries, holdout = split_holdout(entries, cfg.DATA.VAL_HOLDOUT, cfg.DATA.VAL_SEED)
        val_sets = {"holdout": holdout}
        logger.info(f"validating on {len(holdout)} images held out of the training lists (seed {cfg.DATA.VAL_SEED})")
    rows = build_training_rows(entries)
    logger.info(f"training on {len(rows)} samples per epoch from " +
                ", ".join(f"{p if isinstance(p, str) else 'rows'} ×{r}" for p, r in entries))
    size = cfg.DATA.INPUT_SIZE
    train_set = ForgeryDataset(rows, mode="train", input_size=size, gt_ratio=cfg.DATA.GT_RATIO,
                               augment=cfg.DATA.AUGMENT, seed=cfg.RUNTIME.SEED)
    val_datasets = {name: ForgeryDataset(np.asarray(r), mode="val", input_size=size) for name, r in val_sets.items()}
    return train_set, val_datasets, collate_readable


def build_optimizer(cfg, parameters):
    parameters = [p for p in parameters if p.requires_grad]
    return torch.optim.AdamW(parameters, lr=cfg.SOLVER.LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)


def prepare_model(cfg, model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """Device, SyncBatchNorm (several CUDA processes), channels_last, activation checkpointing and torch.compile, as
    the config asks."""
    if cfg.RUNTIME.SYNC_BN and world_size > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.RUNTIME.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    if cfg.RUNTIME.ACTIVATION_CHECKPOINTING != "off":
        set_activation_checkpointing(model, cfg.RUNTIME.ACTIVATION_CHECKPOINTING)
    if cfg.RUNTIME.COMPILE:
        model.compile()  # in place: state_dict keys stay the same, so checkpoints stay loadable
    return model

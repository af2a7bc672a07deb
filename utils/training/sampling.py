"""A training sampler that can stop and resume mid-epoch, and a dataset wrapper that makes every item's randomness
a function of (run seed, epoch, position) alone.

With both, a run resumed from a checkpoint sees exactly the samples and augmentations an uninterrupted run would
have seen next, whatever the number of DataLoader workers or processes.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from utils.config import ConfigError


def item_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class ResumableSampler(Sampler):
    """Shuffles `num_samples` indices anew each epoch from (seed, epoch), shards them over `world_size` processes and
    yields `(index, item_seed)` pairs from a settable position. Every process sees the same number of full batches;
    the tail that does not fill one batch on every process is left for the next epoch's shuffle."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples < batch_size * world_size:
            raise ConfigError(f"the training set has {num_samples} samples, fewer than one batch of "
                             f"{batch_size} × {world_size} processes")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.start_batch, "seed": self.seed}

    def _epoch_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        return order[: self.batches_per_epoch * self.batch_size * self.world_size]

    def __iter__(self):
        order = self._epoch_order()
        per_step = self.batch_size * self.world_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            for slot in range(self.batch_size):
                position = batch * per_step + self.rank * self.batch_size + slot
                yield int(order[position]), item_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededItems(Dataset):
    """Loads `dataset[index]` with python, numpy and torch seeded from the item seed (and the dataset's own
    augmentation reseeded when it offers `reseed`). In the main process the global streams are restored afterwards,
    so loading never disturbs the model's own randomness (DropPath, loss sampling)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        in_main_process = get_worker_info() is None
        if in_main_process:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if hasattr(self.dataset, "reseed"):
            self.dataset.reseed(seed)
        try:
            return self.dataset[index]
        finally:
            if in_main_process:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])

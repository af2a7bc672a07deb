"""The training loop both stages share: schedule, validation cadence, checkpoints, resume, logging, DDP, AMP.

A stage supplies a `StageHooks`: how to put the model in training mode, one step's losses, and a validation that
returns a score. Everything else — skipping non-finite steps, stepping the scheduler with the validation score,
writing `latest.pth` / `best.pth` atomically, resuming model, optimiser, scheduler, step, sampler position and RNG
streams — happens here, identically for stage 1 and stage 2.
"""
from __future__ import annotations

import csv
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.dataset import CatchReadErrors
from datasets.io import ImageReadError
from models.checkpoint import CheckpointError, read_training_checkpoint, save_checkpoint
from utils import distributed
from utils.config import ConfigError, save_config
from utils.errors import UserError
from utils.files import write_png
from utils.interrupt import Interrupted, stop_requests
from utils.runtime import amp_dtype, autocast, capture_rng_state, make_grad_scaler, restore_rng_state
from utils.training.sampling import ResumableSampler, SeededItems


@dataclass
class StageHooks:
    """What differs between the stages."""
    set_train_mode: Callable[[torch.nn.Module], None]
    # (model, batch on device) -> dict of 0-dim loss tensors with the key "total" (what is back-propagated)
    train_step: Callable[[torch.nn.Module, dict], dict]
    # (model without DDP wrapper) -> dict of floats with the key "score" (higher is better), plus optional "images"
    validate: Callable[[torch.nn.Module], dict]


class NonFiniteLossError(UserError, RuntimeError):
    pass


def _move(batch: dict, device: torch.device, channels_last: bool) -> dict:
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
            if channels_last and key == "image":
                value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


def build_scheduler(cfg, optimizer):
    """Both official schedules are stepped once per validation: plateau with the score (stage 1), cosine (stage 2)."""
    if cfg.SOLVER.SCHEDULER == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.SOLVER.PLATEAU_FACTOR, patience=cfg.SOLVER.PLATEAU_PATIENCE,
            min_lr=cfg.SOLVER.MIN_LR)
    if cfg.SOLVER.SCHEDULER == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=cfg.SOLVER.COSINE_T_MAX, eta_min=cfg.SOLVER.MIN_LR)
    raise ConfigError(f"SOLVER.SCHEDULER must be plateau or cosine, not '{cfg.SOLVER.SCHEDULER}'")


class Trainer:
    def __init__(self, cfg, out_dir: str, model: torch.nn.Module, optimizer, train_set, hooks: StageHooks,
                 device: torch.device, collate_fn=None, rank: int = 0, world_size: int = 1,
                 forward_module: torch.nn.Module | None = None):
        """`model` is what is saved and validated; `forward_module` (default: the model) is what a training step
        calls, wrapped in DDP when several processes train — stage 1 passes a two-view wrapper around the model."""
        self.cfg = cfg
        self.out_dir = out_dir
        self.device = device
        self.hooks = hooks
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        self.model = model
        self.optimizer = optimizer
        self.scheduler = build_scheduler(cfg, optimizer)
        self.amp = amp_dtype(cfg.RUNTIME.AMP, device)
        self.scaler = make_grad_scaler(self.amp, device)
        self.batch_size = cfg.SOLVER.BATCH_SIZE
        self.sampler = ResumableSampler(len(train_set), self.batch_size, seed=cfg.RUNTIME.SEED, rank=rank,
                                        world_size=world_size)
        self.loader_args = dict(batch_size=self.batch_size, num_workers=cfg.DATA.NUM_WORKERS, collate_fn=collate_fn,
                                pin_memory=device.type == "cuda", drop_last=True,
                                persistent_workers=False,
                                # the loader's worker base seed must not come from the global stream: creating an
                                # iterator after a resume would otherwise shift the model's DropPath draws
                                generator=torch.Generator().manual_seed(cfg.RUNTIME.SEED))
        self.train_set = CatchReadErrors(SeededItems(train_set))
        self.step = 0
        self.best_score = -math.inf
        self.skipped_nonfinite = 0
        self.skipped_samples = 0
        self.last_saved_step: int | None = None  # the step of the newest checkpoint written or resumed from
        self.train_module = self._wrap(forward_module if forward_module is not None else model)
        if self.is_main:
            os.makedirs(out_dir, exist_ok=True)
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
        self._tb = None

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _wrap(self, model):
        if self.world_size == 1:
            return model
        trainable = any(p.requires_grad for p in model.parameters())
        if not trainable:
            raise RuntimeError("nothing to train: every parameter is frozen")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.world_size

    @property
    def val_interval(self) -> int:
        """Steps between validations: VAL_EVERY samples, rounded down to whole steps (at least one)."""
        return max(1, self.cfg.SOLVER.VAL_EVERY // self.samples_per_step)

    def _writer(self):
        if self._tb is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))
        return self._tb

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def _checkpoint(self) -> dict:
        return {
            "stage": int(self.cfg.STAGE),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng_state(),
            "best_score": self.best_score,
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_samples": self.skipped_samples,
            "config": self.cfg.dump(),
        }

    def save(self, name: str) -> str:
        path = os.path.join(self.out_dir, name)
        save_checkpoint(self._checkpoint(), path)
        self.last_saved_step = self.step
        return path

    def resume(self, path: str) -> None:
        checkpoint = read_training_checkpoint(path, map_location=self.device)
        if checkpoint["stage"] != int(self.cfg.STAGE):
            raise CheckpointError(f"{path}: a stage-{checkpoint['stage']} checkpoint; this is stage {self.cfg.STAGE}")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = checkpoint["step"]
        self.best_score = checkpoint["best_score"]
        self.skipped_nonfinite = checkpoint["skipped_nonfinite"]
        self.skipped_samples = checkpoint["skipped_samples"]
        self.last_saved_step = self.step
        sampler = checkpoint["sampler"]
        self.sampler.set_position(sampler["epoch"], sampler["batch"])
        restore_rng_state(checkpoint["rng"])

    # ---- logging --------------------------------------------------------------------------------------------------
    def _log_row(self, filename: str, row: dict) -> None:
        if not self.is_main:
            return
        path = os.path.join(self.out_dir, filename)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        writer = self._writer()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(f"{filename.split('.')[0]}/{key}", value, row["step"])

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def _batches(self):
        """Endless batches from the sampler's current position, epoch after epoch; keeps the position current."""
        while True:
            loader = DataLoader(self.train_set, sampler=self.sampler, **self.loader_args)
            for batch in loader:
                self.sampler.start_batch += 1
                yield batch
            self.sampler.set_position(self.sampler.epoch + 1, 0)

    def _readable(self, batch: dict) -> bool:
        """Raise for the batch's unreadable samples, or with DATA.SKIP_BAD count them and go on; False when no
        process has a readable sample left (every process skips the step together, or DDP would hang)."""
        bad = batch.pop("bad_items", [])
        if bad and not self.cfg.DATA.SKIP_BAD:
            path, problem = bad[0]
            raise ImageReadError(path, f"{problem} (DATA.SKIP_BAD True skips unreadable samples and counts them)")
        for path, problem in bad:
            warnings.warn(f"skipped an unreadable sample: {path}: {problem}")
        self.skipped_samples += len(bad)
        return distributed.all_reduce_sum(float("image" not in batch), self.device) == 0

    def _train_step(self, batch: dict) -> dict | None:
        self.hooks.set_train_mode(self.model)
        batch = _move(batch, self.device, self.cfg.RUNTIME.CHANNELS_LAST)
        with autocast(self.device, self.amp):
            losses = self.hooks.train_step(self.train_module, batch)
        total = losses["total"]
        # Every process must agree to skip, or DDP's all-reduce would hang: a non-finite value anywhere skips all.
        locally_bad = float(not torch.isfinite(total.detach()))
        finite = distributed.all_reduce_sum(locally_bad, self.device) == 0
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            return None
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {name: float(value.detach()) for name, value in losses.items()}

    def validate_and_checkpoint(self) -> dict:
        results = {}
        if self.is_main:
            self.model.eval()
            with torch.no_grad():
                results = self.hooks.validate(self.model)
            images = results.pop("images", None)
            if images is not None:
                self._writer().add_image("val/predictions", images, self.step, dataformats="HWC")
                write_png(os.path.join(self.out_dir, "previews", f"step_{self.step:07d}.png"), images)
        score = distributed.broadcast_float(results.get("score", 0.0), self.device)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(score)
        else:
            self.scheduler.step()
        improved = score > self.best_score
        if improved:
            self.best_score = score
        if self.is_main:
            self._log_row("val.csv", {"step": self.step, "samples": self.step * self.samples_per_step,
                                      **{k: v for k, v in results.items() if isinstance(v, (int, float))},
                                      "lr_next": self._lr(), "best": int(improved)})
            self.save("latest.pth")
            if improved:
                self.save("best.pth")
        distributed.barrier()
        return results

    def _interruption_note(self) -> str:
        latest = os.path.join(self.out_dir, "latest.pth")
        if self.last_saved_step is None:
            return f"interrupted at step {self.step}, before the first checkpoint: nothing was saved"
        return (f"interrupted at step {self.step}; {latest} (step {self.last_saved_step}) is intact: run the same "
                "command with --resume to continue from it")

    def fit(self, max_steps: int) -> dict:
        """Train until `max_steps` (0 = until stopped by hand); validate every VAL_EVERY samples and at the end."""
        endless = max_steps <= 0
        progress = tqdm(total=None if endless else max_steps, initial=self.step, disable=not self.is_main,
                        desc=f"stage {self.cfg.STAGE}", dynamic_ncols=True)
        batches = self._batches()
        consecutive_bad = empty_batches = 0
        last_results: dict = {}
        window_start, window_samples = time.perf_counter(), 0
        with stop_requests() as stop_requested, progress:
            while endless or self.step < max_steps:
                if stop_requested():
                    raise Interrupted(self._interruption_note())
                batch = next(batches)
                if not self._readable(batch):
                    empty_batches += 1
                    if empty_batches >= self.sampler.batches_per_epoch:
                        lists = ", ".join(str(path) for path, _ in self.cfg.DATA.TRAIN_LISTS)
                        raise UserError(f"{lists}: no readable sample in {empty_batches} batches in a row (a "
                                        f"whole epoch; {self.skipped_samples} unreadable samples skipped)")
                    continue
                empty_batches = 0
                losses = self._train_step(batch)
                self.step += 1
                progress.update(1)
                window_samples += self.samples_per_step
                if losses is None:
                    self.skipped_nonfinite += 1
                    consecutive_bad += 1
                    warnings.warn(f"step {self.step}: non-finite loss, step skipped "
                                  f"({self.skipped_nonfinite} skipped so far)")
                    if consecutive_bad >= self.cfg.SOLVER.MAX_BAD_STEPS:
                        raise NonFiniteLossError(
                            f"{consecutive_bad} consecutive steps had a non-finite loss (last at step {self.step}); "
                            "stopping. Lower SOLVER.LR, turn RUNTIME.AMP off, or check the data.")
                else:
                    consecutive_bad = 0
                    elapsed = time.perf_counter() - window_start
                    rate = window_samples / elapsed if elapsed > 0 else 0.0
                    progress.set_postfix({**{k: f"{v:.4f}" for k, v in losses.items()}, "lr": f"{self._lr():.2e}",
                                          "img/s": f"{rate:.1f}"}, refresh=False)
                    if self.step % self.cfg.SOLVER.LOG_EVERY == 0 or self.step == 1:
                        self._log_row("train.csv", {"step": self.step, "samples": self.step * self.samples_per_step,
                                                    **losses, "lr": self._lr(), "samples_per_s": rate,
                                                    "skipped_nonfinite": self.skipped_nonfinite,
                                                    "skipped_samples": self.skipped_samples})
                        window_start, window_samples = time.perf_counter(), 0
                if self.step % self.val_interval == 0 or (not endless and self.step == max_steps):
                    last_results = self.validate_and_checkpoint()
                    progress.write(f"step {self.step}: validation " +
                                   ", ".join(f"{k} {v:.4f}" for k, v in last_results.items()
                                             if isinstance(v, (int, float))) + f" (best {self.best_score:.4f})")
        if self._tb is not None:
            self._tb.close()
        return last_results

    def run(self, resume_from: str | None, logger) -> dict:
        """Resume when asked, train for SOLVER.MAX_STEPS (or until stopped by hand with SOLVER.RUN_FOREVER), then
        log a summary: the one way both training scripts run."""
        if resume_from:
            self.resume(resume_from)
            logger.info(f"resumed from {resume_from} at step {self.step}")
        results = self.fit(0 if self.cfg.SOLVER.RUN_FOREVER else self.cfg.SOLVER.MAX_STEPS)
        logger.info(f"done: step {self.step}, best score {self.best_score:.4f}, {self.skipped_nonfinite} non-finite "
                    f"steps skipped, {self.skipped_samples} bad samples skipped; checkpoints in "
                    f"{os.path.abspath(self.out_dir)}")
        distributed.cleanup()
        return results

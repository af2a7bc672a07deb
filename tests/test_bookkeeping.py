"""Training bookkeeping through the real `Trainer`: the learning rate at every validation against each schedule's
closed form, one scheduler step per validation, the validation cadence, the validation score's formula, the best
score and `best.pth` across a resume, the CSV and TensorBoard values, and the skipped-sample count across a resume.

The model is a one-weight stand-in (`test_training._TinyNet`) and validation returns scripted scores, so every
expected value below is worked out by hand from the rule it guards.
"""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch

from datasets.dataset import collate_readable
from datasets.io import ImageReadError
from test_training import _dataset, _TinyNet
from utils.config import load_config
from utils.evaluation.loop import mpc_score, validation_summary
from utils.training.engine import StageHooks, Trainer

BATCH = 2


def solver_config(**solver):
    overrides = ["DATA.NUM_WORKERS", "0", "SOLVER.BATCH_SIZE", str(BATCH), "SOLVER.LOG_EVERY", "1"]
    for key, value in solver.items():
        section = "DATA" if key == "SKIP_BAD" else "SOLVER"
        overrides += [f"{section}.{key}", str(value)]
    return load_config(None, overrides)


class ScriptedRun:
    """A `Trainer` whose validation returns the scripted `scores` in order, recording what the trainer did: the
    learning rate each optimiser step used, and at every validation its step, the number of scheduler steps taken
    before it and the model's weight."""

    def __init__(self, out_dir: Path, scores, train_set=None, collate_fn=None, **solver):
        self.cfg = solver_config(**solver)
        self.model = _TinyNet()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.cfg.SOLVER.LR)
        self.scores = list(scores)
        self.step_lr: dict[int, float] = {}
        self.validations: list[dict] = []
        hooks = StageHooks(set_train_mode=lambda model: model.train(), train_step=self._train_step,
                           validate=self._validate)
        self.trainer = Trainer(self.cfg, str(out_dir), self.model, self.optimizer,
                               train_set if train_set is not None else _dataset(8), hooks, torch.device("cpu"),
                               collate_fn=collate_fn)

    def _train_step(self, module, batch):
        self.step_lr[self.trainer.step + 1] = self.optimizer.param_groups[0]["lr"]  # the step about to be taken
        return {"total": 0.01 * module(batch["image"])}

    def _validate(self, model):
        self.validations.append({"step": self.trainer.step, "scheduler_steps": self.trainer.scheduler.last_epoch,
                                 "weight": model.weight.detach().clone()})
        return {"score": self.scores[len(self.validations) - 1]}

    def fit(self, max_steps: int) -> "ScriptedRun":
        self.trainer.fit(max_steps)
        return self


def csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def column(path: Path, name: str, kind=float) -> list:
    return [kind(row[name]) for row in csv_rows(path)]


def cosine_lr(t: int, lr0: float, eta_min: float, t_max: int) -> float:
    """The cosine schedule's closed form after t steps (periodic: no restarts, it climbs back after t_max)."""
    return eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2


# --------------------------------------------------------------------------------------------- learning rates

COSINE = dict(SCHEDULER="cosine", LR=0.8, MIN_LR=0.05, COSINE_T_MAX=3, VAL_EVERY=2 * BATCH)  # validate every 2 steps
COSINE_VALIDATIONS = 8  # past T_max (3) and past the period (6): the descent, the floor and the climb back


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory) -> ScriptedRun:
    scores = [0.1 * (i + 1) for i in range(COSINE_VALIDATIONS)]
    return ScriptedRun(tmp_path_factory.mktemp("cosine"), scores, **COSINE).fit(2 * COSINE_VALIDATIONS)


def test_cosine_learning_rate_at_every_validation_is_the_closed_form(cosine_run):
    expected = [cosine_lr(t, 0.8, 0.05, 3) for t in range(COSINE_VALIDATIONS + 1)]
    assert expected[3] == pytest.approx(0.05) and expected[6] == pytest.approx(0.8)  # floor at T_max, back at 2 T_max
    # steps 2v+1 and 2v+2 train after the v-th validation
    for step in range(1, 2 * COSINE_VALIDATIONS + 1):
        assert cosine_run.step_lr[step] == pytest.approx(expected[(step - 1) // 2], rel=1e-9), step
    lr_next = column(Path(cosine_run.trainer.out_dir) / "val.csv", "lr_next")
    assert lr_next == pytest.approx(expected[1:], rel=1e-9)


@pytest.mark.parametrize("run", ["cosine", "plateau"])
def test_the_scheduler_steps_exactly_once_per_validation(cosine_run, plateau_run, run):
    result = cosine_run if run == "cosine" else plateau_run
    n = len(result.validations)
    assert [v["scheduler_steps"] for v in result.validations] == list(range(n))  # none between validations
    assert result.trainer.scheduler.last_epoch == n


# The plateau rule (PyTorch's ReduceLROnPlateau, the official scheduler): a validation improves when its score beats
# the best so far by more than the relative threshold 1e-4; once more than `patience` validations in a row have not
# improved, the rate is multiplied by the factor (never below MIN_LR) and the count restarts.
PLATEAU = dict(SCHEDULER="plateau", LR=0.8, PLATEAU_FACTOR=0.5, PLATEAU_PATIENCE=2, MIN_LR=0.15, VAL_EVERY=BATCH)
PLATEAU_SCORES = [0.50, 0.40, 0.50, 0.45, 0.60, 0.60003, 0.30, 0.30, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10]
# worked by hand: v1 improves; v2-v4 do not (v3 only equals the best), so after v4 the rate halves; v5 improves; v6 beats v5 by only 5e-5
# (below the 1e-4 threshold: not an improvement for the scheduler, though best.pth takes it), v6-v8 do not -> halves
# after v8; v9-v11 -> 0.1 would be below MIN_LR, so 0.15; v12-v14 -> 0.075 clamps to 0.15 again: no change
PLATEAU_LR_AFTER = [0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.15, 0.15, 0.15, 0.15]
PLATEAU_BEST = [1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # score > best so far, no threshold; a tie (v3) is not


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory) -> ScriptedRun:
    return ScriptedRun(tmp_path_factory.mktemp("plateau"), PLATEAU_SCORES, **PLATEAU).fit(len(PLATEAU_SCORES))


def test_plateau_learning_rate_at_every_validation_is_the_hand_computed_sequence(plateau_run):
    used = [plateau_run.step_lr[step] for step in range(1, len(PLATEAU_SCORES) + 1)]
    assert used == pytest.approx([0.8] + PLATEAU_LR_AFTER[:-1], rel=1e-12)  # one validation per step
    val_csv = Path(plateau_run.trainer.out_dir) / "val.csv"
    assert column(val_csv, "lr_next") == pytest.approx(PLATEAU_LR_AFTER, rel=1e-12)
    assert column(val_csv, "best", int) == PLATEAU_BEST
    assert plateau_run.trainer.best_score == 0.60003


# -------------------------------------------------------------------------------------------- validation cadence

@pytest.mark.parametrize("val_every, max_steps, expected_steps", [
    (7, 10, [3, 6, 9, 10]),  # 7 samples / batch 2 = 3.5, rounded down to 3 steps; plus the final step
    (6, 9, [3, 6, 9]),       # the final step is a regular validation: not validated twice
    (1, 3, [1, 2, 3]),       # fewer samples than a batch: every step
    (100, 4, [4]),           # more samples than the run: the final validation only
])
def test_validation_cadence_is_val_every_samples_in_whole_steps_and_at_the_end(tmp_path, val_every, max_steps,
                                                                              expected_steps):
    run = ScriptedRun(tmp_path, [0.5] * len(expected_steps), VAL_EVERY=val_every).fit(max_steps)
    assert [v["step"] for v in run.validations] == expected_steps
    assert column(tmp_path / "val.csv", "step", int) == expected_steps
    assert column(tmp_path / "val.csv", "samples", int) == [BATCH * step for step in expected_steps]


# ----------------------------------------------------------------------------------------------- validation score

def test_validation_score_is_the_mean_of_f1_and_iou_over_the_sets():
    # docs/MPC_SPEC.md §3: mean of {F1_A, F1_B, IoU_A, IoU_B}, unweighted by set size; a set without tampered images (NaN
    # metrics) is left out
    results = {"casia": {"f1_fixed": 0.6, "iou": 0.3, "n_images": 900},
               "dso": {"f1_fixed": 0.9, "iou": 0.7, "n_images": 100},
               "authentic_only": {"f1_fixed": math.nan, "iou": math.nan, "n_images": math.nan}}
    assert mpc_score(results) == pytest.approx((0.6 + 0.3 + 0.9 + 0.7) / 4)
    assert mpc_score({"casia": results["casia"]}) == pytest.approx(0.45)
    assert mpc_score({"authentic_only": results["authentic_only"]}) == 0.0
    summary = validation_summary(results)
    assert summary["score"] == pytest.approx(0.625)
    assert (summary["casia_f1"], summary["casia_iou"], summary["dso_f1"], summary["dso_iou"]) == (0.6, 0.3, 0.9, 0.7)
    assert math.isnan(summary["authentic_only_f1"]) and math.isnan(summary["authentic_only_iou"])


# ---------------------------------------------------------------------------------------------------- resuming

def test_best_score_and_best_pth_survive_a_worse_validation_after_resume(tmp_path):
    resume = dict(SCHEDULER="plateau", LR=0.8, PLATEAU_PATIENCE=1, VAL_EVERY=2 * BATCH)  # validate every 2 steps
    first = ScriptedRun(tmp_path, [0.5, 0.7], **resume).fit(4)
    best_weight = first.validations[-1]["weight"]
    resumed = ScriptedRun(tmp_path, [0.6, 0.65], **resume)
    resumed.trainer.resume(str(tmp_path / "latest.pth"))
    assert resumed.trainer.best_score == 0.7
    resumed.fit(8)

    assert resumed.trainer.best_score == 0.7
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    latest = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert (best["step"], best["best_score"]) == (4, 0.7)
    assert torch.equal(best["model"]["weight"], best_weight)
    assert (latest["step"], latest["best_score"]) == (8, 0.7)
    assert not torch.equal(latest["model"]["weight"], best_weight)
    val_csv = tmp_path / "val.csv"
    assert column(val_csv, "step", int) == [2, 4, 6, 8]
    assert column(val_csv, "score") == [0.5, 0.7, 0.6, 0.65]
    assert column(val_csv, "best", int) == [1, 1, 0, 0]
    # the plateau count carries over too: 0.6 and 0.65 are the 1st and 2nd validations without improving on 0.7,
    # and with patience 1 the second halves the rate (a fresh scheduler would take 0.6 as its first best)
    assert column(val_csv, "lr_next") == pytest.approx([0.8, 0.8, 0.8, 0.4])
    assert [resumed.step_lr[step] for step in (5, 6, 7, 8)] == pytest.approx([0.8] * 4)


class OneUnreadable(torch.utils.data.Dataset):
    """Eight readable items but item 3, which cannot be read: one skipped sample per epoch of 4 batches of 2."""

    def __init__(self):
        self.items = _dataset(8)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if index == 3:
            raise ImageReadError(f"item_{index}.png", "corrupt or truncated image")
        return self.items[index]


def test_skipped_sample_count_is_saved_and_restored(tmp_path):
    settings = dict(SKIP_BAD=True, VAL_EVERY=4 * BATCH)  # validate (and save) once per epoch of 4 steps
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "skipped an unreadable sample")
        first = ScriptedRun(tmp_path, [0.5], OneUnreadable(), collate_readable, **settings).fit(4)
        assert first.trainer.skipped_samples == 1
        assert torch.load(tmp_path / "latest.pth", weights_only=True)["skipped_samples"] == 1
        resumed = ScriptedRun(tmp_path, [0.5], OneUnreadable(), collate_readable, **settings)
        resumed.trainer.resume(str(tmp_path / "latest.pth"))
        assert resumed.trainer.skipped_samples == 1
        resumed.fit(8)
    assert resumed.trainer.skipped_samples == 2
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["skipped_samples"] == 2
    skipped = column(tmp_path / "train.csv", "skipped_samples", int)
    assert len(skipped) == 8 and skipped[3] == 1 and skipped[-1] == 2 and skipped == sorted(skipped)


# --------------------------------------------------------------------------------------------------- the logs

def test_csv_and_tensorboard_hold_the_values_the_trainer_used(cosine_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = Path(cosine_run.trainer.out_dir)
    steps = range(1, 2 * COSINE_VALIDATIONS + 1)
    train_csv, val_csv = out / "train.csv", out / "val.csv"
    assert column(train_csv, "step", int) == list(steps)
    assert column(train_csv, "lr") == [cosine_run.step_lr[step] for step in steps]
    assert column(val_csv, "score") == cosine_run.scores
    # the rate logged after a validation is the one the next step trains with
    assert column(val_csv, "lr_next")[:-1] == [cosine_run.step_lr[v["step"] + 1] for v in cosine_run.validations[:-1]]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()

    def scalars(tag):
        return {event.step: event.value for event in events.Scalars(tag)}

    # TensorBoard stores float32
    assert scalars("train/lr") == {step: pytest.approx(cosine_run.step_lr[step], rel=1e-6) for step in steps}
    assert scalars("val/score") == {v["step"]: pytest.approx(s, rel=1e-6)
                                    for v, s in zip(cosine_run.validations, cosine_run.scores)}
    assert scalars("val/lr_next") == {step: pytest.approx(value, rel=1e-6)
                                      for step, value in zip(column(val_csv, "step", int), column(val_csv, "lr_next"))}

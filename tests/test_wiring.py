"""Every config key that changes a computation changes that computation as it should, and nothing else (issue 15,
group 2).

The loss keys are checked through the real stage-1 step (`stage1.train.loss_terms`) against a naive re-computation
written here from docs/MPC_SPEC.md §3, and a hand-worked example; the model, optimiser, scheduler and stage-2 keys through
the objects the scripts build (tests/built_objects.py) on hrt_nano, or on HRT-B where the spec's 14 DropPath positions
are the point.
"""
from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from built_objects import build_run, defaults_yaml, training_dataset
from utils.config import load_config

TERMS = ("within_image", "cross_scale", "cross_modality")
WEIGHT_KEYS = {"within_image": "LOSS.WITHIN_IMAGE", "cross_scale": "LOSS.CROSS_SCALE",
               "cross_modality": "LOSS.CROSS_MODALITY"}


# ---- a naive multi-view loss (docs/MPC_SPEC.md §3), every pixel sampled ----------------------------------------------
def naive_info_nce(anchors: torch.Tensor, negatives: torch.Tensor, tau: float, positives=None) -> float:
    """ℓ(A, N): mean over anchors of −log(exp(p_i/τ) / (exp(p_i/τ) + Σ_k exp(⟨a_i, n_k⟩/τ))), with p_i the mean
    similarity to the other anchors (or to every row of `positives`); 0 where undefined."""
    if len(negatives) == 0 or len(anchors) == 0 or (positives is None and len(anchors) < 2) or (
            positives is not None and len(positives) == 0):
        return 0.0
    total = 0.0
    for i, anchor in enumerate(anchors):
        if positives is None:
            p = sum(float(anchor @ anchors[j]) for j in range(len(anchors)) if j != i) / (len(anchors) - 1)
        else:
            p = sum(float(anchor @ key) for key in positives) / len(positives)
        denominator = math.exp(p / tau) + sum(math.exp(float(anchor @ n) / tau) for n in negatives)
        total += -math.log(math.exp(p / tau) / denominator)
    return total / len(anchors)


def pixels(feature_map: torch.Tensor) -> torch.Tensor:
    """C×H×W → (H·W)×C unit rows."""
    return F.normalize(feature_map.flatten(1).T.double(), dim=1)


def naive_terms(view1, view2, mask: torch.Tensor, tau: float, positives: str = "own") -> dict:
    """The three terms, each the mean over images of its per-image sum (docs/MPC_SPEC.md §3); mask B×H×W, nearest labels
    for the coarser scales (pixel (i, j) of a map k times smaller takes label (k·i, k·j))."""
    terms = {term: 0.0 for term in TERMS}
    batch, height, _ = mask.shape
    for b in range(batch):
        fine_labels = mask[b].flatten()
        coarse_labels = torch.cat([mask[b][::height // m.shape[-2], ::height // m.shape[-2]].flatten() for m in view1[1:]])
        fine1, fine2 = pixels(view1[0][b]), pixels(view2[0][b])
        coarse1 = torch.cat([pixels(m[b]) for m in view1[1:]])
        a11, f11 = fine1[fine_labels == 0], fine1[fine_labels == 1]
        a21, f21 = fine2[fine_labels == 0], fine2[fine_labels == 1]
        a_coarse, f_coarse = coarse1[coarse_labels == 0], coarse1[coarse_labels == 1]
        other = positives == "other"
        terms["within_image"] += naive_info_nce(a11, f11, tau)
        terms["cross_scale"] += (naive_info_nce(a11, f_coarse, tau, a_coarse if other else None)
                                 + naive_info_nce(a_coarse, f11, tau, a11 if other else None))
        terms["cross_modality"] += (naive_info_nce(a11, f21, tau, a21 if other else None)
                                    + naive_info_nce(a21, f11, tau, a11 if other else None))
    return {term: value / batch for term, value in terms.items()}


def random_views(batch: int = 2, channels: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sizes = (8, 4, 2, 1)
    return [[torch.randn(batch, channels, s, s, generator=generator) for s in sizes] for _ in range(2)]


def forged_region_mask(batch: int = 2) -> torch.Tensor:
    """B×1×8×8 as the dataset gives it: image b forged on columns ≥ 3 + b, so the images differ."""
    mask = torch.zeros(batch, 1, 8, 8)
    for b in range(batch):
        mask[b, :, :, 3 + b:] = 1
    return mask


def run_step(overrides=(), views=None, mask=None) -> dict:
    """One call of the real stage-1 step on a module that returns fixed views."""
    from stage1.train import loss_terms

    view1, view2 = views if views is not None else random_views()
    mask = forged_region_mask() if mask is None else mask
    step = loss_terms(load_config(None, list(overrides)))
    return step(lambda images: (view1, view2), {"image": torch.zeros(mask.shape[0], 3, 32, 32), "mask": mask})


@pytest.fixture(scope="module")
def reference_terms():
    view1, view2 = random_views()
    mask = forged_region_mask()[:, 0]
    return {mode: naive_terms(view1, view2, mask, 0.1, mode) for mode in ("own", "other")}


# ---- loss keys ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [
    {"within_image": 0.0, "cross_scale": 1.0, "cross_modality": 1.0},
    {"within_image": 1.0, "cross_scale": 0.0, "cross_modality": 1.0},
    {"within_image": 1.0, "cross_scale": 1.0, "cross_modality": 0.0},
    {"within_image": 0.5, "cross_scale": 2.0, "cross_modality": 3.0},
], ids=["no_within_image", "no_cross_scale", "no_cross_modality", "distinct"])
def test_loss_weight_scales_exactly_its_own_term(weights, reference_terms):
    overrides = [item for term, weight in weights.items() for item in (WEIGHT_KEYS[term], str(weight))]
    losses = run_step(overrides)
    expected = reference_terms["own"]
    for term in TERMS:  # the terms themselves do not depend on the weights
        assert float(losses[term]) == pytest.approx(expected[term], rel=1e-5), term
    expected_total = sum(weights[term] * expected[term] for term in TERMS)
    assert float(losses["total"]) == pytest.approx(expected_total, rel=1e-5)
    assert min(expected.values()) > 0.1  # every term matters, so a weight wired to another term shows


# Hand-made embeddings: one image of 1×3 pixels, two authentic a1 = (1, 0), a2 = (3, 4)/5 = (0.6, 0.8) and one
# forged f = (0, 1). Positives p1 = p2 = ⟨a1, a2⟩ = 0.6; negatives ⟨a1, f⟩ = 0, ⟨a2, f⟩ = 0.8. Each anchor's loss is
# log(1 + exp((s − p)/τ)):
#   τ = 0.5: (log(1 + e^−1.2) + log(1 + e^0.4)) / 2 = (0.2632824673 + 0.9130152524) / 2 = 0.5881488599
#   τ = 0.1: (log(1 + e^−6) + log(1 + e^2)) / 2 = (0.0024756851 + 2.1269280110) / 2 = 1.0647018481
HAND_WORKED_WITHIN_IMAGE = {0.5: 0.5881488599, 0.1: 1.0647018481}


def hand_made_views():
    fine = torch.tensor([[1.0, 3.0, 0.0], [0.0, 4.0, 1.0]]).view(1, 2, 1, 3)
    coarse = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
    view = [fine, coarse, coarse, coarse]
    return view, view


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_temperature_gives_the_hand_worked_loss(temperature):
    overrides = [] if temperature == 0.1 else ["LOSS.TEMPERATURE", str(temperature)]  # 0.1 = the default
    mask = torch.tensor([0.0, 0.0, 1.0]).view(1, 1, 1, 3)
    losses = run_step(overrides, views=hand_made_views(), mask=mask)
    assert float(losses["within_image"]) == pytest.approx(HAND_WORKED_WITHIN_IMAGE[temperature], abs=1e-6)


@pytest.fixture
def sampler_calls(monkeypatch):
    """Every call of the loss's sampler: its arguments by name and what it returned."""
    import losses.pixel_contrast

    real = losses.pixel_contrast.sample_indices
    calls = []

    def recorder(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((inspect.signature(real).bind(*args, **kwargs).arguments, result))
        return result

    monkeypatch.setattr(losses.pixel_contrast, "sample_indices", recorder)
    return calls


def test_max_samples_reaches_the_sampler(sampler_calls):
    run_step(["LOSS.MAX_SAMPLES", "3"])
    ((arguments, samples),) = sampler_calls
    assert arguments["max_samples"] == 3
    # Every set of both images has more than 3 candidates (≥ 24 of each label at scale 1, ≥ 6 when coarse).
    for image in range(2):
        assert [len(s) for s in samples.anchors[image]] == [3] * 5
        assert [len(s) for s in samples.negatives[image]] == [3] * 5


@pytest.mark.parametrize("share", [False, True])
def test_share_samples_reaches_the_sampler(sampler_calls, share):
    torch.manual_seed(0)
    run_step(["LOSS.MAX_SAMPLES", "5", "LOSS.SHARE_SAMPLES", str(share)])
    ((arguments, samples),) = sampler_calls
    assert arguments.get("share_samples", False) is share
    # Pairs 0, 1 and 3 all take their anchors from the authentic scale-1 pixels of view 1 (§3).
    first, second, fourth = (samples.anchors[0][k] for k in (0, 1, 3))
    assert (torch.equal(first, second) and torch.equal(first, fourth)) is share


def test_positives_mode_reaches_the_loss(reference_terms):
    own = run_step()
    other = run_step(["LOSS.POSITIVES", "other"])
    for term in TERMS:
        assert float(own[term]) == pytest.approx(reference_terms["own"][term], rel=1e-5), term
        assert float(other[term]) == pytest.approx(reference_terms["other"][term], rel=1e-5), term
    # Only the cross terms have another scale or view to take positives from: there the modes must differ.
    for term in ("cross_scale", "cross_modality"):
        assert abs(reference_terms["own"][term] - reference_terms["other"][term]) > 1e-3


# ---- model keys -----------------------------------------------------------------------------------------------------
NANO = ["MODEL.BACKBONE", "hrt_nano", "DATA.INPUT_SIZE", "64"]


@pytest.fixture
def build(tmp_path, one_thread):
    """build(stage, overrides) -> the Trainer the stage script builds from the defaults plus `overrides`."""
    counter = itertools.count()

    def make(stage: int, overrides=()):
        folder = tmp_path / f"run{next(counter)}"
        folder.mkdir()
        return build_run(stage, defaults_yaml(folder, stage), folder / "out", list(overrides))
    return make


@pytest.mark.parametrize("stage", [1, 2])
def test_drop_path_rate_reaches_every_block_of_hrt_base(build, stage):
    run = build(stage, ["MODEL.DROP_PATH_RATE", "0.3"])
    # docs/MPC_SPEC.md §2: linspace(0, rate, 14) over the 14 block positions; module m (counted over stages 2-4) takes
    # positions 2m and 2m + 1, in every one of its branches.
    rates = [0.3 * k / 13 for k in range(14)]
    first_module = {"stage2": 0, "stage3": 1, "stage4": 5}
    drop_paths = [(n, m.drop_prob) for n, m in run.model.named_modules() if type(m).__name__ == "DropPath"]
    assert len(drop_paths) == 44
    for name, rate in drop_paths:
        stage_name, module, _, _, block = name.removeprefix("encoder.").split(".")[:5]
        assert rate == pytest.approx(rates[2 * (first_module[stage_name] + int(module)) + int(block)], abs=1e-7), name


def two_train_mode_views(run, stage: int):
    """Two passes on one batch after the script's train-mode hook: stage 1's two views, or stage 2's backbone."""
    run.hooks.set_train_mode(run.model)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if stage == 1:
            view1, view2 = run.train_module(images)
        else:
            view1, view2 = run.model.encoder(images), run.model.encoder(images)
    return view1, view2


@pytest.mark.parametrize("rate,equal", [("0.0", True), ("0.2", False)])
def test_two_train_mode_views_differ_only_through_drop_path(build, rate, equal):
    view1, view2 = two_train_mode_views(build(1, NANO + ["MODEL.DROP_PATH_RATE", rate]), stage=1)
    assert all(torch.equal(a, b) for a, b in zip(view1, view2)) is equal


@pytest.mark.parametrize("freeze,faithful", [(True, False), (True, True), (False, False), (False, True)])
def test_stage2_backbone_modes(build, freeze, faithful):
    run = build(2, NANO + ["STAGE2.FREEZE_BACKBONE", str(freeze), "STAGE2.FAITHFUL_TRAIN_MODE", str(faithful)])
    run.hooks.set_train_mode(run.model)
    # docs/MPC_SPEC.md §4/§9.3: the clean default evaluates the frozen backbone; the official run left it in train mode.
    backbone_trains = faithful or not freeze
    assert all(m.training is backbone_trains for m in run.model.encoder.modules())
    assert all(m.training for m in run.model.decoder.modules())
    assert all(p.requires_grad is not freeze for p in run.model.encoder.parameters())
    trained = {id(p) for p in run.optimizer.param_groups[0]["params"]}
    expected = run.model.decoder.parameters() if freeze else run.model.parameters()
    assert trained == {id(p) for p in expected}
    # In train mode DropPath (0.2 by default) makes two backbone passes differ; in eval mode they are equal.
    features1, features2 = two_train_mode_views(run, stage=2)
    assert all(torch.equal(a, b) for a, b in zip(features1, features2)) is not backbone_trains


def test_model_keys_select_backbone_and_head(build):
    run = build(2, NANO + ["MODEL.HEAD", "casiav2"])
    widths = tuple(branch[0].norm1.normalized_shape[0] for branch in run.model.encoder.stage4[-1].branches)
    assert widths == (16, 32, 64, 128)  # hrt_nano
    convs = [(m.in_channels, m.out_channels) for m in run.model.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(1024, 512), (512, 256), (256, 128), (128, 64), (64, 1)]  # docs/MPC_SPEC.md §4 CASIAv2 variant


# ---- solver and data keys -------------------------------------------------------------------------------------------
def test_solver_and_data_keys_reach_optimiser_scheduler_loader_and_dataset(build):
    run = build(1, NANO + ["SOLVER.LR", "3e-4", "SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.PLATEAU_FACTOR", "0.25",
                           "SOLVER.PLATEAU_PATIENCE", "7", "SOLVER.MIN_LR", "2e-7", "SOLVER.BATCH_SIZE", "2",
                           "SOLVER.VAL_EVERY", "101", "DATA.GT_RATIO", "8"])
    (group,) = run.optimizer.param_groups
    assert (group["lr"], group["weight_decay"]) == (3e-4, 0.05)
    assert (group["betas"], group["eps"], group["amsgrad"]) == ((0.9, 0.999), 1e-8, False)  # untouched
    scheduler = run.scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (scheduler.mode, scheduler.factor, scheduler.patience, scheduler.min_lrs) == ("max", 0.25, 7, [2e-7])
    assert run.batch_size == run.loader_args["batch_size"] == 2
    assert run.val_interval == 50  # 101 samples // 2 per step
    dataset = training_dataset(run)
    assert (dataset.input_size, dataset.gt_ratio) == (64, 8)


def test_cosine_keys_reach_the_scheduler(build):
    run = build(2, NANO + ["SOLVER.SCHEDULER", "cosine", "SOLVER.LR", "2e-6", "SOLVER.COSINE_T_MAX", "7",
                           "SOLVER.MIN_LR", "3e-9"])
    scheduler = run.scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert (scheduler.T_max, scheduler.eta_min, scheduler.base_lrs) == (7, 3e-9, [2e-6])


@pytest.mark.parametrize("batch", [1, 3])
def test_test_batch_size_reaches_stage2_validation(build, monkeypatch, batch):
    """TEST.BATCH_SIZE is the batch of every validation set's `evaluate` (whose batches equal one image at a time's:
    tests/test_test_script.py); stage 1's k-means validation stays one image at a time."""
    import stage2.train

    calls = []

    def evaluate(predict, dataset, device, **options):
        calls.append(options.get("batch_size"))
        return {"f1_fixed": 0.5, "iou": 0.25}

    run = build(2, NANO + ["TEST.BATCH_SIZE", str(batch)])
    monkeypatch.setattr(stage2.train, "evaluate", evaluate)
    summary = run.hooks.validate(run.model)
    assert calls and calls == [batch] * len(calls)
    assert summary["score"] == pytest.approx(0.375)


def test_a_test_batch_size_below_one_is_refused(build):
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match="TEST.BATCH_SIZE must be positive"):
        build(2, NANO + ["TEST.BATCH_SIZE", "0"])


# ---- the head loss --------------------------------------------------------------------------------------------------
HEAD_LOGITS = [2.0, -1.0, 0.5, -3.0]
HEAD_TARGET = [1.0, 0.0, 0.0, 1.0]


def head_loss_by_hand(name: str) -> float:
    """Mean over the pixels of BCE (the paper's text), or of 0.5·(1 − p_t)²·BCE (the official focal loss, §4)."""
    total = 0.0
    for z, y in zip(HEAD_LOGITS, HEAD_TARGET):
        p = 1 / (1 + math.exp(-z))
        p_t = p * y + (1 - p) * (1 - y)
        total += -math.log(p_t) * (1.0 if name == "bce" else 0.5 * (1 - p_t) ** 2)
    return total / len(HEAD_LOGITS)


@pytest.mark.parametrize("name", ["focal", "bce"])
def test_head_loss_key_selects_focal_or_bce(name):
    from stage2.train import head_step

    step = head_step(load_config(None, ["STAGE", "2", "LOSS.HEAD", name]))
    logits = torch.tensor(HEAD_LOGITS, dtype=torch.float64).view(1, 1, 2, 2)
    losses = step(lambda images: logits, {"image": torch.zeros(1, 3, 8, 8),
                                          "mask": torch.tensor(HEAD_TARGET).view(1, 1, 2, 2)})
    assert float(losses["total"]) == pytest.approx(head_loss_by_hand(name), rel=1e-12)
    assert float(losses[name]) == float(losses["total"])
    assert abs(head_loss_by_hand("focal") - head_loss_by_hand("bce")) > 0.1

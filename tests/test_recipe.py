"""The faithful recipe, held on the objects the training scripts build (issue 15, group 1).

RECIPE below is written by hand from docs/MPC_SPEC.md (the section beside each row), never read back
from the code. Every faithful config goes through its script's real `main` (tests/built_objects.py: nothing trains)
and the tests inspect what was built: every normalisation layer of each kind, the DropPath modules, the optimiser's
parameter group, the scheduler object, the datasets, the train-mode hook, and the arguments the loss receives.
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from built_objects import build_run, defaults_yaml, norm_kind, training_dataset

# ---- the recipe (docs/MPC_SPEC.md) -----------------------------------------------------------------------------------
RECIPE = {
    # stage-1 contrastive loss
    "temperature": 0.1,  # §3 "Temperature τ = 0.1"; App. A contrastive loss
    "max_samples": 5000,  # §3 "at most K = 5000 (dict_size)"; App. A sampling
    "loss_weights": {"within_image": 1.0, "cross_scale": 1.0, "cross_modality": 1.0},  # §3 "All weights are 1"
    "positives": "own",  # §3 "the positives are the anchors' own set"; §9.4 code behaviour by default
    "share_samples": False,  # §3 "Samples are re-drawn independently for every term"
    # optimiser: AdamW with PyTorch's defaults apart from lr (§3 "β=(0.9, 0.999), wd=0.01, eps=1e-8"; §4 "default wd")
    "optimizer": torch.optim.AdamW,  # §3, §4
    "stage1_lr": 1e-4,  # §3; App. A stage-1 optim
    "stage2_lr": 1e-6,  # §4; App. A stage-2 optim
    "betas": (0.9, 0.999),  # §3
    "adam_eps": 1e-8,  # §3
    "weight_decay": 0.01,  # §3; App. A
    "amsgrad": False,  # §3 "PyTorch defaults"
    # schedules, both stepped once per validation
    "stage1_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau,  # §3
    "plateau_mode": "max",  # §3; App. A
    "plateau_factor": 0.5,  # §3
    "plateau_patience": 3,  # §3
    "plateau_min_lr": 1e-8,  # §3
    "stage2_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR,  # §4
    "cosine_t_max": 20,  # §4 "T_max=20" validations
    "cosine_eta_min": 1e-8,  # §4 "eta_min=1e-8"
    # data and cadence
    "batch_size": 4,  # §3 "Batch: 4 images"; §4 "Batch 4"
    "input_size": 512,  # §2 "resized (squashed) to 512×512"
    "gt_ratio": 4,  # §3 masks 128×128 for a 512 input (gt_ratio 4); §2 output stride 4
    "augment": True,  # §3 augmentation (the probability-0.75 pipeline) on training images
    "val_every_samples": 8436,  # §3 "every 8,436 samples"
    "val_every_steps": 2109,  # §3 "(2,109 iterations)" at batch 4
    "train_list_repeats": {  # §5 the CATNet-protocol mixture
        "tampCOCO_sp_199999": 1, "tampCOCO_cm_199429": 1, "tampCOCO_bcm_199443": 1, "CASIA2_5123": 40, "IMD_2010": 20},
    # backbone
    "stage1_views": 2,  # §3 "twice, one after the other, in train mode"; App. A
    "drop_path_rate": 0.2,  # §2 "DROP_PATH_RATE=0.2"
    # §2: linspace(0, 0.2, 14); module m of a stage takes the next two values, every branch of it the same two
    "drop_path_per_module": [(0.0, 0.0154),  # stage 2
                             (0.0308, 0.0462), (0.0615, 0.0769), (0.0923, 0.1077), (0.1231, 0.1385),  # stage 3
                             (0.1538, 0.1692), (0.1846, 0.2)],  # stage 4
    "drop_path_rounding": 6e-5,  # the spec prints the rates to 4 decimals
    # BatchNorm (momentum, eps) by kind: §2 "SyncBatchNorm is replaced by BatchNorm2d", stem "BN (momentum 0.1)";
    # only the projections set other values; PyTorch's BatchNorm2d default eps is 1e-5. Head: §4 plain BN layers.
    "batchnorm": {"stem": (0.1, 1e-5), "bottleneck": (0.1, 1e-5), "transformer_ffn": (0.1, 1e-5),
                  "fusion": (0.1, 1e-5), "transition": (0.1, 1e-5), "projection": (0.03, 1e-3), "head": (0.1, 1e-5)},
    "layernorm_eps": 1e-6,  # §2 "Pre-LayerNorm, ε=1e-6"
    "projection_channels": 256,  # §2 "1×1 conv (no bias) ... to 256"
    "hrt_base_widths": (78, 156, 312, 624),  # §2 stage 4; App. A
    "hrt_base_heads": (2, 4, 8, 16),  # §2 stage 4; App. A
    # stage 2
    "head_convs": [(1024, 512), (512, 256), (256, 128), (128, 1)],  # §4 decoder for the CATNet weights, all 1×1
    "focal_alpha": 0.5,  # §4 "α_t = 0.5"; App. A
    "focal_gamma": 2.0,  # §4 "(1−p_t)²"; App. A
    "stage2_trains_decoder_only": True,  # §4 "AdamW is built over decoder parameters only"
    "stage2_backbone_frozen": True,  # §4 the paper's "frozen" backbone; §9.3 clean default (eval, no gradients)
}

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULTS = "defaults"  # a YAML naming only the stage: every value comes from utils/config.py
STAGE1_RUNS = {DEFAULTS: None, "stage1_hrt_base": CONFIGS / "stage1_hrt_base.yaml",
               "stage1_hrt_small": CONFIGS / "stage1_hrt_small.yaml"}
# The defaults are the stage-1 solver; for stage 2 they hold everything but the solver rows.
STAGE2_RUNS = {DEFAULTS: None, "stage2_hrt_base": CONFIGS / "stage2_hrt_base.yaml",
               "stage2_hrt_small": CONFIGS / "stage2_hrt_small.yaml"}
STAGE2_YAMLS = [name for name in STAGE2_RUNS if name != DEFAULTS]
HRT_BASE_RUNS = [(1, DEFAULTS), (1, "stage1_hrt_base"), (2, DEFAULTS), (2, "stage2_hrt_base")]
ALL_RUNS = [(1, name) for name in STAGE1_RUNS] + [(2, name) for name in STAGE2_RUNS]


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """built(stage, name) -> the Trainer the stage script builds for that config (each built once per module)."""
    runs = {}

    def get(stage: int, name: str):
        if (stage, name) not in runs:
            folder = tmp_path_factory.mktemp(f"stage{stage}_{name}")
            config = {1: STAGE1_RUNS, 2: STAGE2_RUNS}[stage][name]
            if config is None:
                config = defaults_yaml(folder, stage)
            runs[stage, name] = build_run(stage, config, folder / "run")
        return runs[stage, name]

    yield get
    runs.clear()


# ---- the model -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,name", ALL_RUNS)
def test_every_batchnorm_of_each_kind_has_the_recipe_momentum_and_eps(built, stage, name):
    model = built(stage, name).model
    found = {}
    for layer_name, layer in model.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            kind = norm_kind(layer_name)
            assert type(layer) is nn.BatchNorm2d, (layer_name, type(layer))  # §2: BatchNorm2d, not SyncBatchNorm
            assert layer.affine and layer.track_running_stats, layer_name
            found.setdefault(kind, []).append((layer_name, layer.momentum, layer.eps))
    expected_kinds = set(RECIPE["batchnorm"]) - ({"head"} if stage == 1 else set())
    assert set(found) == expected_kinds  # nothing unclassified, every kind present
    for kind, layers in found.items():
        momentum, eps = RECIPE["batchnorm"][kind]
        for layer_name, layer_momentum, layer_eps in layers:
            assert layer_momentum == momentum and layer_eps == eps, (kind, layer_name, layer_momentum, layer_eps)


@pytest.mark.parametrize("stage,name", ALL_RUNS)
def test_every_layernorm_has_eps_1e_6(built, stage, name):
    norms = [(n, m.eps) for n, m in built(stage, name).model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(eps == RECIPE["layernorm_eps"] for _, eps in norms), norms


@pytest.mark.parametrize("stage,name", ALL_RUNS)
def test_drop_path_rates_per_module_are_the_linear_schedule(built, stage, name):
    drop_paths = [(n, m.drop_prob) for n, m in built(stage, name).model.named_modules() if type(m).__name__ == "DropPath"]
    # §2: stage 2 has 1 module of 2 branches, stage 3 four of 3, stage 4 two of 4; 2 blocks per branch.
    assert len(drop_paths) == (1 * 2 + 4 * 3 + 2 * 4) * 2 == 44
    first_module = {"stage2": 0, "stage3": 1, "stage4": 5}  # the module's index over stages 2-4, in depth order
    for layer_name, rate in drop_paths:
        stage_name, module, _, _, block = layer_name.removeprefix("encoder.").split(".")[:5]  # stageS.M.branches.B.K
        expected = RECIPE["drop_path_per_module"][first_module[stage_name] + int(module)][int(block)]
        assert abs(rate - expected) <= RECIPE["drop_path_rounding"], (layer_name, rate, expected)
    # torch.linspace (float32, as officially) gives 0.2 to float32 precision.
    assert max(rate for _, rate in drop_paths) == pytest.approx(RECIPE["drop_path_rate"], abs=1e-7)


@pytest.mark.parametrize("stage,name", HRT_BASE_RUNS)
def test_backbone_is_hrt_base_with_256_channel_projections(built, stage, name):
    encoder = built(stage, name).model.encoder
    last_module = encoder.stage4[-1]
    widths = tuple(branch[0].norm1.normalized_shape[0] for branch in last_module.branches)
    heads = tuple(branch[0].attn.attn.num_heads for branch in last_module.branches)
    assert widths == RECIPE["hrt_base_widths"] and heads == RECIPE["hrt_base_heads"]
    projections = [(p.conv.in_channels, p.conv.out_channels, p.conv.bias is None) for p in encoder.convs]
    assert projections == [(w, RECIPE["projection_channels"], True) for w in RECIPE["hrt_base_widths"]]


@pytest.mark.parametrize("name", list(STAGE2_RUNS))
def test_stage2_head_layout(built, name):
    decoder = built(2, name).model.decoder
    convs = [m for m in decoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == RECIPE["head_convs"]
    assert all(c.kernel_size == (1, 1) and c.bias is not None for c in convs)
    layers = list(decoder.classifier)
    # BN, ReLU, then [conv, BN, ReLU] per hidden width, then the final conv (§4).
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["BatchNorm2d", "ReLU"] + ["Conv2d", "BatchNorm2d", "ReLU"] * 3 + ["Conv2d"]
    assert layers[0].num_features == RECIPE["head_convs"][0][0]


# ---- optimiser, scheduler, cadence, data ---------------------------------------------------------------------------
def check_adamw(optimizer, lr):
    assert type(optimizer) is RECIPE["optimizer"]
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["lr"] == lr and group["betas"] == RECIPE["betas"] and group["eps"] == RECIPE["adam_eps"]
    assert group["weight_decay"] == RECIPE["weight_decay"] and group["amsgrad"] is RECIPE["amsgrad"]
    assert group["maximize"] is False
    return {id(p) for p in group["params"]}


@pytest.mark.parametrize("name", list(STAGE1_RUNS))
def test_stage1_optimiser_is_adamw_over_every_backbone_parameter(built, name):
    run = built(1, name)
    params = check_adamw(run.optimizer, RECIPE["stage1_lr"])
    assert params == {id(p) for p in run.model.parameters()}
    assert all(p.requires_grad for p in run.model.parameters())


@pytest.mark.parametrize("name", STAGE2_YAMLS)
def test_stage2_optimiser_is_adamw_over_the_decoder_only(built, name):
    run = built(2, name)
    params = check_adamw(run.optimizer, RECIPE["stage2_lr"])
    trained = run.model.decoder if RECIPE["stage2_trains_decoder_only"] else run.model
    assert params == {id(p) for p in trained.parameters()}


@pytest.mark.parametrize("name", list(STAGE1_RUNS))
def test_stage1_scheduler_is_plateau_on_the_maximised_score(built, name):
    scheduler = built(1, name).scheduler
    assert type(scheduler) is RECIPE["stage1_scheduler"]
    assert scheduler.mode == RECIPE["plateau_mode"] and scheduler.factor == RECIPE["plateau_factor"]
    assert scheduler.patience == RECIPE["plateau_patience"] and scheduler.min_lrs == [RECIPE["plateau_min_lr"]]
    # §3 names only these four: the rest are the library defaults of the official call.
    assert (scheduler.threshold, scheduler.threshold_mode, scheduler.cooldown) == (1e-4, "rel", 0)


@pytest.mark.parametrize("name", STAGE2_YAMLS)
def test_stage2_scheduler_is_cosine_over_20_validations(built, name):
    run = built(2, name)
    scheduler = run.scheduler
    assert type(scheduler) is RECIPE["stage2_scheduler"]
    assert scheduler.T_max == RECIPE["cosine_t_max"] and scheduler.eta_min == RECIPE["cosine_eta_min"]
    assert scheduler.base_lrs == [RECIPE["stage2_lr"]] and scheduler.last_epoch == 0


@pytest.mark.parametrize("stage,name", [(1, n) for n in STAGE1_RUNS] + [(2, n) for n in STAGE2_YAMLS])
def test_batch_size_and_validation_cadence(built, stage, name):
    run = built(stage, name)
    assert run.batch_size == run.loader_args["batch_size"] == RECIPE["batch_size"]
    assert run.cfg.SOLVER.VAL_EVERY == RECIPE["val_every_samples"]
    assert run.val_interval == RECIPE["val_every_steps"]


@pytest.mark.parametrize("stage,name", ALL_RUNS)
def test_datasets_input_size_gt_ratio_and_mixture(built, stage, name):
    run = built(stage, name)
    train_set = training_dataset(run)
    assert train_set.mode == "train" and train_set.input_size == RECIPE["input_size"]
    assert train_set.gt_ratio == RECIPE["gt_ratio"]
    assert (train_set.augmenter is not None) is RECIPE["augment"]
    # Each list's images appear `repeat` times each (tests/built_objects.py names every row after its list).
    rows = train_set.rows
    stems = [path.split("/")[0] for path in rows.rows[:, 0]]
    per_epoch = {}
    for row in rows.index:
        per_epoch[stems[row]] = per_epoch.get(stems[row], 0) + 1
    unique = {}
    for stem in stems:
        unique[stem] = unique.get(stem, 0) + 1
    assert {stem: per_epoch[stem] / unique[stem] for stem in unique} == RECIPE["train_list_repeats"]


# ---- the loss as the step calls it -----------------------------------------------------------------------------------
def tiny_views(batch: int = 2, channels: int = 4):
    sizes = [(4, 4), (2, 2), (1, 1), (1, 1)]
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(batch, channels, h, w, generator=generator) for h, w in sizes]


def half_forged_mask(batch: int = 2) -> torch.Tensor:
    mask = torch.zeros(batch, 1, 4, 4)
    mask[:, :, :, 2:] = 1
    return mask


@pytest.mark.parametrize("name", list(STAGE1_RUNS))
def test_stage1_step_calls_the_loss_with_the_recipe_arguments(built, name, monkeypatch):
    import stage1.train

    run = built(1, name)
    real = stage1.train.multi_view_pixel_contrast
    calls = []

    def recorder(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(stage1.train, "multi_view_pixel_contrast", recorder)
    views = tiny_views()
    losses = run.hooks.train_step(lambda images: (views, views), {"image": torch.zeros(2, 3, 16, 16),
                                                                   "mask": half_forged_mask()})
    assert len(calls) == 1 and torch.isfinite(losses["total"])
    arguments = calls[0]
    assert arguments["max_samples"] == RECIPE["max_samples"]
    assert arguments["temperature"] == RECIPE["temperature"]
    assert arguments["weights"] == RECIPE["loss_weights"]
    assert arguments.get("positives", "own") == RECIPE["positives"]
    assert arguments.get("share_samples", False) is RECIPE["share_samples"]


@pytest.mark.parametrize("name", list(STAGE1_RUNS))
def test_stage1_trains_the_whole_model_on_two_views_of_the_same_batch(built, name, monkeypatch):
    run = built(1, name)
    run.hooks.set_train_mode(run.model)
    assert all(m.training for m in run.model.modules())  # §3: both passes in train mode (DropPath on, BN updating)
    seen = []
    monkeypatch.setattr(run.model, "forward", lambda images: seen.append(images) or len(seen))
    images = torch.zeros(1, 3, 8, 8)
    outputs = run.train_module(images)
    assert len(seen) == RECIPE["stage1_views"] and all(x is images for x in seen)
    assert list(outputs) == [1, 2]


def focal_by_hand(logits: list[float], target: list[float], alpha: float, gamma: float) -> float:
    """Mean of α_t (1 − p_t)^γ BCE over the pixels, written out (§4)."""
    total = 0.0
    for z, y in zip(logits, target):
        p = 1 / (1 + math.exp(-z))
        p_t = p * y + (1 - p) * (1 - y)
        alpha_t = alpha * y + (1 - alpha) * (1 - y)
        total += alpha_t * (1 - p_t) ** gamma * -math.log(p_t)
    return total / len(logits)


@pytest.mark.parametrize("name", list(STAGE2_RUNS))
def test_stage2_step_is_the_focal_loss_alpha_half_gamma_two(built, name):
    run = built(2, name)
    logits = [2.0, -1.0, 0.5, -3.0]
    target = [1.0, 0.0, 0.0, 1.0]
    batch = {"image": torch.zeros(1, 3, 8, 8), "mask": torch.tensor(target).view(1, 1, 2, 2)}
    losses = run.hooks.train_step(lambda images: torch.tensor(logits, dtype=torch.float64).view(1, 1, 2, 2), batch)
    expected = focal_by_hand(logits, target, RECIPE["focal_alpha"], RECIPE["focal_gamma"])
    assert float(losses["total"]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", list(STAGE2_RUNS))
def test_stage2_backbone_is_frozen_and_the_head_trains(built, name):
    run = built(2, name)
    frozen = RECIPE["stage2_backbone_frozen"]
    run.hooks.set_train_mode(run.model)
    assert all(m.training is not frozen for m in run.model.encoder.modules())
    assert all(p.requires_grad is not frozen for p in run.model.encoder.parameters())
    assert all(m.training for m in run.model.decoder.modules())
    assert all(p.requires_grad for p in run.model.decoder.parameters())

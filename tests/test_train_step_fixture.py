"""One official training step per stage (tests/fixtures/mpc_train_step.npz), reproduced by our real training code.

The fixture holds one stage-1 and one stage-2 step of the official code, recorded in float64 on HRT-B at 64² with
every DropPath rate 0 and the fixtures' deterministic weight fill (tests/fixtures/README.md). Here our models come
from the normal builders, are filled by the same rule, cast to float64 (`MODEL.DROP_PATH_RATE 0`), and take ONE step
through the trainer — `Trainer._train_step`, what `Trainer.fit` runs on every batch — with each stage's own parts:
stage 1's `TwoViews` and `loss_terms`, stage 2's `set_train_mode` and `head_step`, and the AdamW that
`build_optimizer` makes from the shipped faithful recipes (configs/stage{1,2}_hrt_base.yaml).

One thread (conftest's `one_thread`): on the small shared test machine a second thread made these float64 steps
several times slower, not faster.

Tolerances. Values are compared at 1e-9 relative: both sides compute in float64 and agree to about 1e-13, while each
unfaithful change these tests guard against (weight decay, BatchNorm momentum, a view in eval mode, the loss
temperature, a stage-2 backbone in the wrong mode) moves them by 1e-6 relative or far more. A gradient whose norm is
below 1e-6 × the largest gradient norm (the fixture README's rule) is rounding level: its true value is zero (biases
whose shift a following train-mode BatchNorm removes, the attention's key bias) and it holds 1e-17 × the largest or
less. Those are compared absolutely, against 1e-12 × the largest norm, and their AdamW update, a sign-like function
of that noise, is not compared (their values after the step are).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import build_stage1_model, build_stage2_model
from models.hrformer import DropPath
from official_fill import FIXTURES, fill_weights, load_filled, load_manifest, under_prefix
from stage1.train import TwoViews, loss_terms
from stage2.train import head_step, set_train_mode
from utils.config import load_config
from utils.training.builders import build_optimizer
from utils.training.engine import StageHooks, Trainer

REPO = Path(__file__).resolve().parents[1]
RELATIVE = 1e-9
ROUNDING_LEVEL = 1e-6  # × the largest gradient norm: below it a gradient is rounding noise (fixture README)
ZERO_UP_TO_ROUNDING = 1e-12  # × the largest gradient norm: the absolute bound for rounding-level gradients


# ---- helpers ----------------------------------------------------------------------------------------------------
def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def recorded_rows(tensor: torch.Tensor, reference: np.ndarray) -> np.ndarray:
    """Our tensor cut as the fixture stores it: tensors over 65,536 elements keep their first rows only."""
    values = tensor.detach().numpy()
    return values[:len(reference)] if reference.ndim else values


def faithful_config(recipe: str, *overrides: str):
    """A shipped faithful recipe with the recording's settings: no DropPath, the fixture's batch of 2."""
    return load_config(str(REPO / "configs" / recipe),
                       ["MODEL.DROP_PATH_RATE", "0.0", "SOLVER.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0", *overrides])


def no_validation(model) -> dict:
    raise AssertionError("one training step never validates")


def one_trainer_step(cfg, out_dir: Path, model, optimizer, hooks: StageHooks, batch: dict,
                     forward_module=None) -> dict:
    """ONE step of the project's trainer on `batch`: what `Trainer.fit` runs for each batch its loader yields."""
    # The constructor builds its sampler over a training set (and writes config.yaml): the batch's own items.
    stand_in = [{"image": image, "mask": mask} for image, mask in zip(batch["image"], batch["mask"])]
    trainer = Trainer(cfg, str(out_dir), model, optimizer, stand_in, hooks, torch.device("cpu"),
                      forward_module=forward_module)
    # As the recording did before each step; nothing random is drawn anyway (DropPath 0, every class set far under
    # the loss's sample cap, so its subsampling is only a permutation).
    torch.manual_seed(0)
    losses = trainer._train_step(batch)
    assert losses is not None, "the step was skipped as non-finite"
    return losses


def assert_no_drop_path(model: torch.nn.Module) -> None:
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and all(rate == 0.0 for rate in rates)


def rounding_level(reference_norms: np.ndarray) -> np.ndarray:
    return reference_norms <= ROUNDING_LEVEL * reference_norms.max()


# ---- the shared build ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded() -> dict:
    return dict(np.load(FIXTURES / "mpc_train_step.npz"))


@pytest.fixture(scope="module")
def batch(recorded) -> dict:
    return {"image": torch.from_numpy(recorded["input"]), "mask": torch.from_numpy(recorded["mask"])}


@pytest.fixture(scope="module")
def initial_weights() -> dict:
    """Both recordings' starting weights (float32, as the rule makes them), computed once: the backbone filled by
    the official stage-1 model's bare names (stage 2 starts from that same backbone), the head by its official
    `decoder.classifier.*` names."""
    manifest = load_manifest()
    backbone = fill_weights(under_prefix(manifest, "encoder."))
    head = fill_weights([e for e in manifest if e["key"].startswith("decoder.")])
    return {"backbone": backbone, "head": head}


@pytest.fixture(scope="module")
def stage1(one_thread, initial_weights, batch, tmp_path_factory):
    """Our stage-1 model after one step, and the step's losses."""
    cfg = faithful_config("stage1_hrt_base.yaml")
    model = build_stage1_model(cfg.MODEL.BACKBONE, drop_path_rate=cfg.MODEL.DROP_PATH_RATE, normalize=True)
    load_filled(model.encoder, initial_weights["backbone"])
    model = model.double()
    assert_no_drop_path(model)
    optimizer = build_optimizer(cfg, model.parameters())
    hooks = StageHooks(set_train_mode=lambda m: m.train(), train_step=loss_terms(cfg), validate=no_validation)
    losses = one_trainer_step(cfg, tmp_path_factory.mktemp("stage1"), model, optimizer, hooks, batch,
                              forward_module=TwoViews(model))
    return model, losses


@pytest.fixture(scope="module")
def stage2_model(one_thread, initial_weights):
    """Our stage-2 model with the recording's starting weights, its backbone frozen as stage2/train.py freezes it."""
    cfg = faithful_config("stage2_hrt_base.yaml")
    model = build_stage2_model(cfg.MODEL.BACKBONE, head=cfg.MODEL.HEAD, drop_path_rate=cfg.MODEL.DROP_PATH_RATE)
    weights = {"encoder." + name: value for name, value in initial_weights["backbone"].items()}
    load_filled(model, {**weights, **initial_weights["head"]})
    assert cfg.STAGE2.FREEZE_BACKBONE
    model.encoder.requires_grad_(False)
    model = model.double()
    assert_no_drop_path(model)
    return model


@pytest.fixture(scope="module")
def stage2_faithful(stage2_model, batch, tmp_path_factory):
    """One step with STAGE2.FAITHFUL_TRAIN_MODE True (the official backbone stays in train mode): the losses, and
    the head's gradients and state plus the backbone's first BN right after it (a later step replaces them)."""
    cfg = faithful_config("stage2_hrt_base.yaml", "STAGE2.FAITHFUL_TRAIN_MODE", "True")
    optimizer = build_optimizer(cfg, stage2_model.decoder.parameters())
    hooks = StageHooks(set_train_mode=set_train_mode(cfg), train_step=head_step(cfg), validate=no_validation)
    losses = one_trainer_step(cfg, tmp_path_factory.mktemp("stage2_faithful"), stage2_model, optimizer, hooks, batch)
    grads = {name: param.grad.clone() for name, param in stage2_model.named_parameters() if param.grad is not None}
    state = {name: value.clone() for name, value in stage2_model.state_dict().items()
             if name.startswith(("decoder.", "encoder.bn1."))}
    return losses, grads, state


# ---- stage 1 ------------------------------------------------------------------------------------------------------
def test_stage1_loss_equals_official(stage1, recorded):
    _, losses = stage1
    assert abs(losses["total"] - recorded["s1_loss"]) <= RELATIVE * abs(recorded["s1_loss"])


def test_stage1_every_gradient_norm_equals_official(stage1, recorded):
    model, _ = stage1
    names = [str(name) for name in recorded["s1_param_names"]]
    params = dict(model.encoder.named_parameters())
    assert list(params) == names  # the official backbone's parameters, one to one and in order
    reference = recorded["s1_grad_norm"]
    # a parameter the loss does not reach has no gradient: its norm is 0, as recorded
    ours = np.array([0.0 if params[name].grad is None else float(params[name].grad.norm()) for name in names])
    noise = rounding_level(reference)
    assert 1000 < (~noise).sum() < len(names)  # the README counts 1190 compared and 258 at rounding level
    for name, our_norm, reference_norm, is_noise in zip(names, ours, reference, noise):
        if is_noise:
            assert abs(our_norm - reference_norm) <= ZERO_UP_TO_ROUNDING * reference.max(), name
        else:
            assert abs(our_norm - reference_norm) <= RELATIVE * reference_norm, name


def test_stage1_update_norms_equal_official(stage1, recorded, initial_weights):
    """Every AdamW change (value after the step − the filled value) where the gradient is not rounding noise."""
    model, _ = stage1
    names = [str(name) for name in recorded["s1_param_names"]]
    params = dict(model.encoder.named_parameters())
    noise = rounding_level(recorded["s1_grad_norm"])
    for name, reference, is_noise in zip(names, recorded["s1_update_norm"], noise):
        if is_noise:
            continue
        update = params[name].detach() - initial_weights["backbone"][name].double()
        assert abs(float(update.norm()) - reference) <= RELATIVE * reference, name


def test_stage1_recorded_gradients_and_values_after_adamw_equal_official(stage1, recorded, initial_weights):
    model, _ = stage1
    params = dict(model.encoder.named_parameters())
    names = [key.removeprefix("s1_grad/") for key in recorded if key.startswith("s1_grad/")]
    assert len(names) == 18
    for name in names:
        param = params[name]
        assert relative_error(recorded_rows(param.grad, recorded[f"s1_grad/{name}"]),
                              recorded[f"s1_grad/{name}"]) <= RELATIVE, name
        after = recorded[f"s1_after/{name}"]
        before = recorded_rows(initial_weights["backbone"][name].double(), after)
        assert relative_error(recorded_rows(param, after), after) <= RELATIVE, name
        assert relative_error(recorded_rows(param, after) - before, after - before) <= RELATIVE, name


def test_stage1_batchnorm_running_statistics_equal_official(stage1, recorded):
    """Two train-mode passes per step: each BN's running statistics move twice."""
    model, _ = stage1
    state = model.encoder.state_dict()
    for layer in ("bn1", "convs.0.bn"):
        for stat in ("running_mean", "running_var"):
            reference = recorded[f"s1_after/{layer}.{stat}"]
            assert relative_error(state[f"{layer}.{stat}"], reference) <= RELATIVE, (layer, stat)
        assert int(state[f"{layer}.num_batches_tracked"]) == int(recorded[f"s1_after/{layer}.num_batches_tracked"]) == 2


# ---- stage 2 ------------------------------------------------------------------------------------------------------
def test_stage2_loss_equals_official(stage2_faithful, recorded):
    losses, _, _ = stage2_faithful
    assert abs(losses["total"] - recorded["s2_loss"]) <= RELATIVE * abs(recorded["s2_loss"])


def test_stage2_every_head_gradient_equals_official(stage2_faithful, recorded):
    _, grads, _ = stage2_faithful
    names = [str(name) for name in recorded["s2_head_names"]]
    assert sorted(grads) == sorted(names)  # the head alone is trained; the backbone has no gradient
    reference_norms = recorded["s2_head_grad_norm"]
    largest = reference_norms.max()
    noise = rounding_level(reference_norms)
    assert noise.sum() == 3  # decoder.classifier.{2,5,8}.bias feed a train-mode BN
    for name, reference_norm, is_noise in zip(names, reference_norms, noise):
        ours, reference = recorded_rows(grads[name], recorded[f"s2_grad/{name}"]), recorded[f"s2_grad/{name}"]
        if is_noise:
            assert np.linalg.norm(ours - reference) <= ZERO_UP_TO_ROUNDING * largest, name
        else:
            assert relative_error(ours, reference) <= RELATIVE, name
            assert abs(float(grads[name].norm()) - reference_norm) <= RELATIVE * reference_norm, name


def test_stage2_head_after_the_step_equals_official(stage2_faithful, recorded, initial_weights):
    _, _, state = stage2_faithful
    names = [str(name) for name in recorded["s2_head_names"]]
    noise = rounding_level(recorded["s2_head_grad_norm"])
    for name, reference_update_norm, is_noise in zip(names, recorded["s2_head_update_norm"], noise):
        after = recorded[f"s2_after/{name}"]
        assert relative_error(recorded_rows(state[name], after), after) <= RELATIVE, name
        if is_noise:
            continue
        update = state[name] - initial_weights["head"][name].double()
        before = recorded_rows(initial_weights["head"][name].double(), after)
        assert relative_error(recorded_rows(state[name], after) - before, after - before) <= RELATIVE, name
        assert abs(float(update.norm()) - reference_update_norm) <= RELATIVE * reference_update_norm, name


def test_stage2_faithful_mode_moves_backbone_statistics_as_official(stage2_faithful, recorded):
    """The official "frozen" backbone runs in train mode: its BN normalises with batch statistics and updates its
    running statistics once per step."""
    _, _, state = stage2_faithful
    for stat in ("running_mean", "running_var"):
        reference = recorded[f"s2_after/encoder.bn1.{stat}"]
        assert relative_error(state[f"encoder.bn1.{stat}"], reference) <= RELATIVE, stat
    assert int(state["encoder.bn1.num_batches_tracked"]) == int(recorded["s2_after/encoder.bn1.num_batches_tracked"]) == 1


def test_stage2_default_mode_leaves_backbone_statistics_alone(stage2_model, stage2_faithful, batch, tmp_path_factory):
    """Without FAITHFUL_TRAIN_MODE the backbone is truly frozen (eval mode): a step changes the head, nothing else.
    Runs on the model the faithful step left behind (stage2_faithful has kept what it compares)."""
    cfg = faithful_config("stage2_hrt_base.yaml")
    assert cfg.STAGE2.FREEZE_BACKBONE and not cfg.STAGE2.FAITHFUL_TRAIN_MODE
    backbone_before = {name: value.clone() for name, value in stage2_model.encoder.state_dict().items()}
    head_before = {name: value.clone() for name, value in stage2_model.decoder.state_dict().items()}
    optimizer = build_optimizer(cfg, stage2_model.decoder.parameters())
    hooks = StageHooks(set_train_mode=set_train_mode(cfg), train_step=head_step(cfg), validate=no_validation)
    one_trainer_step(cfg, tmp_path_factory.mktemp("stage2_default"), stage2_model, optimizer, hooks, batch)
    backbone_after = stage2_model.encoder.state_dict()
    moved = [name for name, value in backbone_before.items() if not torch.equal(value, backbone_after[name])]
    assert moved == []
    head_after = stage2_model.decoder.state_dict()
    assert any(not torch.equal(value, head_after[name]) for name, value in head_before.items())  # a step was taken

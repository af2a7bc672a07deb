"""Values that act only in train mode: BatchNorm momentum and eps (issue 15, group 3).

After one train-mode pass every BatchNorm's running statistics must equal the closed form
running = (1 − m)·old + m·batch statistic (the mean, and the unbiased variance) with the momentum m the spec gives
its kind, and its output must be the batch-normalised input with the spec's eps. The batch statistics are taken
from each layer's input, caught by a forward hook; the old statistics are set to random values first so that both
parts of the closed form count. hrt_nano at 64² has every kind of layer HRT-B has.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from built_objects import norm_kind
from models import build_stage1_model, build_stage2_model

# (momentum, eps) per kind, from docs/MPC_SPEC.md §2 (BatchNorm2d with momentum 0.1 everywhere; the output projections
# "BN (ε=1e-3, momentum=0.03)") and §4 (plain BN layers in the head); PyTorch's BatchNorm2d default eps is 1e-5.
BATCHNORM = {"stem": (0.1, 1e-5), "bottleneck": (0.1, 1e-5), "transformer_ffn": (0.1, 1e-5), "fusion": (0.1, 1e-5),
             "transition": (0.1, 1e-5), "projection": (0.03, 1e-3), "head": (0.1, 1e-5)}
INPUT = (2, 3, 64, 64)


def batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def randomise_running_statistics(model: nn.Module, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(seed)
    old = {}
    for name, bn in batchnorms(model).items():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=generator))
        old[name] = (bn.running_mean.double().clone(), bn.running_var.double().clone(), int(bn.num_batches_tracked))
    return old


def record_inputs_and_outputs(model: nn.Module) -> tuple[dict[str, list], list]:
    """Every BatchNorm's (input, output) of each call, in float64."""
    seen: dict[str, list] = {name: [] for name in batchnorms(model)}
    handles = []
    for name, bn in batchnorms(model).items():
        def hook(module, inputs, output, name=name):
            seen[name].append((inputs[0].detach().double().clone(), output.detach().double().clone()))
        handles.append(bn.register_forward_hook(hook))
    return seen, handles


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel: mean, unbiased variance (what the running variance tracks), biased variance (what normalises)."""
    values = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = values.mean(1)
    centred = values - mean[:, None]
    n = values.shape[1]
    return mean, (centred**2).sum(1) / (n - 1), (centred**2).sum(1) / n


def normalised_by_hand(x: torch.Tensor, bn: nn.BatchNorm2d, eps: float) -> torch.Tensor:
    mean, _, biased = batch_statistics(x)
    shape = (1, -1, 1, 1)
    scaled = (x - mean.view(shape)) / torch.sqrt(biased.view(shape) + eps)
    return scaled * bn.weight.detach().double().view(shape) + bn.bias.detach().double().view(shape)


def by_kind(names) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for name in names:
        kinds.setdefault(norm_kind(name), []).append(name)
    return kinds


@pytest.fixture(scope="module")
def stage2_pass(one_thread):
    """A stage-2 model (backbone + head) after one train-mode pass, what each BN saw, and the old statistics."""
    torch.manual_seed(0)
    model = build_stage2_model("hrt_nano", "catnet").train()
    for bn in batchnorms(model).values():  # non-trivial affine parameters, so the output check covers them too
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    old = randomise_running_statistics(model)
    seen, handles = record_inputs_and_outputs(model)
    with torch.no_grad():
        model(torch.rand(*INPUT, generator=torch.Generator().manual_seed(1)))
    for handle in handles:
        handle.remove()
    return model, old, seen


def test_every_kind_is_present_in_the_small_model(stage2_pass):
    model, _, _ = stage2_pass
    assert set(by_kind(batchnorms(model))) == set(BATCHNORM)


@pytest.mark.parametrize("kind", list(BATCHNORM))
def test_running_statistics_follow_the_closed_form_with_the_kind_momentum(stage2_pass, kind):
    model, old, seen = stage2_pass
    momentum, _ = BATCHNORM[kind]
    layers = batchnorms(model)
    for name in by_kind(layers)[kind]:
        bn = layers[name]
        ((x, _),) = seen[name]  # one call per layer and pass
        mean, unbiased, _ = batch_statistics(x)
        old_mean, old_var, old_count = old[name]
        torch.testing.assert_close(bn.running_mean.double(), (1 - momentum) * old_mean + momentum * mean,
                                   rtol=1e-5, atol=1e-6, msg=f"{name} running_mean")
        torch.testing.assert_close(bn.running_var.double(), (1 - momentum) * old_var + momentum * unbiased,
                                   rtol=1e-5, atol=1e-6, msg=f"{name} running_var")
        assert int(bn.num_batches_tracked) == old_count + 1, name


@pytest.mark.parametrize("kind", list(BATCHNORM))
def test_train_mode_output_is_normalised_with_the_kind_eps(stage2_pass, kind):
    model, _, seen = stage2_pass
    _, eps = BATCHNORM[kind]
    layers = batchnorms(model)
    for name in by_kind(layers)[kind]:
        ((x, y),) = seen[name]
        torch.testing.assert_close(y, normalised_by_hand(x, layers[name], eps), rtol=1e-4, atol=2e-5, msg=name)


def test_projection_eps_is_visible_in_the_output(stage2_pass):
    """The eps check above can tell 1e-3 from the default 1e-5 at the projections' inputs (else it guards nothing)."""
    model, _, seen = stage2_pass
    layers = batchnorms(model)
    for name in by_kind(layers)["projection"]:
        ((x, _),) = seen[name]
        gap = normalised_by_hand(x, layers[name], 1e-3) - normalised_by_hand(x, layers[name], 1e-5)
        assert float(gap.abs().max()) > 50 * 2e-5, name


def test_two_stage1_views_update_the_running_statistics_twice(one_thread):
    """docs/MPC_SPEC.md §2/§3: both views run in train mode, so each step moves the statistics twice:
    running = (1 − m)·((1 − m)·old + m·b₁) + m·b₂, b₁ and b₂ the two passes' batch statistics."""
    from stage1.train import TwoViews

    torch.manual_seed(0)
    model = build_stage1_model("hrt_nano", drop_path_rate=0.2).train()
    old = randomise_running_statistics(model, seed=1)
    seen, handles = record_inputs_and_outputs(model)
    with torch.no_grad():
        TwoViews(model)(torch.rand(*INPUT, generator=torch.Generator().manual_seed(2)))
    for handle in handles:
        handle.remove()
    layers = batchnorms(model)
    assert set(by_kind(layers)) == set(BATCHNORM) - {"head"}
    for name, bn in layers.items():
        momentum, _ = BATCHNORM[norm_kind(name)]
        (x1, _), (x2, _) = seen[name]
        (mean1, var1, _), (mean2, var2, _) = batch_statistics(x1), batch_statistics(x2)
        old_mean, old_var, old_count = old[name]
        expected_mean = (1 - momentum) * ((1 - momentum) * old_mean + momentum * mean1) + momentum * mean2
        expected_var = (1 - momentum) * ((1 - momentum) * old_var + momentum * var1) + momentum * var2
        torch.testing.assert_close(bn.running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(bn.running_var.double(), expected_var, rtol=1e-5, atol=1e-6, msg=name)
        assert int(bn.num_batches_tracked) == old_count + 2, name

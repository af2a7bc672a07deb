"""Stage-2 head losses: the official sigmoid focal loss and binary cross-entropy."""
import math
import re

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss

import losses

torch.set_num_threads(1)


def random_logits_and_target(batch=2, height=6, width=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, 1, height, width, generator=generator, dtype=torch.float64)).requires_grad_()
    target = (torch.rand(batch, height, width, generator=generator) < 0.3).float()
    return logits, target


@pytest.mark.parametrize("alpha, gamma", [(0.5, 2.0), (0.25, 2.0), (0.75, 1.0), (-1.0, 2.0)])
def test_focal_loss_matches_torchvision(alpha, gamma):
    logits, target = random_logits_and_target()
    ours = losses.sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma)
    reference = torchvision_focal_loss(logits, target.unsqueeze(1).double(), alpha=alpha, gamma=gamma,
                                       reduction="mean")
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-10, atol=1e-15)


def test_focal_loss_hand_worked_example():
    # Pixel 1: z = 0, y = 1 → p = 1/2, BCE = ln 2, p_t = 1/2, (1 − p_t)² = 1/4.
    # Pixel 2: z = ln 3, y = 0 → p = 3/4, BCE = −ln(1/4) = ln 4, p_t = 1/4, (1 − p_t)² = 9/16.
    # α_t = 1/2 for both; mean of the two.
    logits = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 2)
    expected = (0.5 * 0.25 * math.log(2.0) + 0.5 * (9 / 16) * math.log(4.0)) / 2
    assert losses.sigmoid_focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-12)


def test_focal_loss_is_finite_for_extreme_logits():
    logits = torch.tensor([-200.0, 200.0, -200.0, 200.0]).view(1, 1, 2, 2).requires_grad_()
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 2)
    loss = losses.sigmoid_focal_loss(logits, target)
    loss.backward()
    # Two confidently wrong pixels: BCE ≈ 200, (1 − p_t)² = 1, α_t = 1/2; two right ones give 0.
    assert loss.item() == pytest.approx(0.5 * 200 * 2 / 4, rel=1e-6)
    assert torch.all(torch.isfinite(logits.grad))


def test_target_layouts_and_nearest_resize():
    logits, target = random_logits_and_target(height=4, width=6)
    expected = losses.sigmoid_focal_loss(logits, target)
    assert losses.sigmoid_focal_loss(logits, target.unsqueeze(1)).item() == expected.item()
    assert losses.sigmoid_focal_loss(logits, target.bool()).item() == expected.item()
    # Each target pixel repeated 2×2: nearest downsizing by 2 picks the top-left copy, i.e. the original.
    doubled = target.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert losses.sigmoid_focal_loss(logits, doubled).item() == expected.item()
    assert losses.binary_cross_entropy(logits, doubled).item() == losses.binary_cross_entropy(logits, target).item()


def test_binary_cross_entropy_matches_formula():
    logits, target = random_logits_and_target()
    probability = torch.sigmoid(logits.squeeze(1))
    expected = -(target * torch.log(probability) + (1 - target) * torch.log(1 - probability)).mean()
    torch.testing.assert_close(losses.binary_cross_entropy(logits, target), expected, rtol=1e-10, atol=0)


def test_focal_loss_with_gamma_zero_is_half_the_cross_entropy():
    logits, target = random_logits_and_target(seed=3)
    focal = losses.sigmoid_focal_loss(logits, target, alpha=0.5, gamma=0.0)
    torch.testing.assert_close(focal, 0.5 * losses.binary_cross_entropy(logits, target), rtol=1e-12, atol=0)


def test_bfloat16_logits_are_computed_in_float32():
    logits, target = random_logits_and_target()
    loss = losses.sigmoid_focal_loss(logits.detach().bfloat16(), target)
    assert loss.dtype == torch.float32
    reference = losses.sigmoid_focal_loss(logits.detach().bfloat16().double(), target)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=0)


def test_build_head_loss():
    assert losses.build_head_loss("focal") is losses.sigmoid_focal_loss
    assert losses.build_head_loss("bce") is losses.binary_cross_entropy
    with pytest.raises(ValueError, match=re.escape("unknown head loss 'ce'")):
        losses.build_head_loss("ce")


def test_bad_shapes_are_named():
    logits, target = random_logits_and_target()
    with pytest.raises(ValueError, match="sigmoid_focal_loss: logits must be B×1×h×w"):
        losses.sigmoid_focal_loss(logits.squeeze(1), target)
    with pytest.raises(ValueError, match="binary_cross_entropy: target must be"):
        losses.binary_cross_entropy(logits, target[:1])
    with pytest.raises(ValueError, match="target must be"):
        losses.sigmoid_focal_loss(logits, torch.stack([target, target], dim=1))

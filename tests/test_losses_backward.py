"""The multi-view loss's hand-written forward and backward (losses/pixel_contrast.py).

The loss gathers and normalises its samples straight from the maps and computes its gradients by hand. Here
they are checked against finite differences (torch.autograd.gradcheck, float64) and against the previous
implementation's formulation rebuilt from plain autograd operations (`table_loss`: every pool pixel
normalised in one table, the samples gathered from it, exp of the logits shifted by 1/τ), in float64 and
float32, on every code path: own and "other" positives, shared and independent draws, zero and near-zero
rows, undefined calls, maps that need no gradient, mixed dtypes and backward under autocast.
"""
import pytest
import torch
import torch.nn.functional as F

import losses
from losses.pixel_contrast import _InfoNCE, _per_image_losses, _unit_rows_, _unit_rows_backward_
from losses.sampling import CONTRAST_PAIRS, POOLS, TERMS

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# The previous implementation's formulation, in plain autograd

def table_info_nce(anchors, negatives, temperature, keys=None):
    """ℓ(A, N) on unit rows as the previous implementation computed it: softplus(log Σ exp((s − 1)/τ) − (p − 1)/τ)."""
    count = anchors.shape[0] - 1 if keys is None else keys.shape[0]
    if negatives.shape[0] == 0 or anchors.shape[0] == 0 or count < 1:
        return anchors.sum() * 0.0
    if keys is None:
        positive = (anchors @ anchors.sum(0) - (anchors * anchors).sum(1)) / count
    else:
        positive = anchors @ keys.mean(0)
    negative_sum = torch.exp((anchors @ negatives.T - 1) / temperature).sum(1)
    return F.softplus(torch.log(negative_sum) - (positive - 1) / temperature).mean()


def table_loss(view1, view2, samples, temperature=0.1, positives="own", weights=None):
    """The previous implementation: one table of every pool pixel of every image as unit rows, then per call."""
    def flat(feature_map):
        return feature_map.flatten(2).transpose(1, 2)
    dtype = torch.promote_types(view1[0].dtype, torch.float32)
    pools = {"fine_view1": flat(view1[0]), "fine_view2": flat(view2[0]),
             "coarse_view1": torch.cat([flat(f) for f in view1[1:]], dim=1)}
    units = {name: F.normalize(pool.to(dtype), dim=2) for name, pool in pools.items()}
    batch = view1[0].shape[0]
    per_image = []
    for image in range(batch):
        anchor_sets = [units[pair.anchor_pool][image][samples.anchors[image][k]]
                       for k, pair in enumerate(CONTRAST_PAIRS)]
        calls = []
        for k, pair in enumerate(CONTRAST_PAIRS):
            negatives = units[pair.negative_pool][image][samples.negatives[image][k]]
            keys = anchor_sets[pair.partner] if positives == "other" and pair.partner is not None else None
            calls.append(table_info_nce(anchor_sets[k], negatives, temperature, keys))
        per_image.append(torch.stack(calls))
    per_image = torch.stack(per_image)
    weights = {**{term: 1.0 for term in TERMS}, **(weights or {})}
    result = {}
    for term in TERMS:
        columns = [k for k, pair in enumerate(CONTRAST_PAIRS) if pair.term == term]
        result[term] = per_image[:, columns].sum(1).mean()
    result["total"] = sum(weights[term] * result[term] for term in TERMS)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Inputs

def maps(batch=2, channels=5, height=8, width=8, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, channels, height >> s, width >> s, generator=generator, dtype=dtype)
             .requires_grad_() for s in range(4)] for _ in range(2)]


def mask(batch=2, height=8, width=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, height, width, generator=generator) < 0.35).float()


def used(view1, view2):
    return [*view1, view2[0]]


def grads_of(total, inputs):
    return torch.autograd.grad(total, inputs, allow_unused=True)


# ---------------------------------------------------------------------------------------------------------------
# Finite differences

@pytest.mark.parametrize("positives", ["own", "other"])
@pytest.mark.parametrize("share_samples", [False, True])
def test_multi_view_gradient_passes_gradcheck(positives, share_samples):
    view1, view2 = maps()
    labels = mask()
    samples = losses.sample_indices(labels, [tuple(f.shape[-2:]) for f in view1], max_samples=12,
                                    share_samples=share_samples, generator=torch.Generator().manual_seed(2))

    # gradcheck runs backward more than once per graph, which the loss refuses by default.
    def calls(*inputs):
        return _per_image_losses(inputs, samples, 0.2, positives, single_backward=False)

    assert torch.autograd.gradcheck(calls, tuple(used(view1, view2)), eps=1e-6, atol=1e-7, rtol=1e-5)
    # The public loss is the same Function (its value here; its gradient against the previous implementation
    # below).
    result = losses.multi_view_pixel_contrast(view1, view2, labels, temperature=0.2, positives=positives,
                                              indices=samples)
    per_image = calls(*used(view1, view2))
    for term in TERMS:
        columns = [k for k, pair in enumerate(CONTRAST_PAIRS) if pair.term == term]
        assert result[term].item() == per_image[:, columns].sum(1).mean().item()


@pytest.mark.parametrize("with_keys", [False, True])
def test_single_call_gradient_passes_gradcheck(with_keys):
    generator = torch.Generator().manual_seed(4)
    anchors = (torch.randn(9, 6, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    negatives = (torch.randn(7, 6, generator=generator, dtype=torch.float64) * 0.2).requires_grad_()
    keys = torch.randn(5, 6, generator=generator, dtype=torch.float64).requires_grad_()
    inputs = (anchors, negatives, keys) if with_keys else (anchors, negatives)

    def loss(*rows):
        return _InfoNCE.apply(0.07, rows[0], rows[1], rows[2] if with_keys else None, False)

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    public = losses.mean_positive_info_nce(anchors, negatives, 0.07, keys if with_keys else None)
    assert public.item() == loss(*inputs).item()


# ---------------------------------------------------------------------------------------------------------------
# Against the previous implementation

@pytest.mark.parametrize("positives", ["own", "other"])
@pytest.mark.parametrize("share_samples", [False, True])
def test_matches_the_previous_implementation_in_float64(positives, share_samples):
    view1, view2 = maps(batch=3, channels=16, height=16, width=24, seed=5)
    labels = mask(batch=3, height=16, width=24, seed=6)
    new = losses.multi_view_pixel_contrast(view1, view2, labels, max_samples=60, positives=positives,
                                           share_samples=share_samples, return_indices=True,
                                           generator=torch.Generator().manual_seed(7))
    old = table_loss(view1, view2, new["indices"], positives=positives)
    for name in (*TERMS, "total"):
        torch.testing.assert_close(new[name], old[name], rtol=1e-12, atol=1e-14)
    inputs = used(view1, view2)
    for new_grad, old_grad in zip(grads_of(new["total"], inputs), grads_of(old["total"], inputs)):
        torch.testing.assert_close(new_grad, old_grad, rtol=1e-10, atol=1e-13 * old_grad.abs().max().item())


def test_matches_the_previous_implementation_in_float32():
    # Bench-like data (post-ReLU features, a forged rectangle) at a smaller scale.
    generator = torch.Generator().manual_seed(8)
    view1, view2 = [[torch.relu(torch.randn(2, 64, 48 >> s, 48 >> s, generator=generator)).requires_grad_()
                     for s in range(4)] for _ in range(2)]
    labels = torch.zeros(2, 48, 48)
    labels[0, 10:30, 5:25] = 1
    labels[1, 20:40, 20:44] = 1
    new = losses.multi_view_pixel_contrast(view1, view2, labels, max_samples=1000, return_indices=True,
                                           generator=torch.Generator().manual_seed(9))
    old = table_loss(view1, view2, new["indices"])
    for name in (*TERMS, "total"):
        torch.testing.assert_close(new[name], old[name], rtol=2e-6, atol=0)
    inputs = used(view1, view2)
    for new_grad, old_grad in zip(grads_of(new["total"], inputs), grads_of(old["total"], inputs)):
        torch.testing.assert_close(new_grad, old_grad, rtol=1e-4, atol=1e-5 * old_grad.abs().max().item())


def test_zero_and_tiny_rows_get_normalize_gradients():
    # Rows under F.normalize's eps (1e-12) are divided by eps, not by their norm: the gradient there is g/eps.
    generator = torch.Generator().manual_seed(10)
    rows = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    rows[1] = 0.0
    rows[2] *= 1e-14
    rows[3] *= 1e-6
    grad = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    reference_rows = rows.clone().requires_grad_()
    units = F.normalize(reference_rows, dim=1)
    reference_grad, = torch.autograd.grad(units, reference_rows, grad)
    ours, divisors, small = _unit_rows_(rows.clone())
    torch.testing.assert_close(ours, units.detach(), rtol=1e-15, atol=0)
    assert small.view(-1).tolist() == [False, True, True, False, False, False]
    torch.testing.assert_close(_unit_rows_backward_(grad.clone(), ours, divisors, small), reference_grad,
                               rtol=1e-12, atol=0)


def test_zero_and_tiny_pixels_match_the_previous_implementation():
    view1, view2 = maps(batch=1, channels=6, height=16, width=24, seed=11)
    with torch.no_grad():
        for feature_map in used(view1, view2):
            feature_map[:, :, :2] = 0.0
            feature_map[:, :, 2:3] *= 1e-14
    labels = mask(batch=1, height=16, width=24, seed=12)
    new = losses.multi_view_pixel_contrast(view1, view2, labels, return_indices=True)
    old = table_loss(view1, view2, new["indices"])
    torch.testing.assert_close(new["total"], old["total"], rtol=1e-12, atol=0)
    inputs = used(view1, view2)
    for new_grad, old_grad in zip(grads_of(new["total"], inputs), grads_of(old["total"], inputs)):
        torch.testing.assert_close(new_grad, old_grad, rtol=1e-10, atol=1e-13 * old_grad.abs().max().item())


def test_undefined_calls_contribute_zero_and_no_gradient():
    # Image 0 has no forged pixel (all its calls are undefined), image 1 a single one.
    view1, view2 = maps(batch=2, channels=6, height=16, width=24, seed=13)
    labels = torch.zeros(2, 16, 24)
    labels[1, 3, 5] = 1
    new = losses.multi_view_pixel_contrast(view1, view2, labels, return_indices=True)
    old = table_loss(view1, view2, new["indices"])
    torch.testing.assert_close(new["total"], old["total"], rtol=1e-12, atol=0)
    inputs = used(view1, view2)
    new_grads = grads_of(new["total"], inputs)
    for new_grad, old_grad in zip(new_grads, grads_of(old["total"], inputs)):
        torch.testing.assert_close(new_grad, old_grad, rtol=1e-10, atol=1e-13 * old_grad.abs().max().item())
    assert all(torch.all(g[0] == 0) for g in new_grads)


def test_maps_that_need_no_gradient_get_none():
    view1, view2 = maps(seed=14)
    labels = mask(seed=15)
    full = losses.multi_view_pixel_contrast(view1, view2, labels, return_indices=True)
    full_grads = grads_of(full["total"], used(view1, view2))
    frozen = [view1[0], view1[1].detach(), view1[2], view1[3].detach()]
    partial = losses.multi_view_pixel_contrast(frozen, [view2[0].detach(), *view2[1:]], labels,
                                               indices=full["indices"])
    assert partial["total"].item() == full["total"].item()
    partial["total"].backward()
    for feature_map, expected in ((view1[0], full_grads[0]), (view1[2], full_grads[2])):
        torch.testing.assert_close(feature_map.grad, expected, rtol=0, atol=0)
    assert view1[1].grad is None and view1[3].grad is None and view2[0].grad is None


def test_mixed_dtypes_get_gradients_in_their_own_dtype():
    view1, view2 = maps(seed=16)
    mixed = [view1[0], *[f.detach().float().requires_grad_() for f in view1[1:]]]
    labels = mask(seed=17)
    result = losses.multi_view_pixel_contrast(mixed, view2, labels, return_indices=True)
    result["total"].backward()
    assert result["total"].dtype == torch.float64
    assert [f.grad.dtype for f in mixed] == [torch.float64] + [torch.float32] * 3
    widened = [[f.detach().double().requires_grad_() for f in view] for view in (mixed, view2)]
    reference = table_loss(*widened, result["indices"])
    reference["total"].backward()
    for feature_map, widened_map in zip(mixed, widened[0]):
        torch.testing.assert_close(feature_map.grad.double(), widened_map.grad, rtol=1e-6,
                                   atol=1e-7 * widened_map.grad.abs().max().item())


def test_backward_inside_autocast_is_computed_in_float32():
    view1, view2 = maps(dtype=torch.float32, seed=18)
    labels = mask(seed=19)
    plain = losses.multi_view_pixel_contrast(view1, view2, labels, return_indices=True)
    plain_grads = grads_of(plain["total"], used(view1, view2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = losses.multi_view_pixel_contrast(view1, view2, labels, indices=plain["indices"])
        autocast_grads = grads_of(result["total"], used(view1, view2))
    for autocast_grad, plain_grad in zip(autocast_grads, plain_grads):
        assert autocast_grad.dtype == torch.float32
        torch.testing.assert_close(autocast_grad, plain_grad, rtol=1e-6, atol=1e-7)


def test_shared_draws_are_gathered_once():
    view1, _ = maps(seed=20)
    labels = mask(seed=21)
    sizes = {"fine_view1": 64, "fine_view2": 64, "coarse_view1": 16 + 4 + 1}
    for share_samples in (False, True):
        samples = losses.sample_indices(labels, [tuple(f.shape[-2:]) for f in view1], max_samples=10,
                                        share_samples=share_samples)
        gathers, blocks = losses.pixel_contrast._gather_plan(samples, sizes, torch.device("cpu"))
        # One gather per image and pool, back to back, each covering its pool's distinct sets once.
        assert [(image, pool) for image, pool, _, _ in gathers] == [(i, p) for i in range(2) for p in POOLS]
        assert [start for _, _, _, start in gathers] == [0] + list(
            torch.tensor([p.numel() for _, _, p, _ in gathers]).cumsum(0)[:-1].tolist())
        where = {(image, pool): (positions, start) for image, pool, positions, start in gathers}
        for image in range(2):
            distinct = {pool: {} for pool in POOLS}
            for k, pair in enumerate(CONTRAST_PAIRS):
                for role, pool in (("anchors", pair.anchor_pool), ("negatives", pair.negative_pool)):
                    drawn = getattr(samples, role)[image][k]
                    positions, offset = where[image, pool]
                    start, stop = blocks[image][k][role]
                    assert torch.equal(positions[start - offset:stop - offset], drawn)
                    distinct[pool][id(drawn)] = drawn.numel()
            for pool in POOLS:
                assert where[image, pool][0].numel() == sum(distinct[pool].values())
            if share_samples:  # A¹₁ of calls 0, 1, 3 and F¹₁ of calls 0, 2, 4 are one set each
                assert len(distinct["fine_view1"]) == 2
            else:
                assert len(distinct["fine_view1"]) == 6

"""The multi-view pixel-contrastive loss: official values, a naive re-computation, sampling, edge cases."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses
from losses.sampling import CONTRAST_PAIRS

torch.set_num_threads(1)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mpc_reference.npz"
TERMS = ("within_image", "cross_scale", "cross_modality")

# The five InfoNCE calls as docs/MPC_SPEC.md §3 lists them: (term, anchor pool, negative pool, partner call).
SPEC_CALLS = (
    ("within_image", "fine_view1", "fine_view1", None),
    ("cross_scale", "fine_view1", "coarse_view1", 2),
    ("cross_scale", "coarse_view1", "fine_view1", 1),
    ("cross_modality", "fine_view1", "fine_view2", 4),
    ("cross_modality", "fine_view2", "fine_view1", 3),
)


# ---------------------------------------------------------------------------------------------------------------
# Naive reference: per image, per call, the n×n anchor matrix with its diagonal removed, as the spec describes it.

def naive_info_nce(anchors, negatives, temperature, positive_keys=None):
    anchors, negatives = F.normalize(anchors, dim=1), F.normalize(negatives, dim=1)
    n = anchors.shape[0]
    if negatives.shape[0] == 0:
        return torch.zeros((), dtype=anchors.dtype)
    if positive_keys is None:
        if n < 2:
            return torch.zeros((), dtype=anchors.dtype)
        similarity = anchors @ anchors.T
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        positive = similarity[off_diagonal].view(n, n - 1).mean(1, keepdim=True)
    else:
        if n == 0 or positive_keys.shape[0] == 0:
            return torch.zeros((), dtype=anchors.dtype)
        positive = (anchors @ F.normalize(positive_keys, dim=1).T).mean(1, keepdim=True)
    logits = torch.cat([positive, anchors @ negatives.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))


def naive_pools(view1, view2, image):
    """(pixels, C) rows of one image's three pools, built directly from the maps."""
    def rows(feature_map):
        return feature_map[image].reshape(feature_map.shape[1], -1).T
    return {
        "fine_view1": rows(view1[0]),
        "fine_view2": rows(view2[0]),
        "coarse_view1": torch.cat([rows(f) for f in view1[1:]]),
    }


def naive_loss(view1, view2, samples, temperature=0.1, weights=None, positives="own"):
    weights = {**{term: 1.0 for term in TERMS}, **(weights or {})}
    batch = view1[0].shape[0]
    per_term = {term: [] for term in TERMS}
    for image in range(batch):
        pools = naive_pools(view1, view2, image)
        anchor_sets = [pools[a][samples.anchors[image][k]] for k, (_, a, _, _) in enumerate(SPEC_CALLS)]
        image_terms = {term: torch.zeros((), dtype=view1[0].dtype) for term in TERMS}
        for k, (term, _, negative_pool, partner) in enumerate(SPEC_CALLS):
            negatives = pools[negative_pool][samples.negatives[image][k]]
            keys = anchor_sets[partner] if positives == "other" and partner is not None else None
            image_terms[term] = image_terms[term] + naive_info_nce(anchor_sets[k], negatives, temperature, keys)
        for term in TERMS:
            per_term[term].append(image_terms[term])
    result = {term: torch.stack(values).mean() for term, values in per_term.items()}
    result["total"] = sum(weights[term] * result[term] for term in TERMS)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Inputs

def random_views(batch=3, channels=12, height=16, width=24, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    views = []
    for _ in range(2):
        views.append([torch.randn(batch, channels, height >> s, width >> s, generator=generator, dtype=dtype)
                      .requires_grad_() for s in range(4)])
    return views


def random_mask(batch=3, height=16, width=24, forged_fractions=(0.3, 0.5, 0.1), seed=1):
    generator = torch.Generator().manual_seed(seed)
    fractions = torch.tensor(forged_fractions[:batch]).view(-1, 1, 1)
    return (torch.rand(batch, height, width, generator=generator) < fractions).float()


def used_maps(view1, view2):
    """The maps the loss reads: all scales of view 1, only scale 1 of view 2 (docs/MPC_SPEC.md §3)."""
    return [*view1, view2[0]]


def fixture_inputs(dtype):
    data = np.load(FIXTURE)
    views = [[torch.from_numpy(data[f"loss_view{v}_scale{s}"]).permute(2, 0, 1)[None].to(dtype)
              for s in range(4)] for v in (1, 2)]
    return views, torch.from_numpy(data["loss_mask"])[None], data


# ---------------------------------------------------------------------------------------------------------------
# Exact

def test_spec_calls_are_the_implemented_calls():
    # The naive reference indexes samples by this order; it must be the library's.
    assert [(p.term, p.anchor_pool, p.negative_pool, p.partner) for p in CONTRAST_PAIRS] == list(SPEC_CALLS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixture_matches_official_values(dtype):
    (view1, view2), mask, data = fixture_inputs(dtype)
    result = losses.multi_view_pixel_contrast(view1, view2, mask, generator=torch.Generator().manual_seed(0))
    for name in (*TERMS, "total"):
        expected = float(data[f"loss_{name}"])
        assert abs(result[name].item() - expected) <= 1e-5 * abs(expected), name


def test_fixture_coarse_masks_are_nearest_subsampling():
    # 24×40 → 12×20, 6×10, 3×5: nearest interpolation by 2, 4, 8 picks every 2nd, 4th, 8th pixel.
    (view1, _), mask, _ = fixture_inputs(torch.float32)
    masks = losses.sampling.scale_masks(mask, [tuple(f.shape[-2:]) for f in view1])
    for step, coarse in zip((2, 4, 8), masks[1:]):
        assert torch.equal(coarse, mask[:, ::step, ::step])


@pytest.mark.parametrize("positives", ["own", "other"])
@pytest.mark.parametrize("share_samples", [False, True])
def test_matches_naive_reference_values_and_gradients(positives, share_samples):
    view1, view2 = random_views()
    mask = random_mask()
    weights = {"within_image": 0.5, "cross_scale": 2.0, "cross_modality": 1.5}
    fast = losses.multi_view_pixel_contrast(
        view1, view2, mask, max_samples=50, weights=weights, positives=positives, share_samples=share_samples,
        generator=torch.Generator().manual_seed(3), return_indices=True)
    samples = fast["indices"]
    assert any(s.numel() == 50 for image in samples.anchors for s in image)  # the cap is exercised
    naive = naive_loss(view1, view2, samples, weights=weights, positives=positives)
    for name in (*TERMS, "total"):
        torch.testing.assert_close(fast[name], naive[name], rtol=1e-10, atol=1e-12)
    inputs = used_maps(view1, view2)
    fast_grads = torch.autograd.grad(fast["total"], inputs)
    naive_grads = torch.autograd.grad(naive["total"], inputs)
    for fast_grad, naive_grad in zip(fast_grads, naive_grads):
        torch.testing.assert_close(fast_grad, naive_grad, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in fast_grads)


@pytest.mark.parametrize("temperature", [0.03, 0.07, 1.0])
def test_base_loss_matches_naive_at_other_temperatures(temperature):
    generator = torch.Generator().manual_seed(5)
    # Rows of very different norms: the loss normalises them itself.
    anchors = (torch.randn(40, 8, generator=generator, dtype=torch.float64) * 50).requires_grad_()
    negatives = (torch.randn(30, 8, generator=generator, dtype=torch.float64) * 0.01).requires_grad_()
    keys = torch.randn(20, 8, generator=generator, dtype=torch.float64).requires_grad_()
    for positive_keys in (None, keys):
        fast = losses.mean_positive_info_nce(anchors, negatives, temperature, positive_keys)
        naive = naive_info_nce(anchors, negatives, temperature, positive_keys)
        torch.testing.assert_close(fast, naive, rtol=1e-10, atol=0)
        inputs = (anchors, negatives) if positive_keys is None else (anchors, negatives, keys)
        for fast_grad, naive_grad in zip(torch.autograd.grad(fast, inputs), torch.autograd.grad(naive, inputs)):
            # Round-off grows like 1/τ; 1e-9 of the largest gradient is still far below any real error.
            torch.testing.assert_close(fast_grad, naive_grad, rtol=1e-7, atol=1e-9 * naive_grad.abs().max().item())


def test_float32_is_accurate_at_the_smallest_temperature():
    # Dissimilar anchors and negatives at τ = 0.03: the shifted logits reach −2/τ, where exp is still normal.
    generator = torch.Generator().manual_seed(6)
    anchors = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    negatives = -anchors[:30] + 0.01 * torch.randn(30, 16, generator=generator, dtype=torch.float64)
    fast = losses.mean_positive_info_nce(anchors.float(), negatives.float(), 0.03)
    torch.testing.assert_close(fast.double(), naive_info_nce(anchors, negatives, 0.03), rtol=1e-5, atol=0)


def test_second_backward_through_the_same_graph_is_refused():
    # The anchor–negative matrix is turned into its gradient in place; autograd's version check must catch reuse.
    view1, view2 = random_views(batch=1, dtype=torch.float32)
    result = losses.multi_view_pixel_contrast(view1, view2, random_mask(batch=1), max_samples=50)
    result["total"].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        result["total"].backward()


def test_float32_matches_naive_float64():
    view1, view2 = random_views()
    mask = random_mask()
    fast = losses.multi_view_pixel_contrast([v.float() for v in view1], [v.float() for v in view2], mask,
                                            max_samples=50, return_indices=True)
    naive = naive_loss(view1, view2, fast["indices"])
    assert fast["total"].dtype == torch.float32
    torch.testing.assert_close(fast["total"].double(), naive["total"], rtol=1e-5, atol=0)


def test_passing_indices_back_reproduces_the_loss():
    view1, view2 = random_views()
    mask = random_mask()
    first = losses.multi_view_pixel_contrast(view1, view2, mask, max_samples=40, return_indices=True)
    again = losses.multi_view_pixel_contrast(view1, view2, mask, max_samples=40, indices=first["indices"])
    assert again["total"].item() == first["total"].item()


def test_embeddings_are_normalised_inside():
    view1, view2 = random_views(seed=4)
    mask = random_mask()
    generator = torch.Generator().manual_seed(0)
    scales = [torch.rand(f.shape[0], 1, *f.shape[2:], generator=generator, dtype=f.dtype) + 0.5 for f in view1]
    plain = losses.multi_view_pixel_contrast(view1, view2, mask, max_samples=30, return_indices=True)
    scaled = losses.multi_view_pixel_contrast([f * s for f, s in zip(view1, scales)],
                                              [f * s for f, s in zip(view2, scales)], mask,
                                              indices=plain["indices"])
    torch.testing.assert_close(scaled["total"], plain["total"], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Sampling

def labels_per_pool(mask, image):
    """Independent labels: the coarse scales of a 16×24 mask by striding (nearest for factors 2, 4, 8)."""
    fine = mask[image].flatten()
    coarse = torch.cat([mask[image, ::step, ::step].flatten() for step in (2, 4, 8)])
    return {"fine_view1": fine, "fine_view2": fine, "coarse_view1": coarse}


@pytest.mark.parametrize("share_samples", [False, True])
def test_samples_lie_in_their_class_without_repeats(share_samples):
    mask = random_mask()
    samples = losses.sample_indices(mask, [(16, 24), (8, 12), (4, 6), (2, 3)], max_samples=50,
                                    share_samples=share_samples, generator=torch.Generator().manual_seed(0))
    for image in range(mask.shape[0]):
        labels = labels_per_pool(mask, image)
        for k, (_, anchor_pool, negative_pool, _) in enumerate(SPEC_CALLS):
            for positions, pool, label in ((samples.anchors[image][k], anchor_pool, 0),
                                           (samples.negatives[image][k], negative_pool, 1)):
                assert positions.dtype == torch.int64
                assert positions.unique().numel() == positions.numel()
                assert torch.all(labels[pool][positions] == label)
                assert positions.numel() == min(50, int((labels[pool] == label).sum()))


def test_sets_under_the_cap_are_taken_whole():
    mask = random_mask()
    samples = losses.sample_indices(mask, [(16, 24), (8, 12), (4, 6), (2, 3)], max_samples=10_000)
    for image in range(mask.shape[0]):
        labels = labels_per_pool(mask, image)
        for k, (_, anchor_pool, _, _) in enumerate(SPEC_CALLS):
            expected = torch.nonzero(labels[anchor_pool] == 0).flatten()
            assert torch.equal(samples.anchors[image][k].sort().values, expected)


def test_share_samples_reuses_one_draw_per_set():
    mask = random_mask()
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    shared = losses.sample_indices(mask, sizes, max_samples=20, share_samples=True)
    independent = losses.sample_indices(mask, sizes, max_samples=20, share_samples=False)
    for image in range(mask.shape[0]):
        # A¹₁ is the anchor set of calls 0, 1, 3; F¹₁ the negative set of calls 0, 2, 4.
        for role, calls in (("anchors", (0, 1, 3)), ("negatives", (0, 2, 4))):
            drawn = getattr(shared, role)[image]
            assert all(torch.equal(drawn[calls[0]], drawn[k]) for k in calls[1:])
            drawn = getattr(independent, role)[image]
            assert not all(torch.equal(drawn[calls[0]], drawn[k]) for k in calls[1:])


def test_generator_makes_sampling_reproducible():
    mask = random_mask()
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    first, second, other = (losses.sample_indices(mask, sizes, 20, generator=torch.Generator().manual_seed(seed))
                            for seed in (7, 7, 8))
    assert all(torch.equal(a, b) for ia, ib in zip(first.anchors, second.anchors) for a, b in zip(ia, ib))
    assert not all(torch.equal(a, b) for ia, ib in zip(first.anchors, other.anchors) for a, b in zip(ia, ib))


def test_bool_mask_equals_float_mask():
    view1, view2 = random_views()
    mask = random_mask()
    as_float = losses.multi_view_pixel_contrast(view1, view2, mask, max_samples=30,
                                                generator=torch.Generator().manual_seed(1))
    as_bool = losses.multi_view_pixel_contrast(view1, view2, mask.bool(), max_samples=30,
                                               generator=torch.Generator().manual_seed(1))
    assert as_bool["total"].item() == as_float["total"].item()


# ---------------------------------------------------------------------------------------------------------------
# Safe

def loss_and_gradients(mask, dtype=torch.float32, **kwargs):
    view1, view2 = random_views(batch=mask.shape[0], dtype=dtype)
    result = losses.multi_view_pixel_contrast(view1, view2, mask, max_samples=50, return_indices=True, **kwargs)
    result["total"].backward()
    return result, view1, view2


@pytest.mark.parametrize("positives", ["own", "other"])
def test_authentic_and_all_forged_images_give_zero(positives):
    mask = torch.stack([torch.zeros(16, 24), torch.ones(16, 24)])
    result, view1, view2 = loss_and_gradients(mask, positives=positives)
    for name in (*TERMS, "total"):
        assert result[name].item() == 0.0
    for feature_map in used_maps(view1, view2):
        assert feature_map.grad is not None and torch.all(feature_map.grad == 0)


@pytest.mark.parametrize("positives", ["own", "other"])
def test_single_authentic_pixel_is_skipped_not_nan(positives):
    # One authentic pixel at scale 1, at (1, 1) so that nearest interpolation (even rows and columns) leaves none
    # at the coarser scales: the official code averages over an empty set there and returns NaN.
    mask = torch.ones(2, 16, 24)
    mask[:, 1, 1] = 0
    mask[1] = random_mask(batch=1)[0]  # a normal image beside it keeps the batch mean meaningful
    result, view1, view2 = loss_and_gradients(mask, dtype=torch.float64, positives=positives)
    naive = naive_loss(view1, view2, result["indices"], positives=positives)
    for name in (*TERMS, "total"):
        assert torch.isfinite(result[name])
        torch.testing.assert_close(result[name], naive[name], rtol=1e-10, atol=1e-12)
    for feature_map in used_maps(view1, view2):
        assert torch.all(torch.isfinite(feature_map.grad))
    if positives == "own":
        # Every call of image 0 is skipped, so the batch mean is half of image 1's loss. (With "other" positives
        # the cross-modality calls of image 0 stay defined: one anchor, one partner anchor.)
        alone = losses.multi_view_pixel_contrast([f[1:] for f in view1], [f[1:] for f in view2], mask[1:],
                                                 indices=losses.PixelSamples(result["indices"].anchors[1:],
                                                                             result["indices"].negatives[1:]))
        torch.testing.assert_close(result["total"], alone["total"] / 2)


def test_single_forged_pixel_is_finite():
    mask = torch.zeros(1, 16, 24)
    mask[0, 5, 7] = 1
    result, view1, view2 = loss_and_gradients(mask)
    assert torch.isfinite(result["total"]) and result["total"] > 0
    assert all(torch.all(torch.isfinite(f.grad)) for f in used_maps(view1, view2))


def test_zero_embeddings_are_finite():
    # ReLU features can be all-zero at a pixel; normalising them must not divide by zero.
    view1, view2 = random_views(batch=1, dtype=torch.float32)
    with torch.no_grad():
        for feature_map in used_maps(view1, view2):
            feature_map[:, :, :2] = 0
    mask = random_mask(batch=1)
    result = losses.multi_view_pixel_contrast(view1, view2, mask, max_samples=1000)
    result["total"].backward()
    assert torch.isfinite(result["total"])
    assert all(torch.all(torch.isfinite(f.grad)) for f in used_maps(view1, view2))


def test_float32_input_under_bfloat16_autocast_is_unchanged():
    view1, view2 = random_views(dtype=torch.float32)
    mask = random_mask()
    plain = losses.multi_view_pixel_contrast(view1, view2, mask, max_samples=50, return_indices=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = losses.multi_view_pixel_contrast(view1, view2, mask, indices=plain["indices"])
    assert autocast["total"].dtype == torch.float32
    torch.testing.assert_close(autocast["total"], plain["total"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_finite_and_computed_in_float32(dtype):
    view1, view2 = random_views(dtype=dtype)
    mask = random_mask()
    with torch.autocast("cpu", dtype=dtype):
        result = losses.multi_view_pixel_contrast(view1, view2, mask, max_samples=50, return_indices=True)
    result["total"].backward()
    assert result["total"].dtype == torch.float32 and torch.isfinite(result["total"])
    assert all(torch.all(torch.isfinite(f.grad)) for f in used_maps(view1, view2))
    exact = naive_loss([f.detach().double() for f in view1], [f.detach().double() for f in view2],
                       result["indices"])
    torch.testing.assert_close(result["total"].double(), exact["total"], rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input

def test_bad_input_is_named():
    view1, view2 = random_views(batch=2)
    mask = random_mask(batch=2)
    cases = [
        (dict(mask=mask[:, :8]), "mask has shape"),
        (dict(mask=mask * 0.5), "only 0 (authentic) and 1 (forged)"),
        (dict(view1=view1[:3]), "view1 must hold 4 scale maps"),
        (dict(view2=[f[:, :4] for f in view2]), "view2[0] has batch×channels"),
        (dict(positives="figure"), "positives must be one of"),
        (dict(weights={"intra": 1.0}), "unknown term weights"),
        (dict(max_samples=0), "max_samples must be >= 1"),
        (dict(temperature=0.01), "temperature must be >= 0.03"),
    ]
    for overrides, message in cases:
        arguments = {"view1": view1, "view2": view2, "mask": mask, **overrides}
        with pytest.raises(ValueError, match=re.escape(message)):
            losses.multi_view_pixel_contrast(**arguments)


def test_foreign_indices_are_rejected():
    view1, view2 = random_views(batch=2)
    mask = random_mask(batch=2)
    samples = losses.multi_view_pixel_contrast(view1, view2, mask, return_indices=True)["indices"]
    with pytest.raises(ValueError, match="indices are for 2 images"):
        losses.multi_view_pixel_contrast([f[:1] for f in view1], [f[:1] for f in view2], mask[:1], indices=samples)
    small = [[f[:, :, :8, :8] for f in view] for view in (view1, view2)]
    with pytest.raises(ValueError, match="reach outside"):
        losses.multi_view_pixel_contrast(small[0], [f.clone() for f in small[1]], mask[:, :8, :8], indices=samples)

"""Edges of the losses that mutation testing found unguarded: the spec's defaults (K = 5000, τ = 0.1, independent
draws), exact boundaries, compute dtypes, and error messages that name what is wrong.

Every expected value is hand-worked or taken from MPC_SPEC; see docs/DEVELOPMENT.md for the mutation run."""
import math
import re

import pytest
import torch

import losses
from losses.pixel_contrast import mean_positive_info_nce
from losses.sampling import PixelSamples

torch.set_num_threads(1)

# A 1×80×80 mask with a 10×10 forged block: 6300 authentic scale-1 pixels, more than the spec's cap K = 5000.
BIG = 80
BIG_SIZES = [(BIG, BIG), (BIG // 2, BIG // 2), (BIG // 4, BIG // 4), (BIG // 8, BIG // 8)]
SPEC_CAP = 5000
SMALL_SIZES = [(8, 8), (4, 4), (2, 2), (1, 1)]
# Calls 0, 1 and 3 of the spec's five all draw their anchors from the authentic scale-1 pixels of view 1.
FINE_VIEW1_ANCHOR_CALLS = (0, 1, 3)


def big_mask():
    mask = torch.zeros(1, BIG, BIG)
    mask[0, 30:40, 30:40] = 1
    return mask


def small_mask(batch=2):
    mask = torch.zeros(batch, 8, 8)
    mask[:, 2:6, 2:6] = 1
    return mask


def views(sizes, batch, channels=3, dtypes=(torch.float32,) * 4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    view1 = [torch.randn(batch, channels, h, w, generator=generator).to(dtype) for (h, w), dtype in zip(sizes, dtypes)]
    view2 = [torch.randn(batch, channels, h, w, generator=generator).to(dtypes[0]) for h, w in sizes]
    return view1, view2


# ---------------------------------------------------------------------------------------------------------- defaults

def test_default_cap_is_the_spec_5000_samples():
    mask = big_mask()
    samples = losses.sample_indices(mask, BIG_SIZES, generator=torch.Generator().manual_seed(0))
    assert samples.anchors[0][0].numel() == SPEC_CAP  # 6300 candidates
    assert samples.negatives[0][0].numel() == 100  # all 100 forged pixels: under the cap
    view1, view2 = views(BIG_SIZES, batch=1, channels=2)
    result = losses.multi_view_pixel_contrast(view1, view2, mask, return_indices=True,
                                              generator=torch.Generator().manual_seed(0))
    assert result["indices"].anchors[0][0].numel() == SPEC_CAP


def test_default_draws_every_call_independently():
    mask = big_mask()
    samples = losses.sample_indices(mask, BIG_SIZES, generator=torch.Generator().manual_seed(0))
    first, second, fourth = (samples.anchors[0][k] for k in FINE_VIEW1_ANCHOR_CALLS)
    assert not torch.equal(first, second) and not torch.equal(first, fourth)
    view1, view2 = views(BIG_SIZES, batch=1, channels=2)
    drawn = losses.multi_view_pixel_contrast(view1, view2, mask, return_indices=True,
                                             generator=torch.Generator().manual_seed(0))["indices"]
    assert not torch.equal(drawn.anchors[0][0], drawn.anchors[0][1])


def test_share_samples_reaches_the_sampler():
    view1, view2 = views(BIG_SIZES, batch=1, channels=2)
    drawn = losses.multi_view_pixel_contrast(view1, view2, big_mask(), share_samples=True, return_indices=True,
                                             generator=torch.Generator().manual_seed(0))["indices"]
    first = drawn.anchors[0][0]
    assert first.numel() == SPEC_CAP
    assert all(torch.equal(first, drawn.anchors[0][k]) for k in FINE_VIEW1_ANCHOR_CALLS)


def test_indices_are_returned_only_on_request():
    view1, view2 = views(SMALL_SIZES, batch=2)
    result = losses.multi_view_pixel_contrast(view1, view2, small_mask())
    assert set(result) == {"within_image", "cross_scale", "cross_modality", "total"}


def test_default_temperature_is_the_spec_0_1():
    # Two identical anchors (1, 0): each one's positive is ⟨a1, a2⟩ = 1; the negative (0, 1) scores 0.
    # ℓ = −log(e^{1/τ} / (e^{1/τ} + e^0)) = log(1 + e^{−1/τ}) = log(1 + e^{−10}) at τ = 0.1.
    anchors = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    negatives = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert mean_positive_info_nce(anchors, negatives).item() == pytest.approx(math.log1p(math.exp(-10.0)),
                                                                              rel=1e-9)


# -------------------------------------------------------------------------------------------------------- boundaries

def test_a_cap_of_one_sample_is_the_smallest_allowed():
    samples = losses.sample_indices(small_mask(batch=1), SMALL_SIZES, max_samples=1)
    assert all(positions.numel() == 1 for positions in samples.anchors[0] + samples.negatives[0])
    with pytest.raises(ValueError, match=re.escape("max_samples must be >= 1, got 0")):
        losses.sample_indices(small_mask(batch=1), SMALL_SIZES, max_samples=0)


def test_the_last_pixel_of_a_pool_is_inside_and_one_past_it_is_outside():
    view1, view2 = views(SMALL_SIZES, batch=1)
    mask = small_mask(batch=1)
    drawn = losses.multi_view_pixel_contrast(view1, view2, mask, return_indices=True)["indices"]

    def with_first_anchor(position):
        anchors = ((torch.tensor([position]),) + drawn.anchors[0][1:],)
        return PixelSamples(anchors, drawn.negatives)

    last = 8 * 8 - 1  # pixel (7, 7), authentic, of the 64-pixel scale-1 pool
    losses.multi_view_pixel_contrast(view1, view2, mask, indices=with_first_anchor(last))
    with pytest.raises(ValueError, match=re.escape("reach outside the 64 pixels of pool fine_view1")):
        losses.multi_view_pixel_contrast(view1, view2, mask, indices=with_first_anchor(last + 1))


def test_alpha_zero_weights_only_the_pristine_pixels():
    # The hand-worked pixels of test_head_losses: z = 0, y = 1 (BCE ln 2, (1 − p_t)² = 1/4) and z = ln 3, y = 0
    # (BCE ln 4, (1 − p_t)² = 9/16). α = 0 gives α_t = 0 to the forged pixel and 1 to the pristine one.
    logits = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 2)
    expected = (0.0 + 1.0 * (9 / 16) * math.log(4.0)) / 2
    assert losses.sigmoid_focal_loss(logits, target, alpha=0.0).item() == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------------------ compute dtype

def test_half_precision_rows_are_compared_in_float32():
    generator = torch.Generator().manual_seed(3)
    anchors = torch.randn(6, 4, generator=generator).half()
    negatives = torch.randn(5, 4, generator=generator).half()
    loss = mean_positive_info_nce(anchors, negatives)
    assert loss.dtype == torch.float32
    # The same half values widened first: exactly the float32 computation.
    assert loss.item() == mean_positive_info_nce(anchors.float(), negatives.float()).item()


def test_the_scale_1_map_sets_the_compute_dtype():
    # A float64 scale-1 map with float32 coarse maps is computed in float64: equal to the all-float64 loss on the
    # same (exactly widened) values, far closer than float32 arithmetic could be.
    mixed = views(SMALL_SIZES, batch=2, dtypes=(torch.float64, torch.float32, torch.float32, torch.float32))
    widened = [[f.double() for f in view] for view in mixed]
    mask = small_mask()
    reference = losses.multi_view_pixel_contrast(*widened, mask, return_indices=True)
    result = losses.multi_view_pixel_contrast(*mixed, mask, indices=reference["indices"])
    assert result["total"].dtype == torch.float64
    assert result["total"].item() == pytest.approx(reference["total"].item(), rel=1e-13)


# --------------------------------------------------------------------------------------------------- error messages

def test_sampler_names_a_bad_mask():
    with pytest.raises(ValueError, match=re.escape("sample_indices: mask must be B×H×W, got shape (8, 8)")):
        losses.sample_indices(torch.zeros(8, 8), SMALL_SIZES)
    with pytest.raises(ValueError, match=r"^sample_indices: mask must hold only 0 \(authentic\) and 1 \(forged\)$"):
        losses.sample_indices(small_mask() * 2, SMALL_SIZES)


def test_shared_draws_follow_the_generator():
    mask = small_mask(batch=1)
    first, second = (losses.sample_indices(mask, SMALL_SIZES, max_samples=5, share_samples=True,
                                           generator=torch.Generator().manual_seed(11)) for _ in range(2))
    for role in ("anchors", "negatives"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(first, role)[0], getattr(second, role)[0]))


def bad_views_message(view1, view2, mask=None):
    with pytest.raises(ValueError) as error:
        losses.multi_view_pixel_contrast(view1, view2, small_mask() if mask is None else mask)
    return str(error.value)


def test_views_of_the_wrong_rank_or_type_are_named():
    view1, view2 = views(SMALL_SIZES, batch=2)
    flat = view1[:2] + [view1[2][:, :, 0]] + view1[3:]
    assert bad_views_message(flat, view2) == ("multi_view_pixel_contrast: view1[2] must be a floating B×C×H×W map, "
                                              "got torch.float32 of shape (2, 3, 2)")
    integer = [view2[0].long()] + view2[1:]
    assert bad_views_message(view1, integer).startswith("multi_view_pixel_contrast: view2[0] must be a floating")


def test_views_whose_batch_or_channels_differ_are_named():
    view1, view2 = views(SMALL_SIZES, batch=2)
    wide = [view1[0], torch.cat([view1[1], view1[1]], dim=1)] + view1[2:]
    assert bad_views_message(wide, view2) == ("multi_view_pixel_contrast: view1[1] has batch×channels (2, 6), "
                                              "view1[0] has (2, 3)")


def test_views_whose_sizes_differ_are_named():
    view1, view2 = views(SMALL_SIZES, batch=2)
    shrunk = view2[:3] + [torch.zeros(2, 3, 2, 2)]
    assert bad_views_message(view1, shrunk) == ("multi_view_pixel_contrast: view2[3] has shape (2, 3, 2, 2), "
                                                "view1[3] has (2, 3, 1, 1)")


def test_indices_for_another_batch_are_named():
    view1, view2 = views(SMALL_SIZES, batch=2)
    one_image = losses.sample_indices(small_mask(batch=1), SMALL_SIZES)
    with pytest.raises(ValueError, match=re.escape("indices are for 1 images, the batch has 2")):
        losses.multi_view_pixel_contrast(view1, view2, small_mask(), indices=one_image)


def test_head_losses_name_bad_shapes():
    target = torch.zeros(2, 3, 3)
    for logits in (torch.zeros(2, 2, 3, 3), torch.zeros(2, 1, 3)):
        message = f"sigmoid_focal_loss: logits must be B×1×h×w, got shape {tuple(logits.shape)}"
        with pytest.raises(ValueError, match=re.escape(message)):
            losses.sigmoid_focal_loss(logits, target)
    message = "binary_cross_entropy: target must be B×h×w or B×1×h×w with B=2, got shape (3, 1, 3, 3)"
    with pytest.raises(ValueError, match=re.escape(message)):
        losses.binary_cross_entropy(torch.zeros(2, 1, 3, 3), torch.zeros(3, 1, 3, 3))

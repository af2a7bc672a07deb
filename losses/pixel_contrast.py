"""MPC's stage-1 loss: mean-positive pixel InfoNCE within an image, across scales and across views
(docs/MPC_SPEC.md §3).

Exact to the official formulation, but the mean similarity of an anchor to the other anchors is taken from the
anchors' sum instead of an n×n similarity matrix, the anchor–negative matrix is touched by as few passes as
possible, and undefined terms (no negatives, too few anchors) contribute 0 instead of NaN. Similarities are
always computed in float32 (or float64 for float64 input), even under autocast.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from losses.sampling import (COARSE_VIEW1, CONTRAST_PAIRS, FINE_VIEW1, FINE_VIEW2, POOLS, TERMS, PixelSamples,
                             sample_indices)

POSITIVE_MODES = ("own", "other")
# Logits are shifted by their bound 1/τ before exp (see below); the smallest shifted logit is −2/τ, which must
# stay well inside float32's normal range (exp(−66.7) ≈ 1e-29 at τ = 0.03).
MIN_TEMPERATURE = 0.03


def mean_positive_info_nce(anchors: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.1,
                           positive_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ℓ(A, N) of FOCAL/MPC on n×C anchors and m×C negatives: the mean over anchors a_i of
    log(exp(p_i/τ) + Σ_k exp(⟨a_i, n_k⟩/τ)) − p_i/τ, i.e. −log softmax at the positive logit.

    Rows are L2-normalised here, in float32 at least and outside autocast. p_i is the mean of ⟨a_i, a_j⟩ over
    the other anchors j ≠ i (official), or over all rows of `positive_keys` when given. Undefined cases (no
    negatives; no anchors; no positives to average: fewer than 2 anchors, or empty `positive_keys`) give a 0
    that stays attached to the graph, so backward() still works.
    """
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        def unit(rows):
            return None if rows is None else F.normalize(rows.to(dtype), dim=1)
        return _unit_info_nce(unit(anchors), unit(negatives), temperature, unit(positive_keys))


def _unit_info_nce(anchors: torch.Tensor, negatives: torch.Tensor, temperature: float,
                   positive_keys: Optional[torch.Tensor]) -> torch.Tensor:
    """`mean_positive_info_nce` for rows already unit-norm (or zero), in their compute dtype, outside autocast."""
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"mean_positive_info_nce: temperature must be >= {MIN_TEMPERATURE}, got {temperature}")
    anchor_count = anchors.shape[0]
    positive_count = anchor_count - 1 if positive_keys is None else positive_keys.shape[0]
    if negatives.shape[0] == 0 or anchor_count == 0 or positive_count < 1:
        return anchors.sum() * 0.0
    if positive_keys is None:
        # Σ_{j≠i} ⟨a_i, a_j⟩ = ⟨a_i, Σ_j a_j⟩ − ⟨a_i, a_i⟩: O(n) instead of an n×n matrix.
        positive = (anchors @ anchors.sum(0) - (anchors * anchors).sum(1)) / positive_count
    else:
        positive = anchors @ positive_keys.mean(0)
    negative_sum = _ShiftedExpSum.apply(anchors, negatives, temperature)
    # −log softmax = log(exp(p/τ) + Σ exp(s/τ)) − p/τ = softplus(log Σ exp((s − 1)/τ) − (p − 1)/τ).
    return F.softplus(torch.log(negative_sum) - (positive - 1) / temperature).mean()


class _ShiftedExpSum(torch.autograd.Function):
    """Σ_k exp((⟨a_i, n_k⟩ − 1)/τ) for every anchor row a_i, for unit-norm rows.

    Unit rows bound every logit by 1/τ, so shifting by it keeps exp from overflowing without a row maximum.
    Appending −1/τ to the scaled anchors and 1 to the negatives makes the matmul return the shifted logits
    directly. The n×m matrix is then written once (matmul), exponentiated in place, summed, and in backward
    turned into the gradient in place: no other pass or copy of it is made. (A second backward through the
    same graph is refused by autograd's version check on the saved matrix.)
    """

    @staticmethod
    def forward(ctx, anchors, negatives, temperature):
        shifted_anchors = F.pad(anchors / temperature, (0, 1), value=-1.0 / temperature)
        exponentials = (shifted_anchors @ F.pad(negatives, (0, 1), value=1.0).T).exp_()
        ctx.save_for_backward(anchors, negatives, exponentials)
        ctx.temperature = temperature
        return exponentials.sum(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums):
        anchors, negatives, exponentials = ctx.saved_tensors
        # ∂s_i/∂⟨a_i, n_k⟩ = exp_ik / τ.
        weights = exponentials.mul_(grad_sums.unsqueeze(1) / ctx.temperature)
        grad_anchors = weights @ negatives if ctx.needs_input_grad[0] else None
        grad_negatives = weights.T @ anchors if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_negatives, None


def _check_views(view1: Sequence[torch.Tensor], view2: Sequence[torch.Tensor], mask: torch.Tensor) -> None:
    for name, view in (("view1", view1), ("view2", view2)):
        if len(view) != 4:
            raise ValueError(f"multi_view_pixel_contrast: {name} must hold 4 scale maps, got {len(view)}")
        for scale, feature_map in enumerate(view):
            if feature_map.dim() != 4 or not feature_map.is_floating_point():
                raise ValueError(f"multi_view_pixel_contrast: {name}[{scale}] must be a floating B×C×H×W map, "
                                 f"got {feature_map.dtype} of shape {tuple(feature_map.shape)}")
            if feature_map.shape[:2] != view1[0].shape[:2]:
                raise ValueError(f"multi_view_pixel_contrast: {name}[{scale}] has batch×channels "
                                 f"{tuple(feature_map.shape[:2])}, view1[0] has {tuple(view1[0].shape[:2])}")
    for scale, (first, second) in enumerate(zip(view1, view2)):
        if first.shape != second.shape:
            raise ValueError(f"multi_view_pixel_contrast: view2[{scale}] has shape {tuple(second.shape)}, "
                             f"view1[{scale}] has {tuple(first.shape)}")
    batch, _, height, width = view1[0].shape
    if tuple(mask.shape) != (batch, height, width):
        raise ValueError(f"multi_view_pixel_contrast: mask has shape {tuple(mask.shape)}, expected "
                         f"{(batch, height, width)} (B×H×W of the scale-1 maps)")


def _term_weights(weights: Optional[Dict[str, float]]) -> Dict[str, float]:
    weights = dict(weights or {})
    unknown = set(weights) - set(TERMS)
    if unknown:
        raise ValueError(f"multi_view_pixel_contrast: unknown term weights {sorted(unknown)}; terms are {TERMS}")
    return {term: float(weights.get(term, 1.0)) for term in TERMS}


def _flat_pixels(feature_map: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → B×(H·W)×C, row-major pixels."""
    return feature_map.flatten(2).transpose(1, 2)


def _embedding_table(view1, view2, dtype):
    """All pool pixels of all images as unit-norm rows, and where each pool starts and how long one image's is."""
    pools = {
        FINE_VIEW1: _flat_pixels(view1[0]),
        FINE_VIEW2: _flat_pixels(view2[0]),
        COARSE_VIEW1: torch.cat([_flat_pixels(feature_map) for feature_map in view1[1:]], dim=1),
    }
    starts, sizes, start = {}, {}, 0
    for name in POOLS:
        batch, sizes[name], _ = pools[name].shape
        starts[name] = start
        start += batch * sizes[name]
    rows = torch.cat([pools[name].reshape(-1, pools[name].shape[-1]) for name in POOLS]).to(dtype)
    return F.normalize(rows, dim=1), starts, sizes


def _table_rows(samples, starts, sizes, role):
    """Row numbers in the embedding table of every sampled position, in (image, pair) order."""
    rows = []
    for image, image_samples in enumerate(getattr(samples, role)):
        for pair, positions in zip(CONTRAST_PAIRS, image_samples):
            pool = pair.anchor_pool if role == "anchors" else pair.negative_pool
            if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < sizes[pool]:
                raise ValueError(f"multi_view_pixel_contrast: indices {role}[{image}] reach outside the "
                                 f"{sizes[pool]} pixels of pool {pool}")
            rows.append(positions + starts[pool] + image * sizes[pool])
    return rows


def _gather(table, rows):
    """The table rows of each sample, gathered in one pass and split back per sample."""
    flat = torch.cat(rows).to(table.device)
    return table.index_select(0, flat).split([r.numel() for r in rows])


def multi_view_pixel_contrast(view1: Sequence[torch.Tensor], view2: Sequence[torch.Tensor], mask: torch.Tensor,
                              max_samples: int = 5000, temperature: float = 0.1,
                              weights: Optional[Dict[str, float]] = None, positives: str = "own",
                              share_samples: bool = False, generator: Optional[torch.Generator] = None,
                              return_indices: bool = False, indices: Optional[PixelSamples] = None) -> dict:
    """MPC's stage-1 loss for a batch of two views.

    view1, view2: four B×C×H×W maps each (scale 1 first); mask: B×H×W scale-1 labels (1 = forged), float or
    bool. Per image: within_image = ℓ(S(A¹₁), S(F¹₁)); cross_scale = ℓ(S(A¹₁), S(F¹₂₋₄)) + ℓ(S(A¹₂₋₄), S(F¹₁));
    cross_modality = ℓ(S(A¹₁), S(F²₁)) + ℓ(S(A²₁), S(F¹₁)), with S a uniform subsample of at most `max_samples`
    (see `losses.sampling`). Returns each term's mean over the images and ``total`` = Σ weight·term (default
    weights 1), all 0-dim float tensors; with `return_indices` also ``indices``, the `PixelSamples` used, which
    can be passed back as `indices` to reuse them.

    positives="own" (official): an anchor's positive logit is its mean similarity to the other anchors of its
    own sample. positives="other" (the paper's figure, cross terms only): for ℓ(A_x, F_y) the positive of
    a ∈ S(A_x) is the mean of ⟨a, b⟩ over all b ∈ S(A_y), the anchor sample of the partner call (the other
    scale, or the other view); a is not in A_y, so nothing is excluded. The within-image term is the same in
    both modes.

    An undefined call (no forged pixels, fewer than 2 anchors, no partner anchors) contributes 0 for that image,
    and the batch mean still divides by B, as the official mean over images of per-image sums does.
    """
    _check_views(view1, view2, mask)
    if positives not in POSITIVE_MODES:
        raise ValueError(f"multi_view_pixel_contrast: positives must be one of {POSITIVE_MODES}, got {positives!r}")
    term_weights = _term_weights(weights)
    if indices is None:
        indices = sample_indices(mask, [tuple(f.shape[-2:]) for f in view1], max_samples, share_samples, generator)
    elif indices.batch_size != mask.shape[0]:
        raise ValueError(f"multi_view_pixel_contrast: indices are for {indices.batch_size} images, "
                         f"the batch has {mask.shape[0]}")

    dtype = torch.promote_types(view1[0].dtype, torch.float32)
    with torch.autocast(device_type=view1[0].device.type, enabled=False):
        table, starts, sizes = _embedding_table(view1, view2, dtype)
        anchors = _gather(table, _table_rows(indices, starts, sizes, "anchors"))
        negatives = _gather(table, _table_rows(indices, starts, sizes, "negatives"))
        # The anchor–negative blocks are computed one call at a time at their exact sizes: padding them to a
        # common size would waste matmul work whenever images have different forged fractions.
        pair_losses = []
        for image in range(indices.batch_size):
            first = image * len(CONTRAST_PAIRS)
            for k, pair in enumerate(CONTRAST_PAIRS):
                partner = None
                if positives == "other" and pair.partner is not None:
                    partner = anchors[first + pair.partner]
                pair_losses.append(_unit_info_nce(anchors[first + k], negatives[first + k], temperature, partner))
        per_image = torch.stack(pair_losses).view(indices.batch_size, len(CONTRAST_PAIRS))

    result = {}
    for term in TERMS:
        columns = [k for k, pair in enumerate(CONTRAST_PAIRS) if pair.term == term]
        result[term] = per_image[:, columns].sum(1).mean()
    result["total"] = torch.stack([term_weights[term] * result[term] for term in TERMS]).sum()
    if return_indices:
        result["indices"] = indices
    return result

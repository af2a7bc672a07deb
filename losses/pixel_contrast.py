"""MPC's stage-1 loss: mean-positive pixel InfoNCE within an image, across scales and across views
(docs/MPC_SPEC.md §3).

Exact to the official formulation, but the mean similarity of an anchor to the other anchors is taken from the
anchors' sum instead of an n×n similarity matrix, and undefined terms (no negatives, too few anchors) contribute 0
instead of NaN. Similarities are always computed in float32 (or float64 for float64 input), even under autocast.

Forward and backward are written by hand (`_info_nce_forward` / `_info_nce_backward`, derived in their
docstrings; the whole multi-view loss is one autograd Function, `_MultiViewInfoNCE`), so that the work on each
n×m anchor–negative matrix is the three products any exact implementation needs (the logits, then the gradients
of anchors and negatives), one exp and one sum, and little else is done per pixel:

* the sampled pixels are gathered straight from the B×C×H×W maps and L2-normalised there (no table of every pool
  pixel), and backward adds their gradients straight into the maps' gradients;
* the matrix is computed negatives-major (m×n), the faster layout of the same product on CPU, with 1/τ as the
  product's scale factor, and exponentiated in place;
* backward scales the n×C products by each anchor's weight instead of scaling the n×m matrix, and the few n×C
  passes left go to BLAS where they can (on a CPU every elementwise pass is a parallel region of its own).
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from losses.sampling import (COARSE_VIEW1, CONTRAST_PAIRS, FINE_VIEW1, FINE_VIEW2, POOLS, TERMS, PixelSamples,
                             sample_indices)

POSITIVE_MODES = ("own", "other")
# exp(⟨a, n⟩/τ) of unit rows lies in [exp(−1/τ), exp(1/τ)], which must stay well inside float32's normal range:
# [3.4e-15, 3.0e14] at τ = 0.03, so that a sum of even 1e20 of them cannot overflow.
MIN_TEMPERATURE = 0.03
# F.normalize's default: a row is divided by max(‖x‖, NORM_EPS).
NORM_EPS = 1e-12
# F.softplus's default threshold: above it softplus(z) = z, and its slope is 1.
SOFTPLUS_THRESHOLD = 20.0


def _check_temperature(temperature: float) -> None:
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"mean_positive_info_nce: temperature must be >= {MIN_TEMPERATURE}, got {temperature}")


# ---------------------------------------------------------------------------------------------------------------
# Row normalisation (F.normalize) with its backward

def _row_dots(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """⟨first_i, second_i⟩ for every row i, as a k×1 column, without a k×C temporary."""
    return torch.bmm(first.unsqueeze(1), second.unsqueeze(2)).view(-1, 1)


def _unit_rows_(rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.normalize(rows, dim=1), in place on `rows` (a private copy): (units, divisors k×1, ‖x‖ < eps k×1)."""
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    divisors = norms.clamp_min(NORM_EPS)
    return rows.div_(divisors), divisors, norms < NORM_EPS


def _unit_rows_backward_(grad: torch.Tensor, units: torch.Tensor, divisors: torch.Tensor,
                         small: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. the raw rows from `grad` w.r.t. their unit rows, in place on `grad`.

    For u = x/‖x‖ it is (g − u⟨u, g⟩)/‖x‖; where ‖x‖ < eps the divisor is the constant eps and it is g/eps
    (F.normalize clamps the norm, and clamp_min passes no gradient below its bound)."""
    dots = _row_dots(units, grad).masked_fill_(small, 0.0)
    return grad.addcmul_(units, dots, value=-1.0).div_(divisors)


# ---------------------------------------------------------------------------------------------------------------
# One InfoNCE call on unit rows
#
# On a CPU every elementwise pass over an n×C or n×m matrix is a parallel region of its own, so the code below
# keeps them few: sums and products with vectors go to BLAS (gemv, a rank-2 gemm), and the gradients are written
# straight into their destination rows.

def _info_nce_forward(anchors: torch.Tensor, negatives: torch.Tensor, keys: Optional[torch.Tensor],
                      anchor_self_dots: torch.Tensor, temperature: float):
    """ℓ(A, N) on unit (or zero) rows, and what its backward needs (None for an undefined call, whose ℓ is 0).
    `anchor_self_dots` holds ⟨a_i, a_i⟩ (n).

    With s_ki = ⟨n_k, a_i⟩/τ, S_i = Σ_k exp(s_ki) and p_i the mean positive similarity, the per-anchor loss is
    −log softmax at the positive = log(exp(p_i/τ) + S_i) − p_i/τ = softplus(z_i) with z_i = log S_i − p_i/τ.
    The n×m matrix E = exp(s) is kept negatives-major (m×n, the faster layout of the product) for backward;
    exp(s) needs no shift, as |s| ≤ 1/τ (see MIN_TEMPERATURE); 1/τ is the product's scale factor.
    """
    anchor_count, negative_count = anchors.shape[0], negatives.shape[0]
    positive_count = anchor_count - 1 if keys is None else keys.shape[0]
    if negative_count == 0 or anchor_count == 0 or positive_count < 1:
        return anchors.new_zeros(()), None
    if keys is None:
        # Σ_{j≠i} ⟨a_i, a_j⟩ = ⟨a_i, Σ_j a_j⟩ − ⟨a_i, a_i⟩: O(n) instead of an n×n matrix.
        centre = anchors.T @ anchors.new_ones(anchor_count)
        positive = (anchors @ centre - anchor_self_dots) / positive_count
    else:
        centre = keys.T @ keys.new_full((positive_count,), 1.0 / positive_count)
        positive = anchors @ centre
    exponentials = torch.addmm(anchors.new_zeros(()), negatives, anchors.T, beta=0, alpha=1.0 / temperature)
    exponentials.exp_()
    sums = exponentials.new_ones(negative_count) @ exponentials
    logits = torch.log(sums) - positive / temperature
    return F.softplus(logits).mean(), (exponentials, sums, logits, centre)


def _info_nce_backward(grad: torch.Tensor, anchors: torch.Tensor, negatives: torch.Tensor, keys_count: int,
                       temperature: float, state, grad_anchors: torch.Tensor, grad_negatives: torch.Tensor,
                       accumulate: Tuple[bool, bool]) -> Optional[torch.Tensor]:
    """Writes (or with `accumulate` adds) the gradients of ℓ·grad w.r.t. the unit anchors and negatives into
    `grad_anchors` (n×C) and `grad_negatives` (m×C); returns the gradient of every key (one C-row, the same for
    all `keys_count` keys), or None without keys (keys_count 0).

    With c_i = grad · softplus'(z_i)/n: ∂/∂s_ki = c_i E_ki/S_i, so with w_i = c_i/(τ S_i) the anchors get
    w_i Σ_k E_ki n_k and the negatives Σ_i E_ki w_i a_i: two products with E, scaled on their n×C side.
    ∂/∂p_i = d_i = −c_i/τ. Own positives p_i = (⟨a_i, Σ_j a_j⟩ − ⟨a_i, a_i⟩)/(n−1) give anchor k
    (d_k Σ_j a_j + Σ_i d_i a_i − 2 d_k a_k)/(n−1); positives against keys, p_i = ⟨a_i, mean(keys)⟩, give anchor k
    d_k mean(keys) and every key Σ_i d_i a_i/q.
    """
    exponentials, sums, logits, centre = state
    anchor_count = anchors.shape[0]
    slopes = torch.where(logits > SOFTPLUS_THRESHOLD, torch.ones_like(logits), torch.sigmoid(logits))
    weights = slopes * (grad / anchor_count)
    pull = weights / -temperature
    weights = (weights / (temperature * sums)).unsqueeze(1)
    pulled = anchors.T @ pull
    anchors_out = torch.empty_like(grad_anchors) if accumulate[0] else grad_anchors
    torch.mm(exponentials.T, negatives, out=anchors_out).mul_(weights)
    if keys_count == 0:
        scale = 1.0 / (anchor_count - 1)
        anchors_out.addcmul_(anchors, pull.unsqueeze(1), value=-2.0 * scale)
        # d_k Σ_j a_j + Σ_i d_i a_i for every k: a rank-2 product.
        left = torch.stack([pull, torch.ones_like(pull)], dim=1)
        anchors_out.addmm_(left, torch.stack([centre, pulled]), alpha=scale)
        keys_grad = None
    else:
        anchors_out.addmm_(pull.unsqueeze(1), centre.unsqueeze(0))
        keys_grad = pulled / keys_count
    if accumulate[0]:
        grad_anchors.add_(anchors_out)
    torch.addmm(grad_negatives, exponentials, anchors * weights, beta=1 if accumulate[1] else 0,
                out=grad_negatives)
    return keys_grad


def _consume(state) -> None:
    """Mark a call's saved n×m matrix as used up, so that a second backward through the same graph is refused by
    autograd's version check, as it was when backward turned the matrix into its gradient in place. (Tests that
    need several backward passes, such as gradcheck, call the Functions with `single_backward=False`.)"""
    if state is not None:
        torch.autograd.graph.increment_version(state[0])


class _InfoNCE(torch.autograd.Function):
    """ℓ(A, N) on raw rows (normalised here) in their compute dtype, outside autocast."""

    @staticmethod
    def forward(ctx, temperature, anchors, negatives, keys, single_backward=True):
        rows = [anchors, negatives] + ([] if keys is None else [keys])
        normalised = [_unit_rows_(r.clone(memory_format=torch.contiguous_format)) for r in rows]
        units = [u for u, _, _ in normalised]
        loss, state = _info_nce_forward(units[0], units[1], None if keys is None else units[2],
                                        _row_dots(units[0], units[0]).view(-1), temperature)
        ctx.temperature, ctx.has_keys, ctx.defined = temperature, keys is not None, state is not None
        ctx.single_backward = single_backward
        ctx.save_for_backward(*[t for triple in normalised for t in triple], *(state or ()))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        count = 3 if ctx.has_keys else 2
        normalised = [saved[3 * i:3 * i + 3] for i in range(count)]
        grads = [torch.zeros_like(units) for units, _, _ in normalised]
        if ctx.defined:
            state = saved[3 * count:]
            units = [u for u, _, _ in normalised]
            with torch.autocast(device_type=grad.device.type, enabled=False):
                keys_grad = _info_nce_backward(grad, units[0], units[1], units[2].shape[0] if ctx.has_keys else 0,
                                               ctx.temperature, state, grads[0], grads[1], (False, False))
                if ctx.has_keys:
                    grads[2] += keys_grad
                grads = [_unit_rows_backward_(g, *n) for g, n in zip(grads, normalised)]
            if ctx.single_backward:
                _consume(state)
        return (None, *grads, *([None] if not ctx.has_keys else []), None)


def mean_positive_info_nce(anchors: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.1,
                           positive_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ℓ(A, N) of FOCAL/MPC on n×C anchors and m×C negatives: the mean over anchors a_i of
    log(exp(p_i/τ) + Σ_k exp(⟨a_i, n_k⟩/τ)) − p_i/τ, i.e. −log softmax at the positive logit.

    Rows are L2-normalised here, in float32 at least and outside autocast. p_i is the mean of ⟨a_i, a_j⟩ over
    the other anchors j ≠ i (official), or over all rows of `positive_keys` when given. Undefined cases (no
    negatives; no anchors; no positives to average: fewer than 2 anchors, or empty `positive_keys`) give a 0
    that stays attached to the graph, so backward() still works.
    """
    _check_temperature(temperature)
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        def widen(rows):
            return None if rows is None else rows.to(dtype)
        return _InfoNCE.apply(temperature, widen(anchors), widen(negatives), widen(positive_keys))


# ---------------------------------------------------------------------------------------------------------------
# The multi-view loss

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


# The maps the loss reads, in the order `_MultiViewInfoNCE` takes them, and which of them make up each pool: a
# pool's pixels are its maps' pixels, row-major, one map after the other (losses.sampling).
VIEW1_SCALE1, VIEW2_SCALE1 = 0, 4
POOL_MAPS = {FINE_VIEW1: (VIEW1_SCALE1,), FINE_VIEW2: (VIEW2_SCALE1,), COARSE_VIEW1: (1, 2, 3)}


def _pool_sizes(maps: Sequence[torch.Tensor]) -> Dict[str, int]:
    return {pool: sum(maps[i].shape[-2] * maps[i].shape[-1] for i in POOL_MAPS[pool]) for pool in POOLS}


def _gather_plan(samples: PixelSamples, sizes: Dict[str, int], device: torch.device):
    """Which pixels to gather, and where each call's rows lie among them.

    Returns ``(gathers, blocks)``: `gathers` lists ``(image, pool, positions, start)`` — per image and pool every
    sampled set of that pool, one after the other, as rows ``start:start + len(positions)`` of one matrix of
    gathered rows (a set object that several calls share is gathered once) — and ``blocks[image][k][role]`` is
    the ``(start, stop)`` row range of call k's anchors or negatives in that matrix."""
    for role in ("anchors", "negatives"):
        for image, image_samples in enumerate(getattr(samples, role)):
            for pair, positions in zip(CONTRAST_PAIRS, image_samples):
                pool = pair.anchor_pool if role == "anchors" else pair.negative_pool
                if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < sizes[pool]:
                    raise ValueError(f"multi_view_pixel_contrast: indices {role}[{image}] reach outside the "
                                     f"{sizes[pool]} pixels of pool {pool}")
    gathers, blocks, start = [], [], 0
    for image in range(samples.batch_size):
        parts = {pool: [] for pool in POOLS}
        placed = {}
        for k, pair in enumerate(CONTRAST_PAIRS):
            for role, pool in (("anchors", pair.anchor_pool), ("negatives", pair.negative_pool)):
                positions = getattr(samples, role)[image][k]
                if (pool, id(positions)) not in placed:
                    placed[pool, id(positions)] = sum(p.numel() for p in parts[pool]), positions.numel()
                    parts[pool].append(positions)
        offsets = {}
        for pool in POOLS:
            positions = torch.cat(parts[pool]).to(device=device, dtype=torch.long)
            gathers.append((image, pool, positions, start))
            offsets[pool] = start
            start += positions.numel()
        image_blocks = []
        for k, pair in enumerate(CONTRAST_PAIRS):
            call_blocks = {}
            for role, pool in (("anchors", pair.anchor_pool), ("negatives", pair.negative_pool)):
                first, count = placed[pool, id(getattr(samples, role)[image][k])]
                call_blocks[role] = (offsets[pool] + first, offsets[pool] + first + count)
            image_blocks.append(call_blocks)
        blocks.append(image_blocks)
    return gathers, blocks


def _pool_pixels(maps: Sequence[torch.Tensor], pool: str, image: int) -> torch.Tensor:
    """C×P: the pool's pixels of one image as columns (a view for one map, a small copy for the coarse pool)."""
    columns = [maps[i][image].flatten(1) for i in POOL_MAPS[pool]]
    return columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)


class _MultiViewInfoNCE(torch.autograd.Function):
    """The B×5 InfoNCE values of every call of every image, from the five maps the loss reads.

    Forward gathers the sampled pixels of every image and pool straight from the maps into one matrix of rows and
    normalises them; backward adds the gradients of those rows straight into the maps' gradients. A pixel sampled
    by several sets is gathered (and normalised) once per set: the sets are about as large as the pools, so a
    table of every pool pixel would save no work.
    """

    @staticmethod
    def forward(ctx, plan, temperature, other_positives, dtype, single_backward, *maps):
        gathers, blocks = plan
        channels = maps[0].shape[1]
        rows = maps[0].new_empty(sum(p.numel() for _, _, p, _ in gathers), channels, dtype=dtype)
        for image, pool, positions, start in gathers:
            # Gathered as columns (C×k: one contiguous read per channel), then written as k×C rows.
            rows[start:start + positions.numel()].copy_(_pool_pixels(maps, pool, image).index_select(1, positions).T)
        units, divisors, small = _unit_rows_(rows)
        self_dots = _row_dots(units, units).view(-1)
        losses = maps[0].new_zeros(len(blocks), len(CONTRAST_PAIRS), dtype=dtype)
        states = []
        for image in range(len(blocks)):
            for k in range(len(CONTRAST_PAIRS)):
                anchors, negatives, keys = _call_rows(units, blocks, image, k, other_positives)
                (a_start, a_stop) = blocks[image][k]["anchors"]
                losses[image, k], state = _info_nce_forward(anchors, negatives, keys, self_dots[a_start:a_stop],
                                                            temperature)
                states.append(state)
        ctx.plan, ctx.temperature, ctx.other_positives = plan, temperature, other_positives
        ctx.single_backward, ctx.defined = single_backward, [state is not None for state in states]
        ctx.maps = [(m.shape, m.dtype) for m in maps]
        ctx.save_for_backward(units, divisors, small, *[t for state in states if state is not None for t in state])
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        gathers, blocks = ctx.plan
        units, divisors, small, *flat_states = ctx.saved_tensors
        states, flat_states = [], iter(flat_states)
        for defined in ctx.defined:
            states.append(tuple(next(flat_states) for _ in range(4)) if defined else None)
        with torch.autocast(device_type=units.device.type, enabled=False):
            grads = torch.empty_like(units)
            written, key_grads = set(), []
            for image in range(len(blocks)):
                for k, pair in enumerate(CONTRAST_PAIRS):
                    state = states[image * len(CONTRAST_PAIRS) + k]
                    if state is None:
                        continue
                    anchors, negatives, keys = _call_rows(units, blocks, image, k, ctx.other_positives)
                    anchor_block, negative_block = blocks[image][k]["anchors"], blocks[image][k]["negatives"]
                    keys_grad = _info_nce_backward(
                        grad_losses[image, k], anchors, negatives, 0 if keys is None else keys.shape[0],
                        ctx.temperature, state, grads[slice(*anchor_block)], grads[slice(*negative_block)],
                        (anchor_block in written, negative_block in written))
                    written.update((anchor_block, negative_block))
                    if keys_grad is not None:
                        key_grads.append((blocks[image][pair.partner]["anchors"], keys_grad))
            for image_blocks in blocks:
                for call_blocks in image_blocks:
                    for block in call_blocks.values():
                        if block not in written:
                            grads[slice(*block)].zero_()
                            written.add(block)
            for block, keys_grad in key_grads:
                grads[slice(*block)].add_(keys_grad)
            grads = _unit_rows_backward_(grads, units, divisors, small)

            needed = ctx.needs_input_grad[5:]
            map_grads = [torch.zeros(shape, dtype=units.dtype, device=units.device) if need else None
                         for (shape, _), need in zip(ctx.maps, needed)]
            for image, pool, positions, start in gathers:
                indices = POOL_MAPS[pool]
                if not any(needed[i] for i in indices):
                    continue
                # index_add_ reads a contiguous C×k source faster than the transposed view, copy included.
                columns = grads[start:start + positions.numel()].T.contiguous()
                if len(indices) == 1:
                    map_grads[indices[0]][image].view(columns.shape[0], -1).index_add_(1, positions, columns)
                    continue
                sizes = [ctx.maps[i][0][-2:].numel() for i in indices]
                pool_grad = columns.new_zeros(columns.shape[0], sum(sizes)).index_add_(1, positions, columns)
                for i, part in zip(indices, pool_grad.split(sizes, dim=1)):
                    if map_grads[i] is not None:
                        map_grads[i][image].view(columns.shape[0], -1).copy_(part)
        if ctx.single_backward:
            for state in states:
                _consume(state)
        map_grads = [None if g is None else g.to(dtype) for g, (_, dtype) in zip(map_grads, ctx.maps)]
        return (None, None, None, None, None, *map_grads)


def _call_rows(units, blocks, image, k, other_positives):
    """The unit anchor, negative and (with "other" positives) key rows of call k of an image: row ranges (views)
    of the gathered rows."""
    pair = CONTRAST_PAIRS[k]
    anchors = units[slice(*blocks[image][k]["anchors"])]
    negatives = units[slice(*blocks[image][k]["negatives"])]
    keys = None
    if other_positives and pair.partner is not None:
        keys = units[slice(*blocks[image][pair.partner]["anchors"])]
    return anchors, negatives, keys


def _per_image_losses(maps: Sequence[torch.Tensor], indices: PixelSamples, temperature: float, positives: str,
                      single_backward: bool = True) -> torch.Tensor:
    """The B×5 values of every InfoNCE call, from the five maps the loss reads (view 1's four, view 2's first)."""
    plan = _gather_plan(indices, _pool_sizes(maps), maps[0].device)
    _check_temperature(temperature)
    dtype = torch.promote_types(maps[0].dtype, torch.float32)
    with torch.autocast(device_type=maps[0].device.type, enabled=False):
        return _MultiViewInfoNCE.apply(plan, temperature, positives == "other", dtype, single_backward, *maps)


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
    per_image = _per_image_losses((*view1, view2[0]), indices, temperature, positives)
    result = {}
    for term in TERMS:
        columns = [k for k, pair in enumerate(CONTRAST_PAIRS) if pair.term == term]
        result[term] = per_image[:, columns].sum(1).mean()
    result["total"] = torch.stack([term_weights[term] * result[term] for term in TERMS]).sum()
    if return_indices:
        result["indices"] = indices
    return result

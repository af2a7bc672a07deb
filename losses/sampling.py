"""Which pixels the multi-view contrastive loss compares, and the random subsampling of them (docs/MPC_SPEC.md §3).

Every InfoNCE call of the loss is a `ContrastPair`: anchors drawn from the authentic pixels of one *pool* and
negatives from the forged pixels of another. A pool is a flat list of pixel positions of one image:

* ``fine_view1`` / ``fine_view2``: the scale-1 map of view 1 / view 2, row-major (index ``y * W1 + x``);
* ``coarse_view1``: scales 2, 3 and 4 of view 1, each row-major, concatenated in that order
  (index ``H2*W2 + y * W3 + x`` is pixel (y, x) of scale 3).

Labels at scales 2-4 come from the scale-1 mask by nearest interpolation, as in the official code.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

FINE_VIEW1 = "fine_view1"
FINE_VIEW2 = "fine_view2"
COARSE_VIEW1 = "coarse_view1"
POOLS = (FINE_VIEW1, FINE_VIEW2, COARSE_VIEW1)

AUTHENTIC = 0
FORGED = 1


@dataclass(frozen=True)
class ContrastPair:
    """One InfoNCE call: authentic anchors of `anchor_pool` against forged negatives of `negative_pool`.

    `partner` is the index (in `CONTRAST_PAIRS`) of the pair whose anchor sample holds the "other" positives of
    this pair (paper-figure mode); None for the within-image pair, which has no other scale or view.
    """
    term: str
    anchor_pool: str
    negative_pool: str
    partner: Optional[int]


# The five InfoNCE calls of MPC's stage-1 loss, in the official order.
CONTRAST_PAIRS = (
    ContrastPair("within_image", FINE_VIEW1, FINE_VIEW1, None),
    ContrastPair("cross_scale", FINE_VIEW1, COARSE_VIEW1, 2),
    ContrastPair("cross_scale", COARSE_VIEW1, FINE_VIEW1, 1),
    ContrastPair("cross_modality", FINE_VIEW1, FINE_VIEW2, 4),
    ContrastPair("cross_modality", FINE_VIEW2, FINE_VIEW1, 3),
)
TERMS = ("within_image", "cross_scale", "cross_modality")


@dataclass(frozen=True)
class PixelSamples:
    """Sampled pool positions: ``anchors[b][k]`` / ``negatives[b][k]`` are 1-D int64 CPU tensors for image b and
    pair ``CONTRAST_PAIRS[k]``, indexing that pair's anchor / negative pool. Pass back to the loss via ``indices=``."""
    anchors: Tuple[Tuple[torch.Tensor, ...], ...]
    negatives: Tuple[Tuple[torch.Tensor, ...], ...]

    @property
    def batch_size(self) -> int:
        return len(self.anchors)


def scale_masks(mask: torch.Tensor, scale_sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """The B×h×w label map of every scale: scale 1 is `mask` itself, coarser ones its nearest interpolation."""
    as_image = mask.float().unsqueeze(1)
    masks = [mask.float()]
    for size in scale_sizes[1:]:
        masks.append(F.interpolate(as_image, size=tuple(size), mode="nearest").squeeze(1))
    return masks


def _pool_positions(masks: List[torch.Tensor], image: int) -> dict:
    """Candidate positions per (pool, label) for one image."""
    fine = masks[0][image].flatten()
    coarse = torch.cat([m[image].flatten() for m in masks[1:]])
    positions = {}
    for label in (AUTHENTIC, FORGED):
        fine_positions = torch.nonzero(fine == label).flatten()
        positions[FINE_VIEW1, label] = fine_positions
        positions[FINE_VIEW2, label] = fine_positions
        positions[COARSE_VIEW1, label] = torch.nonzero(coarse == label).flatten()
    return positions


def _subsample(positions: torch.Tensor, max_samples: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """At most `max_samples` of `positions`, uniformly without replacement (a random permutation's head)."""
    order = torch.randperm(positions.numel(), generator=generator)[:max_samples]
    return positions[order]


def sample_indices(mask: torch.Tensor, scale_sizes: Sequence[Tuple[int, int]], max_samples: int = 5000,
                   share_samples: bool = False, generator: Optional[torch.Generator] = None) -> PixelSamples:
    """Draw the anchor and negative samples of every contrast pair of every image.

    mask: B×H×W scale-1 labels (0 = authentic, 1 = forged); scale_sizes: the (h, w) of the four scales.
    With ``share_samples=False`` (official) every pair draws its own samples; with True each (pool, label) set
    is drawn once per image and reused by every pair that needs it (A¹₁ and A²₁ are different sets: same
    candidate positions, independent draws). Sampling runs on the CPU (with `generator`
    if given, a CPU generator) so that the same seed gives the same samples on every device.
    """
    if max_samples < 1:
        raise ValueError(f"sample_indices: max_samples must be >= 1, got {max_samples}")
    if mask.dim() != 3:
        raise ValueError(f"sample_indices: mask must be B×H×W, got shape {tuple(mask.shape)}")
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("sample_indices: mask must hold only 0 (authentic) and 1 (forged)")
    masks = [m.cpu() for m in scale_masks(mask, scale_sizes)]
    anchors, negatives = [], []
    for image in range(mask.shape[0]):
        image_anchors, image_negatives = _sample_image(_pool_positions(masks, image), max_samples,
                                                       share_samples, generator)
        anchors.append(image_anchors)
        negatives.append(image_negatives)
    return PixelSamples(tuple(anchors), tuple(negatives))


def _sample_image(positions: dict, max_samples: int, share_samples: bool,
                  generator: Optional[torch.Generator]) -> Tuple[tuple, tuple]:
    """The anchor and negative samples of every contrast pair of one image."""
    shared = {}

    def draw(pool, label):
        if not share_samples:
            return _subsample(positions[pool, label], max_samples, generator)
        if (pool, label) not in shared:
            shared[pool, label] = _subsample(positions[pool, label], max_samples, generator)
        return shared[pool, label]

    anchors = tuple(draw(pair.anchor_pool, AUTHENTIC) for pair in CONTRAST_PAIRS)
    negatives = tuple(draw(pair.negative_pool, FORGED) for pair in CONTRAST_PAIRS)
    return anchors, negatives

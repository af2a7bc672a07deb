"""Stage-1 multi-view pixel-contrastive loss and stage-2 head losses."""
from losses.head import binary_cross_entropy, build_head_loss, sigmoid_focal_loss
from losses.pixel_contrast import mean_positive_info_nce, multi_view_pixel_contrast
from losses.sampling import CONTRAST_PAIRS, PixelSamples, sample_indices

__all__ = [
    "CONTRAST_PAIRS",
    "PixelSamples",
    "binary_cross_entropy",
    "build_head_loss",
    "mean_positive_info_nce",
    "multi_view_pixel_contrast",
    "sample_indices",
    "sigmoid_focal_loss",
]

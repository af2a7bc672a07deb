"""Stage-1 validation by clustering (docs/MPC_SPEC.md §3): spherical k-means on fused pixel features, minority =
forged.

The official code uses torch_kmeans 0.2.0 (`KMeans` with `CosineSimilarity`: random init from data points, 8 inits,
100 iterations, tol 1e-4, seed 123); this is a pure-torch equivalent, not a bit-for-bit copy of its random draws.
"""
import torch
import torch.nn.functional as F

from models.mpc import fuse_scales

OFFICIAL_SEED = 123  # torch_kmeans' default seed


def cosine_kmeans(features, k=2, n_init=8, max_iter=100, tol=1e-4, generator=None):
    """Spherical k-means of `features` (N x D): points and centroids on the unit sphere, cosine similarity.

    All `n_init` random starts (k distinct data points each) run together; the start with the highest total
    similarity of points to their centroid wins. A start stops moving once no centroid moves by more than `tol`.
    `generator` is a CPU `torch.Generator`; None means one seeded with `OFFICIAL_SEED`.
    Returns (labels (N,) int64, centroids k x D), on the device of `features`.
    """
    if features.ndim != 2:
        raise ValueError(f"cosine_kmeans: expected N x D features, got shape {tuple(features.shape)}")
    n_points = features.shape[0]
    if not 1 <= k <= n_points:
        raise ValueError(f"cosine_kmeans: k must lie in [1, {n_points}] for {n_points} points, got {k}")
    if generator is None:
        generator = torch.Generator().manual_seed(OFFICIAL_SEED)
    points = F.normalize(features.float(), dim=1)
    starts = torch.stack([torch.randperm(n_points, generator=generator)[:k] for _ in range(n_init)])
    centroids = points[starts.to(points.device)]  # n_init x k x D

    for _ in range(max_iter):
        labels = torch.einsum("nd,ikd->ink", points, centroids).argmax(dim=2)  # n_init x N
        one_hot = F.one_hot(labels, k).to(points.dtype)  # n_init x N x k
        sums = torch.einsum("ink,nd->ikd", one_hot, points)
        # A cluster left empty keeps its centroid (its sum is zero and cannot be normalised).
        empty = one_hot.sum(dim=1, keepdim=True).transpose(1, 2) == 0
        updated = torch.where(empty, centroids, F.normalize(sums, dim=2))
        shift = (updated - centroids).norm(dim=2).amax()
        centroids = updated
        if shift <= tol:
            break

    similarity = torch.einsum("nd,ikd->ink", points, centroids)
    best_similarity, labels = similarity.max(dim=2)
    best = best_similarity.sum(dim=1).argmax()
    return labels[best], centroids[best]


def kmeans_forgery_mask(maps, generator=None, **kmeans_options):
    """Forged-pixel masks from the stage-1 backbone's 4 L2-normalised maps (each B x C x h_i x w_i).

    The maps are fused as stage 2 fuses them (`models.fuse_scales`: upsampled to the first, 1/4-scale map, bilinear
    with align_corners=True, and concatenated) into one feature per pixel; each image is clustered into 2 groups
    and the smaller group is called forged (on a tie, cluster 1, as in the official rule). Returns B x H x W bool masks.
    """
    fused = fuse_scales(maps)
    size = tuple(fused.shape[-2:])
    masks = []
    for image_features in fused:
        labels, _ = cosine_kmeans(image_features.flatten(1).T, k=2, generator=generator, **kmeans_options)
        forged_label = 1 if 2 * int(labels.sum()) <= labels.numel() else 0
        masks.append((labels == forged_label).view(size))
    return torch.stack(masks)

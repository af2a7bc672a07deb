"""utils.evaluation.kmeans: known clusters are recovered, the minority is forged, seeds fix the result, sklearn agrees."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from utils.evaluation.kmeans import cosine_kmeans, kmeans_forgery_mask


def two_blobs(sizes=(300, 100), dim=32, spread=0.15, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(2, dim, generator=generator), dim=1)
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    points = centres[truth] + spread * torch.randn(len(truth), dim, generator=generator)
    scale = 1 + 3 * torch.rand(len(truth), 1, generator=generator)  # lengths must not matter for cosine clustering
    return points * scale, truth


def test_recovers_well_separated_clusters_up_to_permutation():
    points, truth = two_blobs()
    labels, centroids = cosine_kmeans(points, k=2, generator=torch.Generator().manual_seed(1))
    assert labels.shape == truth.shape and labels.dtype == torch.int64
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0
    assert centroids.shape == (2, 32)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(2))
    # Each centroid is the normalised mean of its members.
    for cluster in range(2):
        members = F.normalize(points[labels == cluster], dim=1)
        torch.testing.assert_close(centroids[cluster], F.normalize(members.mean(0), dim=0))


def test_partition_agrees_with_sklearn_kmeans_on_unit_vectors():
    points, _ = two_blobs(sizes=(250, 150), spread=0.3, seed=3)
    unit = F.normalize(points, dim=1).numpy()
    reference = KMeans(n_clusters=2, n_init=8, random_state=0).fit_predict(unit)
    labels, _ = cosine_kmeans(points, k=2)
    assert adjusted_rand_score(reference, labels.numpy()) == 1.0


def test_same_seed_same_result_and_default_seed_is_fixed():
    points = torch.randn(400, 16, generator=torch.Generator().manual_seed(5))  # no clear structure: seeds matter
    first, _ = cosine_kmeans(points, k=3, n_init=2, generator=torch.Generator().manual_seed(9))
    again, _ = cosine_kmeans(points, k=3, n_init=2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, again)
    assert torch.equal(cosine_kmeans(points, k=3)[0], cosine_kmeans(points, k=3)[0])


def test_best_of_several_starts_is_kept():
    points, _ = two_blobs(sizes=(200, 200), spread=0.6, seed=11)
    unit = F.normalize(points, dim=1)

    def total_similarity(labels, centroids):
        return (unit * centroids[labels]).sum().item()

    # Four single-start runs sharing one generator draw the same starts as one four-start run.
    shared = torch.Generator().manual_seed(2)
    singles = [cosine_kmeans(points, k=4, n_init=1, generator=shared) for _ in range(4)]
    labels, centroids = cosine_kmeans(points, k=4, n_init=4, generator=torch.Generator().manual_seed(2))
    scores = [total_similarity(*single) for single in singles]
    assert len({round(s, 3) for s in scores}) > 1  # the starts really end in different partitions
    assert total_similarity(labels, centroids) == pytest.approx(max(scores), rel=1e-6)
    assert torch.equal(labels, singles[int(np.argmax(scores))][0])


def synthetic_maps(forged_region, batch=2, channels=8):
    """Four normalised maps (1/4 .. 1/32 of a 64x64 input); only the 1/4 map tells the forged region apart."""
    generator = torch.Generator().manual_seed(0)
    pristine, forged = F.normalize(torch.rand(2, channels, generator=generator), dim=1)
    fine = torch.where(forged_region[:, None], forged[:, None, None], pristine[:, None, None])
    fine = fine + 0.02 * torch.rand(fine.shape, generator=generator)
    maps = [fine]
    for side in (8, 4, 2):
        maps.append(torch.rand(batch, channels, 1, 1, generator=generator).expand(batch, channels, side, side))
    return [F.normalize(m, dim=1) for m in maps]


@pytest.mark.parametrize("seed", range(6))  # which cluster gets label 1 depends on the random starts
def test_minority_cluster_is_called_forged(seed):
    region = torch.zeros(2, 16, 16, dtype=torch.bool)
    region[0, 2:7, 3:9] = True  # small forged square
    region[1] = True
    region[1, :5, :] = False  # forged area is the majority: the minority (pristine strip) is called forged
    masks = kmeans_forgery_mask(synthetic_maps(region), generator=torch.Generator().manual_seed(seed))
    assert masks.shape == (2, 16, 16) and masks.dtype == torch.bool
    assert torch.equal(masks[0], region[0])
    assert torch.equal(masks[1], ~region[1])


def test_empty_cluster_keeps_a_unit_centroid():
    points = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)  # two distinct points, three clusters
    labels, centroids = cosine_kmeans(points, k=3, n_init=4)
    assert adjusted_rand_score([0] * 5 + [1] * 5, labels.numpy()) == 1.0
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="N x D"):
        cosine_kmeans(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="k must"):
        cosine_kmeans(torch.randn(3, 4), k=4)

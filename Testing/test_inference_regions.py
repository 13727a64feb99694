"""Sliding-window MC inference in the image's geometry, and the review regions built from it."""

import numpy as np
import pytest
import torch

from SSLSegmentLib.data.volume import Geometry, Volume
from SSLSegmentLib.ml.inference import predict_volume
from SSLSegmentLib.ml.networks import build_network
from SSLSegmentLib.data.regions import find_review_regions, visited_mask


def test_predicts_any_size_volume_in_its_own_grid(tiny_net_config):
    torch.manual_seed(0)
    net = build_network(tiny_net_config)
    vol = Volume(np.random.default_rng(0).standard_normal((20, 37, 29)).astype(np.float32), Geometry((0.8, 0.9, 2.0), (1, 2, 3)))
    pred = predict_volume(net, vol, (16, 32, 32), passes=4, device="cpu")
    assert pred.label.shape == vol.shape and pred.probabilities.shape == (2, *vol.shape)
    assert np.allclose(pred.probabilities.sum(0), 1, atol=1e-4)
    for u in (pred.entropy, pred.mutual_information):
        assert u.min() >= 0 and u.max() <= 1
    assert (pred.mutual_information <= pred.entropy + 1e-5).all()
    assert pred.mutual_information.max() > 0  # head dropout makes the passes differ
    vols = pred.volumes(vol)
    assert all(v.geometry.matches(vol.geometry) and v.shape == vol.shape for v in vols.values())
    single = predict_volume(net, vol, (16, 32, 32), passes=1, device="cpu")
    # One deterministic pass has no spread between passes, so no epistemic part.
    assert np.allclose(single.mutual_information, 0.0) and single.estimator == "plain"
    assert np.allclose(single.probabilities, predict_volume(net, vol, (16, 32, 32), passes=1, device="cpu").probabilities)


def test_regions_are_ranked_by_summed_uncertainty():
    u = np.zeros((10, 20, 20), np.float32)
    u[1:3, 1:3, 1:3] = 0.9  # 8 voxels, sum 7.2
    u[5:8, 10:15, 10:15] = 0.7  # 75 voxels, sum 52.5
    u[9, 19, 19] = 1.0  # one voxel: below min_voxels
    geo = Geometry((2.0, 1.0, 1.0), (10.0, 0.0, 0.0))
    regions, rank_map = find_review_regions(u, threshold=0.5, min_voxels=2, geometry=geo)
    assert [r.voxel_count for r in regions] == [75, 8]
    assert regions[0].uncertainty_sum == pytest.approx(52.5, rel=1e-5)
    assert regions[0].centroid_ijk == pytest.approx((12.0, 12.0, 6.0))
    assert regions[0].bbox_min_ijk == (10, 10, 5) and regions[0].bbox_max_ijk == (14, 14, 7)
    assert regions[0].centroid_lps == pytest.approx((10.0 + 24.0, 12.0, 6.0))
    assert (rank_map == 1).sum() == 75 and (rank_map == 2).sum() == 8 and rank_map[9, 19, 19] == 0
    assert visited_mask(rank_map, [2]).sum() == 8 and visited_mask(rank_map, []).sum() == 0


def test_index_to_lps_uses_direction():
    geo = Geometry((1.0, 2.0, 3.0), (5.0, 5.0, 5.0), (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    assert geo.index_to_lps((1, 1, 1)) == pytest.approx((5.0 - 2.0, 5.0 + 1.0, 8.0))


def test_no_uncertainty_no_regions():
    regions, rank_map = find_review_regions(np.zeros((4, 4, 4)), threshold=0.2)
    assert regions == [] and not rank_map.any()
    with pytest.raises(ValueError):
        find_review_regions(np.zeros((4, 4)), threshold=0.2)

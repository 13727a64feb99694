"""Sliding-window MC inference in the image's geometry, and the review regions built from it."""

import numpy as np
import pytest
import torch

from SSLSegmentLib.data import contract
from SSLSegmentLib.data.regions import find_review_regions, visited_mask
from SSLSegmentLib.data.volume import Geometry, Volume
from SSLSegmentLib.ml.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from SSLSegmentLib.ml.inference import UNCERTAINTY_KINDS, Predictor, predict_volume
from SSLSegmentLib.ml.networks import build_network


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


def test_the_served_maps_are_the_contract_kinds_and_variance_only_on_request(tiny_net_config):
    """Which uncertainty maps exist has one owner (data.contract); inference adds the class variance, ML side only."""
    assert UNCERTAINTY_KINDS[:-1] == contract.UNCERTAINTY_KINDS and UNCERTAINTY_KINDS[-1] == "variance"
    torch.manual_seed(0)
    vol = Volume(np.random.default_rng(1).standard_normal((16, 32, 32)).astype(np.float32))
    pred = predict_volume(build_network(tiny_net_config), vol, (16, 32, 32), passes=2, device="cpu")
    assert list(pred.volumes(vol)) == ["label", "probability", *contract.UNCERTAINTY_KINDS]
    assert list(pred.volumes(vol, with_variance=True)) == ["label", "probability", *UNCERTAINTY_KINDS]
    with pytest.raises(ValueError, match="uncertainty kind"):
        pred.uncertainty("confidence")


def _checkpoint(net, config, patch) -> dict:
    return {"format": CHECKPOINT_FORMAT, "model": net.state_dict(), "network": config.to_dict(),
            "train_config": {"patch_size": list(patch)}}


def test_predictor_takes_the_checkpoints_patch_size_and_its_settings(tiny_net_config, tmp_path):
    """A Predictor from a checkpoint infers with the window the model was trained with; its settings are fixed at
    construction, and a call is predict_volume with those settings (or one overridden for that call)."""
    torch.manual_seed(0)
    net = build_network(tiny_net_config).eval()
    patch = (8, 16, 24)  # not TrainConfig's default, so a fallback would show
    path = save_checkpoint(_checkpoint(net, tiny_net_config, patch), tmp_path / "v0001.pt")
    vol = Volume(np.random.default_rng(2).standard_normal((20, 37, 29)).astype(np.float32), Geometry((0.8, 0.9, 2.0)))

    predictor = Predictor.from_checkpoint(path, device="cpu", version="v0001", passes=4, overlap=0.5, seed=3)
    assert predictor.patch_size == patch and predictor.version == "v0001"
    assert (predictor.passes, predictor.overlap) == (4, 0.5)
    got = predictor(vol)
    want = predict_volume(net, vol, patch, passes=4, overlap=0.5, seed=3, device="cpu")
    assert got.estimator == want.estimator == "head_mc" and got.passes == 4
    for name in ("label", "probabilities", "entropy", "mutual_information", "variance"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    plain = predictor(vol, passes=1)  # an override holds for that call only
    np.testing.assert_array_equal(plain.probabilities,
                                  predict_volume(net, vol, patch, passes=1, overlap=0.5, device="cpu").probabilities)
    assert plain.estimator == "plain" and predictor(vol).passes == 4
    same = Predictor.from_checkpoint(_checkpoint(net, tiny_net_config, patch), device="cpu", passes=4, overlap=0.5,
                                     seed=3)  # a checkpoint already loaded
    np.testing.assert_array_equal(same(vol).entropy, got.entropy)


def test_predictor_checks_its_settings_when_built(tiny_net_config):
    net = build_network(tiny_net_config)
    with pytest.raises(TypeError, match="unknown predict_volume setting"):
        Predictor(net, (16, 32, 32), device="cpu", pases=4)
    with pytest.raises(ValueError, match="patch_size"):
        Predictor(net, (16, 32), device="cpu")
    with pytest.raises(ValueError, match="passes"):
        Predictor(net, (16, 32, 32), passes=0, device="cpu")
    with pytest.raises(ValueError, match="overlap"):
        Predictor(net, (16, 32, 32), overlap=1.0, device="cpu")
    with pytest.raises(TypeError, match="unknown predict_volume setting"):
        Predictor(net, (16, 32, 32), device="cpu")(np.zeros((16, 32, 32), np.float32), patch_size=(8, 8, 8))
    with pytest.raises(ValueError, match="train_config.patch_size"):
        Predictor.from_checkpoint({**_checkpoint(net, tiny_net_config, (16, 32, 32)), "train_config": {}}, device="cpu")


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

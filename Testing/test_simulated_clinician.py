"""The simulated clinician's review plans on hand-built volumes: budgets, region order, same effort across strategies."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from SSLSegmentLib.data.regions import find_review_regions, visited_mask
from benchmarks.simulated_clinician import (
    STRATEGIES,
    correct_segmentation,
    plan_boundary,
    plan_oracle,
    plan_random,
    plan_review,
    plan_uncertainty,
    surface,
    voxel_budget,
)

SHAPE = (20, 24, 24)


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def _three_regions():
    """rank map with regions of 64 (rank 1), 27 (rank 2) and 8 (rank 3) voxels, and an uncertainty map that is
    highest in region 1 and rises along x inside region 2."""
    rank_map = np.zeros(SHAPE, np.int32)
    rank_map[_box(SHAPE, (2, 2, 2), (6, 6, 6))] = 1
    rank_map[_box(SHAPE, (10, 10, 10), (13, 13, 13))] = 2
    rank_map[_box(SHAPE, (15, 18, 18), (17, 20, 20))] = 3
    unc = np.zeros(SHAPE, np.float32)
    unc[rank_map == 1] = 0.9
    zz, yy, xx = np.indices(SHAPE)
    unc[rank_map == 2] = 0.6 + 0.01 * xx[rank_map == 2] + 0.001 * yy[rank_map == 2]
    unc[rank_map == 3] = 0.7
    return rank_map, unc


def test_voxel_budget():
    assert voxel_budget((10, 10, 10), 0.02) == 20
    assert voxel_budget((10, 10, 10), 0.0) == 0
    assert voxel_budget((3, 3, 3), 0.001) == 1
    with pytest.raises(ValueError, match="budget fraction"):
        voxel_budget((10, 10, 10), 1.5)


def test_uncertainty_plan_visits_regions_in_rank_order_and_stops_at_the_budget():
    rank_map, unc = _three_regions()
    plan = plan_uncertainty(rank_map, unc, budget=80)
    assert plan.spent == 80 and plan.effort == 80 and plan.budget == 80
    assert [p["rank"] for p in plan.pieces] == [1, 2]
    assert plan.pieces[0] == {"rank": 1, "voxels": 64, "partial": False}
    assert plan.pieces[1] == {"rank": 2, "voxels": 16, "partial": True}
    reviewed = plan.reviewed.astype(bool)
    # Region 1 whole, nothing outside regions 1-2, rank 3 untouched.
    assert (reviewed >= visited_mask(rank_map, [1]).astype(bool)).all()
    assert not (reviewed & ~visited_mask(rank_map, [1, 2]).astype(bool)).any()
    # The partial part of region 2 is its 16 most uncertain voxels.
    part = reviewed & (rank_map == 2)
    assert unc[part].min() >= unc[(rank_map == 2) & ~part].max()


def test_uncertainty_plan_with_a_large_budget_reviews_every_region_and_no_more():
    rank_map, unc = _three_regions()
    plan = plan_uncertainty(rank_map, unc, budget=1000)
    assert plan.spent == 64 + 27 + 8 == plan.effort
    assert np.array_equal(plan.reviewed.astype(bool), rank_map > 0)
    assert not any(p["partial"] for p in plan.pieces)


def test_uncertainty_plan_on_real_regions_matches_visited_mask():
    rng = np.random.default_rng(0)
    unc = ndimage.gaussian_filter(rng.random(SHAPE).astype(np.float32), 1.5)
    unc = (unc - unc.min()) / (unc.max() - unc.min())
    regions, rank_map = find_review_regions(unc, threshold=0.6, min_voxels=4)
    assert len(regions) >= 2
    budget = regions[0].voxel_count + regions[1].voxel_count
    plan = plan_uncertainty(rank_map, unc, budget)
    assert np.array_equal(plan.reviewed, visited_mask(rank_map, [1, 2]))


def test_random_plan_has_the_same_sizes_without_overlap_and_depends_on_the_seed():
    sizes = [64, 16, 5]
    a = plan_random(sizes, SHAPE, np.random.default_rng(1))
    b = plan_random(sizes, SHAPE, np.random.default_rng(1))
    c = plan_random(sizes, SHAPE, np.random.default_rng(2))
    assert a.sizes == sizes and a.spent == sum(sizes) == a.effort
    assert np.array_equal(a.reviewed, b.reviewed)
    assert not np.array_equal(a.reviewed, c.reviewed)
    # Each blob is compact: 64 voxels around one centre fit in a small ball, not scattered.
    comp, n = ndimage.label(a.reviewed, structure=np.ones((3, 3, 3)))
    assert n <= len(sizes)


def test_boundary_plan_centres_lie_on_the_predicted_surface():
    pred = _box(SHAPE, (5, 6, 6), (15, 18, 18)).astype(np.uint8)
    plan = plan_boundary([20, 20, 20], pred, np.random.default_rng(3))
    edge = surface(pred > 0)
    assert plan.spent == 60
    for p in plan.pieces:
        assert edge[tuple(p["centre_zyx"])]


def test_oracle_plan_takes_the_largest_error_components_first():
    truth = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    pred[_box(SHAPE, (1, 1, 1), (5, 5, 5))] = 1  # 64 false-positive voxels
    truth[_box(SHAPE, (10, 10, 10), (12, 12, 15))] = 1  # 20 missed voxels
    pred[_box(SHAPE, (16, 20, 20), (17, 22, 22))] = 1  # 4 false positives
    plan = plan_oracle(pred, truth, effort=74)
    errors = pred != truth
    assert plan.spent == 74
    assert [p["voxels"] for p in plan.pieces] == [64, 10]
    assert plan.pieces[1]["partial"]
    assert (errors[plan.reviewed > 0]).all()  # every reviewed voxel is an error
    # Effort above the error count: all errors, nothing else.
    full = plan_oracle(pred, truth, effort=500)
    assert np.array_equal(full.reviewed.astype(bool), errors)


def _case():
    """A blob-shaped truth, a prediction shifted by two voxels, uncertainty high along the predicted edge."""
    truth = np.zeros(SHAPE, np.uint8)
    zz, yy, xx = np.indices(SHAPE)
    truth[((zz - 10) / 6.0) ** 2 + ((yy - 12) / 7.0) ** 2 + ((xx - 12) / 7.0) ** 2 < 1] = 1
    pred = np.roll(truth, 2, axis=2)
    edge = ndimage.distance_transform_edt(pred == 0) + ndimage.distance_transform_edt(pred == 1)
    unc = np.exp(-0.5 * (edge - 0.5) ** 2).astype(np.float32)
    return pred, truth, unc


def test_every_strategy_spends_the_same_effort_and_correction_fixes_only_reviewed_errors():
    pred, truth, unc = _case()
    regions, rank_map = find_review_regions(unc, threshold=0.5, min_voxels=4)
    budget = voxel_budget(SHAPE, 0.02)
    plans = {s: plan_review(s, prediction=pred, uncertainty=unc, rank_map=rank_map, budget=budget, truth=truth,
                            rng=np.random.default_rng(0)) for s in STRATEGIES}
    effort = plans["uncertainty"].spent
    assert 0 < effort <= budget
    for s in ("random", "boundary"):
        assert plans[s].spent == effort
    assert plans["oracle"].spent == min(effort, int((pred != truth).sum()))
    assert plans["none"].spent == 0
    errors = pred != truth
    fixed = {}
    for s, plan in plans.items():
        corrected = correct_segmentation(pred, truth, plan.reviewed)
        m = plan.reviewed > 0
        assert np.array_equal(corrected[m], truth[m]) and np.array_equal(corrected[~m], pred[~m])
        fixed[s] = int(errors.sum() - (corrected != truth).sum())
        assert fixed[s] == int((errors & m).sum())
    # Uncertainty along the edge finds more errors than random blobs, the oracle the most.
    assert fixed["oracle"] >= fixed["uncertainty"] > fixed["random"]


def test_bad_arguments_are_refused():
    pred, truth, unc = _case()
    _, rank_map = find_review_regions(unc, threshold=0.5)
    with pytest.raises(ValueError, match="strategy must be one of"):
        plan_review("magic", prediction=pred, uncertainty=unc, rank_map=rank_map, budget=10)
    with pytest.raises(ValueError, match="needs the ground truth"):
        plan_review("oracle", prediction=pred, uncertainty=unc, rank_map=rank_map, budget=10)
    with pytest.raises(ValueError, match="differ"):
        correct_segmentation(pred, truth[:-1], np.zeros_like(pred))
    with pytest.raises(ValueError, match="differ in shape"):
        plan_uncertainty(rank_map, unc[:-1], 10)


def test_whole_case_labeling_fixes_everything_and_is_charged_its_targets_box():
    from benchmarks.simulated_clinician import WHOLE_CASE_MARGIN, plan_whole_case

    shape = (20, 30, 40)
    truth = np.zeros(shape, np.uint8)
    truth[8:12, 10:20, 15:25] = 1
    pred = np.zeros(shape, np.uint8)
    pred[9:13, 12:22, 15:20] = 1  # off by a little; its box reaches one slice further
    plan = plan_whole_case(pred, truth, margin=2)
    assert plan.strategy == "whole" and plan.reviewed.all()
    assert plan.spent == plan.effort == (13 - 8 + 4) * (22 - 10 + 4) * (25 - 15 + 4)  # box of both, 2 per side
    np.testing.assert_array_equal(correct_segmentation(pred, truth, plan.reviewed), truth)
    # Clipped to the volume, and the whole volume when there is nothing to find.
    edge = np.zeros(shape, np.uint8)
    edge[0, 0, 0] = 1
    assert plan_whole_case(edge, edge, margin=3).spent == 4 * 4 * 4
    assert plan_whole_case(np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)).spent == int(np.prod(shape))
    assert plan_whole_case(pred, truth).spent > plan.spent and WHOLE_CASE_MARGIN > 2
    with pytest.raises(ValueError, match="margin"):
        plan_whole_case(pred, truth, margin=-1)
    assert plan_review("whole", prediction=pred, uncertainty=np.zeros(shape, np.float32),
                       rank_map=np.zeros(shape, np.int32), budget=10, truth=truth).spent == plan_whole_case(pred, truth).spent

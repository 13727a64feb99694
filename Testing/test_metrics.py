"""Metrics against known answers and against an independent implementation (KD-tree on surface voxels)."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from SSLSegmentLib.ml.metrics import binary_metrics, dice, summarize


def _surface_points(mask, spacing):
    surface = mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))
    return np.argwhere(surface) * np.asarray(spacing)


def _reference(pred, truth, spacing):
    """Independent HD95 (max of directed 95th percentiles) and symmetric ASD."""
    sp, st = _surface_points(pred, spacing), _surface_points(truth, spacing)
    d_pt, _ = cKDTree(st).query(sp)
    d_tp, _ = cKDTree(sp).query(st)
    return max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), np.concatenate([d_pt, d_tp]).mean()


def _cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def test_shifted_cubes_have_known_dice_jaccard_and_distances():
    a = _cube((20, 20, 20), (5, 5, 5), (15, 15, 15))
    b = _cube((20, 20, 20), (5, 5, 7), (15, 15, 17))  # shifted by 2 voxels along x
    m = binary_metrics(b, a, spacing_zyx=(3.0, 1.0, 0.5))
    assert m.dice == pytest.approx(8 / 10)
    assert m.jaccard == pytest.approx(8 / 12)
    assert m.hd95_vox == pytest.approx(2.0)
    assert m.hd95_mm == pytest.approx(1.0)  # 2 voxels × 0.5 mm along x


def test_identical_masks_are_perfect():
    a = _cube((12, 12, 12), (2, 3, 4), (9, 10, 11))
    m = binary_metrics(a, a)
    assert (m.dice, m.jaccard, m.hd95_vox, m.asd_vox) == (1.0, 1.0, 0.0, 0.0)


def test_single_voxels_at_known_distance():
    a, b = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    a[5, 5, 2], b[5, 9, 5] = True, True  # 4 along y, 3 along x → 5 voxels
    m = binary_metrics(b, a, spacing_zyx=(1.0, 2.0, 2.0))
    assert m.dice == 0.0 and m.hd95_vox == pytest.approx(5.0) and m.asd_vox == pytest.approx(5.0)
    assert m.hd95_mm == pytest.approx(10.0) and m.asd_mm == pytest.approx(10.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_implementation_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    spacing = (2.0, 0.8, 0.8)
    truth = ndimage.gaussian_filter(rng.random((24, 28, 28)), 3) > 0.5
    pred = ndimage.binary_dilation(truth, iterations=1) ^ (ndimage.gaussian_filter(rng.random((24, 28, 28)), 2) > 0.56)
    m = binary_metrics(pred, truth, spacing_zyx=spacing)
    inter = (pred & truth).sum()
    assert m.dice == pytest.approx(2 * inter / (pred.sum() + truth.sum()))
    assert m.jaccard == pytest.approx(inter / (pred | truth).sum())
    hd, asd = _reference(pred, truth, spacing)
    assert m.hd95_mm == pytest.approx(hd, rel=0.02, abs=0.05)
    assert m.asd_mm == pytest.approx(asd, rel=0.02, abs=0.05)
    hd_v, asd_v = _reference(pred, truth, (1, 1, 1))
    assert m.hd95_vox == pytest.approx(hd_v, rel=0.02, abs=0.05)


def test_empty_prediction_reports_undefined_distances_and_summary_counts_them():
    truth = _cube((8, 8, 8), (2, 2, 2), (6, 6, 6))
    m = binary_metrics(np.zeros_like(truth), truth)
    assert m.dice == 0.0 and math.isnan(m.hd95_vox)
    s = summarize([m.to_dict(), binary_metrics(truth, truth).to_dict()])
    assert s["dice"]["mean"] == pytest.approx(0.5) and s["hd95_vox"]["n_undefined"] == 1 and s["hd95_vox"]["n"] == 1


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_the_one_dice_of_two_masks():
    """dice() is what validation, the benchmarks and the reports use; binary_metrics reports the same number."""
    truth = _cube((8, 8, 8), (2, 2, 2), (6, 6, 6))  # 64 voxels
    pred = _cube((8, 8, 8), (3, 2, 2), (7, 6, 6))  # shifted by one: 48 shared
    assert dice(pred, truth) == pytest.approx(2 * 48 / 128) == binary_metrics(pred, truth).dice
    assert dice(truth, truth) == 1.0 and dice(np.zeros_like(truth), truth) == 0.0
    assert dice(np.zeros_like(truth), np.zeros_like(truth)) == 1.0  # nothing to find, nothing found
    assert dice(2 * truth.astype(np.uint8), truth) == 1.0  # any nonzero value is foreground
    assert isinstance(dice(pred, truth), float)

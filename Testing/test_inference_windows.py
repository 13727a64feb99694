"""The inference window policy: roi="auto" takes the whole volume when it fits the voxel budget, the budget bounds it,
the training patch is the lower bound, explicit windows are used as given, and larger windows change the maps only
where the windows' borders were."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_NET
from SSLSegmentLib.ml import inference
from SSLSegmentLib.ml.inference import inference_window, predict_volume
from SSLSegmentLib.ml.networks import build_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATCH = (8, 16, 16)


def _image(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(**TINY_NET).eval()


def _tiling_cost(shape, window, patch, overlap=0.25):
    count = math.prod(inference._windows_along(d, w, overlap) for d, w in zip(shape, window))
    return count * (math.prod(window) + math.prod(patch))


def test_auto_takes_the_whole_volume_when_it_fits_and_stays_inside_the_image():
    patch = (32, 48, 48)
    assert inference_window((96, 128, 128), patch, 8, 1 << 22) == (96, 128, 128)
    assert inference_window((96, 128, 128), patch, 8, None) == (96, 128, 128)
    assert inference_window((40, 64, 80), patch, 8, 1 << 22) == (40, 64, 80)
    # Never below the training patch: a small volume is padded to the patch, as before.
    assert inference_window((10, 20, 30), patch, 8, 1 << 22) == patch
    for shape in [(44, 68, 81), (44, 72, 115), (90, 100, 130), (20, 100, 130), (88, 576, 576)]:
        roi = inference_window(shape, patch, 8, 1 << 22)
        # Inside the image (no padding beyond it) unless the image is smaller than the patch there.
        assert all(r <= max(p, d) for r, p, d in zip(roi, patch, shape))
        # Never a dearer tiling than the training patch's.
        assert _tiling_cost(shape, roi, patch) <= _tiling_cost(shape, patch, patch)


@pytest.mark.parametrize("shape", [(96, 128, 128), (88, 576, 576), (40, 300, 90), (33, 47, 200)])
@pytest.mark.parametrize("budget", [32 * 48 * 48, 1 << 18, 1 << 20, 1 << 22])
def test_the_budget_bounds_the_window_and_the_patch_bounds_it_below(shape, budget):
    patch = (32, 48, 48)
    roi = inference_window(shape, patch, 8, budget, overlap=0.25)
    assert all(r >= p for r, p in zip(roi, patch))
    assert all(r % 8 == 0 for r in roi)
    assert math.prod(roi) <= budget or roi == patch
    assert all(r <= max(p, d) for r, p, d in zip(roi, patch, shape))  # inside the image unless it is below the patch
    assert _tiling_cost(shape, roi, patch) <= _tiling_cost(shape, patch, patch)
    # A budget below the patch gives the patch.
    assert inference_window(shape, patch, 8, 1000) == patch


def test_predict_volume_uses_the_budget_and_divides_it_among_the_windows_of_a_batch(monkeypatch):
    seen = []

    from monai import inferers

    real = inferers.sliding_window_inference

    def spy(inputs, roi_size, sw_batch_size, *args, **kwargs):
        seen.append((tuple(roi_size), sw_batch_size))
        return real(inputs, roi_size, sw_batch_size, *args, **kwargs)

    monkeypatch.setattr(inferers, "sliding_window_inference", spy)
    net, image = _net(), _image((16, 24, 40))
    predict_volume(net, image, PATCH, passes=2, device="cpu")  # fits: one window, no stitching
    assert seen == []
    predict_volume(net, image, PATCH, passes=2, device="cpu", max_window_voxels=8 * 16 * 24)
    predict_volume(net, image, PATCH, passes=2, device="cpu", max_window_voxels=2 * 8 * 16 * 24, sw_batch_size=2)
    assert [math.prod(r) <= 8 * 16 * 24 for r, _ in seen] == [True, True] and seen[0][0] == seen[1][0]
    predict_volume(net, image, PATCH, passes=2, device="cpu", roi="patch")
    predict_volume(net, image, PATCH, passes=2, device="cpu", roi=(8, 8, 24))
    assert [r for r, _ in seen[2:]] == [PATCH, (8, 8, 24)]


def test_explicit_windows_are_honoured_and_patch_is_the_training_patch():
    net, image = _net(), _image((16, 24, 40))
    patch = predict_volume(net, image, PATCH, passes=4, device="cpu", seed=1, roi="patch")
    explicit = predict_volume(net, image, PATCH, passes=4, device="cpu", seed=1, roi=list(PATCH))
    np.testing.assert_array_equal(patch.probabilities, explicit.probabilities)
    np.testing.assert_array_equal(patch.mutual_information, explicit.mutual_information)
    auto = predict_volume(net, image, PATCH, passes=4, device="cpu", seed=1)
    assert np.abs(auto.mutual_information - patch.mutual_information).max() > 1e-4  # other windows, other masks


@pytest.mark.parametrize("shape", [(16, 24, 40), (6, 12, 40)])  # a multiple of the network's, and one below the patch
def test_one_window_without_stitching_equals_monais_one_window(monkeypatch, shape):
    """The one-window path (no stitching buffers) gives what MONAI's sliding window gives for the same window."""
    from monai.inferers import sliding_window_inference

    net, image = _net(), _image(shape)
    fast = predict_volume(net, image, PATCH, passes=4, device="cpu", seed=5)

    def monai_window(x, roi, predictor, cval, dev, out_dev):
        return sliding_window_inference(x, roi, 1, predictor, overlap=0.25, mode="gaussian", padding_mode="constant",
                                        cval=cval, sw_device=dev, device=out_dev)

    monkeypatch.setattr(inference, "_one_window", monai_window)
    slow = predict_volume(net, image, PATCH, passes=4, device="cpu", seed=5)
    for kind in ("probabilities", "entropy", "mutual_information", "variance"):
        np.testing.assert_allclose(getattr(fast, kind), getattr(slow, kind), atol=1e-5)
    np.testing.assert_array_equal(fast.label, slow.label)


class _Conv2(nn.Module):
    """Two 3×3×3 convolutions at stride 1: translation-equivariant, receptive radius 2."""

    radius = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 2, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def _window_interior(shape, roi, overlap, radius) -> np.ndarray:
    """Voxels at least `radius` from every border of every window that covers them (image borders excepted: there
    the window and the whole volume see the same zero padding)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(shape, roi, 3, (overlap,) * 3)
    inside = np.ones(shape, bool)
    for window in dense_patch_slices(shape, roi, interval):
        near = np.zeros(shape, bool)
        for axis, s in enumerate(window):
            index = [slice(w.start, w.stop) for w in window]
            if s.start > 0:
                index[axis] = slice(s.start, s.start + radius)
                near[tuple(index)] = True
            if s.stop < shape[axis]:
                index[axis] = slice(s.stop - radius, s.stop)
                near[tuple(index)] = True
        inside &= ~near
    return inside


def test_larger_windows_change_a_convolutional_net_only_near_the_window_borders():
    """For a translation-equivariant network in eval mode a window's output at a voxel equals the whole volume's when
    the voxel is farther from the window's borders than the receptive radius; the blend of such windows is the same
    value. (A strided UNet is equivariant only to shifts by its stride product, so there the two agree in
    distribution, not voxel by voxel; the validation benchmark measures that.)"""
    net, shape = _Conv2(), (24, 48, 48)  # a multiple of the window: no padding for either
    image = _image(shape, seed=3)
    small = predict_volume(net, image, (12, 24, 24), passes=1, device="cpu", roi="patch", overlap=0.5)
    whole = predict_volume(net, image, (12, 24, 24), passes=1, device="cpu")
    interior = _window_interior(shape, (12, 24, 24), 0.5, net.radius)
    assert interior.mean() > 0.3
    np.testing.assert_allclose(small.probabilities[:, interior], whole.probabilities[:, interior], atol=1e-5)
    np.testing.assert_allclose(small.entropy[interior], whole.entropy[interior], atol=1e-5)
    assert np.abs(small.probabilities - whole.probabilities).max() > 1e-4  # the borders do differ

"""Uncertainty estimators: head MC = full MC (exactness), each estimator's maps, fallbacks and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_NET
from SSLSegmentLib.ml.inference import UNCERTAINTY_KINDS, Prediction, predict_volume
from SSLSegmentLib.ml.networks import build_network
from SSLSegmentLib.ml.uncertainty import (
    DEFAULT_ESTIMATOR,
    FlipEstimator,
    HeadDropoutMasks,
    HeadMCDropoutEstimator,
    MCDropoutEstimator,
    PlainEstimator,
    resolve_estimator,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    net = build_network(**{**TINY_NET, **overrides})
    # Non-trivial BatchNorm statistics, so eval mode is not the identity normalisation of a fresh network.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _image(shape=(12, 16, 24), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


WINDOW = (8, 16, 16)  # window-level tests need no more


def _window(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 1, *WINDOW)).astype(np.float32))


class _Pointwise(nn.Module):
    """A 1×1×1 conv: its output at a voxel depends on that voxel alone, so it commutes with flips."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return self.conv(x)


class _Shifted(nn.Module):
    """Looks at the neighbour along x: flipping the input does not simply flip its output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, (1, 1, 3), padding=(0, 0, 1))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, 0, 0, 0, 2] = 3.0
            self.conv.bias.zero_()

    def forward(self, x):
        return {"logits": self.conv(x)}


# -- exactness: head MC gives full MC's samples --------------------------------------------------------------------
@torch.inference_mode()
def test_head_mc_samples_equal_full_mc_samples_for_every_arrangement():
    net = _net()
    x = _window()
    runs = {}
    for label, est in {
        "full_sequential": MCDropoutEstimator(net, passes=4, seed=11, pass_batch=1),
        "full_batched": MCDropoutEstimator(net, passes=4, seed=11, pass_batch=None),
        "full_chunks_of_3": MCDropoutEstimator(net, passes=4, seed=11, pass_batch=3),
        "head_folded": HeadMCDropoutEstimator(net, passes=4, seed=11),
        "head_generic_sequential": HeadMCDropoutEstimator(net, passes=4, seed=11, pass_batch=1, fold=False),
        "head_generic_batched": HeadMCDropoutEstimator(net, passes=4, seed=11, pass_batch=None, fold=False),
    }.items():
        with est.activate():
            runs[label] = (est.samples(x), est.samples(x))  # windows 0-1, then windows 2-3
    assert HeadMCDropoutEstimator(net, passes=4).fold  # the fast path is the one compared
    ref_a, ref_b = runs["full_sequential"]
    assert ref_a.shape == (4, 2, 2, *WINDOW)
    # The passes really are stochastic (otherwise equality would prove nothing) ...
    assert (ref_a[0] - ref_a[1]).abs().max() > 1e-3
    # ... and the masks belong to the window: the same input in windows 2-3 gets other masks.
    assert (ref_a - ref_b).abs().max() > 1e-3
    for label, (a, b) in runs.items():
        torch.testing.assert_close(a, ref_a, atol=2e-5, rtol=1e-4, msg=label)
        torch.testing.assert_close(b, ref_b, atol=2e-5, rtol=1e-4, msg=label)


@torch.inference_mode()
def test_head_mc_samples_follow_the_network_head_dropout():
    """Each head-MC sample is SegNet.head on the trunk's features with some Dropout3d mask of the layer's p."""
    net = _net()
    x = _window(batch=1)
    est = HeadMCDropoutEstimator(net, passes=8, seed=5)
    with est.activate():
        samples = est.samples(x)
    feats = net.features(x)
    masks = HeadDropoutMasks(net.head_dropout.p, feats.shape[1], seed=5).window(0, 8)
    for t in range(8):
        expected = net.seg_head(feats * masks[t].view(1, -1, 1, 1, 1)).softmax(1)
        torch.testing.assert_close(samples[t], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("balanced", [True, False])
def test_head_dropout_masks_have_the_layer_distribution(balanced):
    masks = HeadDropoutMasks(0.5, 16, seed=3, balanced=balanced).windows(0, 200, 8)  # (T, windows, F)
    assert masks.shape == (8, 200, 16)
    assert set(torch.unique(masks).tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    dropped = (masks == 0).float()
    # Every pass's mask is a Dropout3d mask: each channel dropped with probability p.
    assert (dropped.mean((1, 2)) - 0.5).abs().max() < 0.03
    assert abs(float(masks.mean()) - 1.0) < 0.02  # expectation preserved
    per_channel = dropped.sum(0)  # (windows, F): in how many of the 8 passes each channel was dropped
    if balanced:
        assert (per_channel == 4).all()  # exactly p·T
    else:
        assert per_channel.min() < 4 < per_channel.max()
    again = HeadDropoutMasks(0.5, 16, seed=3, balanced=balanced).windows(5, 3, 8)
    torch.testing.assert_close(again, masks[:, 5:8])  # a window's masks depend on (seed, window) only
    other = HeadDropoutMasks(0.5, 16, seed=4, balanced=balanced).windows(0, 200, 8)
    assert not torch.equal(other, masks)


def test_balanced_masks_with_fractional_counts_keep_the_probability():
    masks = HeadDropoutMasks(0.3, 16, seed=1).windows(0, 400, 8)  # p·T = 2.4 drops per channel
    per_channel = (masks == 0).float().sum(0)
    assert set(torch.unique(per_channel).tolist()) == {2.0, 3.0}
    assert abs(float(per_channel.mean()) - 2.4) < 0.05
    assert ((masks == 0).float().mean((1, 2)) - 0.3).abs().max() < 0.03


def test_head_mc_volume_equals_full_mc_volume_across_sliding_windows():
    net = _net()
    image = _image((16, 24, 40))  # (8, 16, 16) windows: 3 × 2 × 3 overlapping windows
    head = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="head_mc", seed=2, roi=WINDOW)
    variants = [
        predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="mc_dropout", seed=2, pass_batch=1,
                       roi=WINDOW),
        predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="mc_dropout", seed=2, pass_batch=None,
                       sw_batch_size=3, roi=WINDOW),
    ]
    assert head.estimator == "head_mc" and head.passes == 4
    assert head.mutual_information.max() > 1e-3
    for full in variants:
        assert full.estimator == "mc_dropout"
        np.testing.assert_allclose(full.probabilities, head.probabilities, atol=1e-5)
        np.testing.assert_allclose(full.entropy, head.entropy, atol=1e-5)
        np.testing.assert_allclose(full.mutual_information, head.mutual_information, atol=1e-5)
        np.testing.assert_allclose(full.variance, head.variance, atol=1e-5)
    other_seed = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="head_mc", seed=3, roi=WINDOW)
    assert np.abs(other_seed.mutual_information - head.mutual_information).max() > 1e-4
    # The default windows (here one window of the whole volume) keep head MC exact too.
    whole_head = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="head_mc", seed=2)
    whole_full = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="mc_dropout", seed=2)
    assert whole_head.mutual_information.max() > 1e-3
    for kind in ("probabilities", "entropy", "mutual_information", "variance"):
        np.testing.assert_allclose(getattr(whole_full, kind), getattr(whole_head, kind), atol=1e-5)


@torch.inference_mode()
def test_head_mc_layout_settings_give_the_same_statistics():
    """The trunk's memory format and the voxel blocks of the folded passes are speed settings, not results."""
    net = _net()
    x = _window()
    runs = {}
    for label, kwargs in {"contiguous_whole": dict(channels_last=False, voxel_block=None),
                          "channels_last_blocks": dict(channels_last=True, voxel_block=100),  # 100 ∤ the voxels
                          "device_defaults": {}}.items():
        est = HeadMCDropoutEstimator(net, passes=4, seed=11, **kwargs)
        with est.activate():
            runs[label] = est(x)
    ref = runs["contiguous_whole"]
    assert ref.shape == (2, 5, *WINDOW) and ref.is_contiguous()
    for label, got in runs.items():
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=label)
    with pytest.raises(ValueError, match="voxel_block"):
        HeadMCDropoutEstimator(net, voxel_block=0)
    with pytest.raises(ValueError, match="channels_last"):
        HeadMCDropoutEstimator(net, channels_last="yes")
    with pytest.raises(RuntimeError, match="activate"):
        HeadMCDropoutEstimator(net)(x)
    plain = {}
    for channels_last in (False, True):
        est = PlainEstimator(net, channels_last=channels_last)
        with est.activate():
            plain[channels_last] = est(x)
    torch.testing.assert_close(plain[True], plain[False], atol=1e-5, rtol=1e-4)
    # The same setting through predict_volume, over overlapping windows.
    image = _image((16, 24, 40))
    a, b = (predict_volume(net, image, WINDOW, passes=4, device="cpu", roi=WINDOW, channels_last=cl) for cl in (True, False))
    for kind in ("probabilities", "entropy", "mutual_information", "variance"):
        np.testing.assert_allclose(getattr(a, kind), getattr(b, kind), atol=1e-5)


@pytest.mark.parametrize("estimator", ["head_mc", "plain"])
def test_a_map_leaves_the_model_as_it_was_and_trainable(estimator):
    """The map runs on an inference copy: the caller's network (a trainer's student, say) keeps its parameters,
    their layout, and can still be trained after predict_volume's inference mode."""
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    predict_volume(net, _image(), WINDOW, passes=4, device="cpu", estimator=estimator)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous() and not v.is_inference(), k
    net.train()
    net(torch.from_numpy(_image())[None, None])["logits"].sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_the_inference_copy_is_reused_until_the_weights_change():
    """Validation maps every few hundred steps: the copy is rebuilt only when a parameter or buffer changed, and a
    map after a training step is the new network's, never the stale copy's."""
    from SSLSegmentLib.ml.uncertainty.estimators import _cached_inference_copy

    net = _net()
    first = _cached_inference_copy(net, True)
    assert _cached_inference_copy(net, True) is first
    assert _cached_inference_copy(net, False) is not first  # another layout, another copy
    image = _image()
    before = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="head_mc")
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    net(torch.from_numpy(image)[None, None])["logits"][:, 1].mean().backward()
    opt.step()
    net.eval()
    assert _cached_inference_copy(net, True) is not first
    after = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="head_mc")
    fresh = _net()
    fresh.load_state_dict(net.state_dict())
    expected = predict_volume(fresh.eval(), image, WINDOW, passes=4, device="cpu", estimator="head_mc")
    assert np.abs(after.probabilities - before.probabilities).max() > 1e-3  # the step changed the network
    np.testing.assert_allclose(after.probabilities, expected.probabilities, atol=1e-6)


# -- what the maps mean --------------------------------------------------------------------------------------------
@torch.inference_mode()
def test_maps_are_the_documented_functions_of_the_samples():
    """One window covering the volume: entropy, MI and variance computed by hand from the T samples."""
    net = _net()
    image = _image(WINDOW, seed=4)
    pred = predict_volume(net, image, WINDOW, passes=8, device="cpu", estimator="head_mc", seed=9)
    est = HeadMCDropoutEstimator(net, passes=8, seed=9)
    with est.activate():
        s = est.samples(torch.from_numpy(image)[None, None])[:, 0].double()  # (T, C, z, y, x)
    mean = s.mean(0)
    h = lambda p: -(p * torch.log(p.clamp_min(1e-12))).sum(0)  # noqa: E731
    np.testing.assert_allclose(pred.probabilities, mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.entropy, (h(mean) / math.log(2)).numpy(), atol=1e-5)
    mi = (h(mean) - torch.stack([h(p) for p in s]).mean(0)) / math.log(2)
    np.testing.assert_allclose(pred.mutual_information, mi.clamp_min(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.variance, (4 * s.var(0, unbiased=False)).numpy(), atol=1e-5)
    assert pred.label.dtype == np.uint8
    np.testing.assert_array_equal(pred.label, mean.argmax(0).numpy())


@pytest.mark.parametrize("estimator", ["plain", "mc_dropout", "head_mc", "flips"])
def test_every_estimator_gives_maps_in_unit_range(estimator):
    net = _net()
    image = _image((12, 16, 24))
    pred = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator=estimator)
    assert isinstance(pred, Prediction) and pred.estimator == estimator
    assert pred.probabilities.shape == (2, *image.shape) and pred.label.shape == image.shape
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    for kind in UNCERTAINTY_KINDS:
        u = pred.uncertainty(kind)
        assert u.shape == image.shape and u.dtype == np.float32
        assert u.min() >= 0.0 and u.max() <= 1.0
    assert (pred.mutual_information <= pred.entropy + 1e-6).all()  # the epistemic part never exceeds the total
    if estimator == "plain":
        assert pred.passes == 1 and not pred.mutual_information.any() and not pred.variance.any()
    else:
        assert pred.passes == 4 and pred.mutual_information.max() > 1e-4


def test_flips_undo_the_flip_before_averaging():
    image = _image(seed=5)
    pointwise = _Pointwise(seed=1)
    plain = predict_volume(pointwise, image, WINDOW, passes=1, device="cpu")
    flips = predict_volume(pointwise, image, WINDOW, passes=8, device="cpu", estimator="flips")
    # A flip-equivariant model gives 8 identical flipped-back predictions: same as one pass, no disagreement.
    np.testing.assert_allclose(flips.probabilities, plain.probabilities, atol=1e-5)
    assert flips.mutual_information.max() < 1e-5
    shifted = predict_volume(_Shifted(), image, WINDOW, passes=2, device="cpu", estimator="flips", flip_axes=(2,))
    assert shifted.mutual_information.max() > 0.05  # x-flip changes which neighbour it sees


@torch.inference_mode()
def test_flip_samples_are_predictions_of_flipped_inputs():
    model = _Shifted()
    x = _window(batch=1)
    for pass_batch in (1, None):
        est = FlipEstimator(model, passes=4, pass_batch=pass_batch, axes=(1, 2))
        with est.activate():
            s = est.samples(x)
        for t, dims in enumerate([(), (3,), (4,), (3, 4)]):
            flipped = x.flip(dims) if dims else x
            expected = model(flipped)["logits"].softmax(1)
            expected = expected.flip(dims) if dims else expected
            torch.testing.assert_close(s[t], expected, atol=1e-6, rtol=1e-5)


def test_ensemble_averages_the_model_versions():
    image = _image(seed=6)
    a, b = _Pointwise(seed=1), _Pointwise(seed=2)
    pa = predict_volume(a, image, WINDOW, passes=1, device="cpu")
    pb = predict_volume(b, image, WINDOW, passes=1, device="cpu")
    ens = predict_volume([a, b], image, WINDOW, device="cpu")
    assert ens.estimator == "ensemble" and ens.passes == 2
    np.testing.assert_allclose(ens.probabilities, (pa.probabilities + pb.probabilities) / 2, atol=1e-5)
    assert ens.mutual_information.max() > 1e-3
    same = predict_volume([a, a], image, WINDOW, device="cpu", estimator="ensemble")
    assert same.mutual_information.max() < 1e-5


# -- defaults, compatibility, errors -------------------------------------------------------------------------------
def test_default_estimator_and_fallbacks():
    head = _net()
    assert resolve_estimator(head) == DEFAULT_ESTIMATOR == "head_mc"
    assert predict_volume(head, _image(), WINDOW, device="cpu").estimator == DEFAULT_ESTIMATOR
    trunk = _net(dropout_placement="trunk")
    assert resolve_estimator(trunk) == "mc_dropout"  # head MC would be wrong here: the trunk is stochastic
    assert resolve_estimator(_net(dropout=0.0)) == "flips"  # no dropout at all
    assert resolve_estimator(head, "mc_dropout", passes=1) == "plain"
    with pytest.raises(ValueError, match="confined to the segmentation head"):
        resolve_estimator(trunk, "head_mc")
    with pytest.raises(ValueError, match="needs a network with dropout"):
        resolve_estimator(_net(dropout=0.0), "mc_dropout")


def test_trunk_dropout_full_mc_is_seeded_and_leaves_the_callers_rng_alone():
    net = _net(dropout_placement="both")
    image = _image((8, 16, 24))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = predict_volume(net, image, WINDOW, passes=3, device="cpu", estimator="mc_dropout", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    b = predict_volume(net, image, WINDOW, passes=3, device="cpu", estimator="mc_dropout", seed=4)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    c = predict_volume(net, image, WINDOW, passes=3, device="cpu", estimator="mc_dropout", seed=5)
    assert np.abs(a.probabilities - c.probabilities).max() > 1e-4
    assert not net.training and all(not m.training for m in net.modules())  # eval mode restored


def test_backward_compatible_call_and_deterministic_single_pass():
    net = _net()
    image = _image()
    pred = predict_volume(net, image, WINDOW, passes=8, overlap=0.25, device="cpu")
    assert isinstance(pred, Prediction) and pred.passes == 8
    one = predict_volume(net, image, WINDOW, passes=1, overlap=0.5, device="cpu")
    again = predict_volume(net, image, WINDOW, passes=1, overlap=0.5, device="cpu")
    np.testing.assert_array_equal(one.probabilities, again.probabilities)
    assert one.estimator == "plain"
    # Positional arguments of the original signature still line up.
    pos = predict_volume(net, image, WINDOW, 1, 0.5, "cpu", 2, 0)
    np.testing.assert_allclose(pos.probabilities, one.probabilities, atol=1e-6)


def test_windows_per_batch_change_the_speed_not_the_maps():
    net = _net()
    image = _image((16, 24, 40))
    auto = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="head_mc", seed=3,
                          roi=WINDOW)  # "auto": 1 on a CPU
    four = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="head_mc", seed=3, sw_batch_size=4,
                          roi=WINDOW)
    np.testing.assert_allclose(four.probabilities, auto.probabilities, atol=1e-5)
    np.testing.assert_allclose(four.entropy, auto.entropy, atol=1e-5)
    for bad in (0, "four", 1.5):
        with pytest.raises(ValueError, match="sw_batch_size"):
            predict_volume(net, image, WINDOW, passes=1, device="cpu", sw_batch_size=bad)


def test_bfloat16_autocast_stays_close_to_float32():
    net = _net()
    image = _image()
    ref = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="head_mc")
    low = predict_volume(net, image, WINDOW, passes=4, device="cpu", estimator="head_mc", amp=True)
    assert low.probabilities.dtype == np.float32
    assert np.abs(low.probabilities - ref.probabilities).max() < 0.05
    assert 0.0 <= low.entropy.min() and low.entropy.max() <= 1.0


def test_volumes_keep_the_geometry_and_optional_variance():
    from SSLSegmentLib.data.volume import Geometry, Volume

    image = Volume(_image(), Geometry(spacing=(0.8, 0.8, 1.5), origin=(1.0, 2.0, 3.0)))
    pred = predict_volume(_net(), image, WINDOW, passes=4, device="cpu")
    vols = pred.volumes(image)
    assert set(vols) == {"label", "probability", "entropy", "mutual_information"}
    vols = pred.volumes(image, with_variance=True)
    assert vols["variance"].geometry == image.geometry
    np.testing.assert_array_equal(vols["variance"].array, pred.variance.max(0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"passes": 0}, "passes must be >= 1"),
        ({"overlap": 1.0}, "overlap"),
        ({"estimator": "bayes"}, "estimator must be one of"),
        ({"estimator": "ensemble"}, "at least 2 model"),
        ({"estimator": "flips", "passes": 9}, "too many"),
        ({"estimator": "flips", "flip_axes": (3,)}, "flip axes"),
        ({"pass_batch": 0}, "pass_batch"),
        ({"temperature": -1.0}, "temperature"),
        ({"roi": "whole"}, "roi must be"),
        ({"roi": (8, 16)}, "roi must be"),
        ({"max_window_voxels": 0}, "max_window_voxels"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        predict_volume(_net(), _image(), WINDOW, device="cpu", **kwargs)


def test_bad_images_get_clear_errors():
    net = _net()
    with pytest.raises(ValueError, match="3D volume"):
        predict_volume(net, np.zeros((32, 32), np.float32), WINDOW, device="cpu")
    bad = _image()
    bad[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predict_volume(net, bad, WINDOW, device="cpu")
    with pytest.raises(ValueError, match="at least 2 model"):
        predict_volume([net], _image(), WINDOW, device="cpu")
    with pytest.raises(ValueError, match="only the 'ensemble'"):
        predict_volume([net, net], _image(), WINDOW, device="cpu", estimator="head_mc")

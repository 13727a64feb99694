"""NetworkConfig options: the default network ends without MONAI's top residual unit (the cheaper trunk), the unit
stays available, checkpoints written with it still load, head MC stays exact."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from conftest import TINY_NET
from SSLSegmentLib.ml.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint, save_checkpoint
from SSLSegmentLib.ml.inference import predict_volume
from SSLSegmentLib.ml.networks import FastPReLU, NetworkConfig, build_network, inference_copy
from SSLSegmentLib.ml.uncertainty import HeadMCDropoutEstimator, MCDropoutEstimator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(**overrides) -> nn.Module:
    torch.manual_seed(0)
    net = build_network(**{**TINY_NET, **overrides})
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is not the identity normalisation
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_the_default_drops_the_top_residual_unit():
    cfg = NetworkConfig()
    assert cfg.top_res_unit is False and cfg.to_dict()["top_res_unit"] is False and cfg.drops_top_unit
    net = build_network(cfg)
    top = net.trunk.model[2]
    assert isinstance(top, Convolution) and top.is_transposed
    assert isinstance(net.feature_act, nn.Identity)


def test_with_the_top_unit_the_trunk_ends_in_a_residual_unit_and_an_activation():
    with_unit, without = build_network(**TINY_NET, top_res_unit=True), build_network(**TINY_NET)
    top = with_unit.trunk.model[2]
    assert isinstance(top, nn.Sequential) and isinstance(top[1], ResidualUnit)
    assert isinstance(with_unit.feature_act, nn.PReLU)
    top = without.trunk.model[2]
    assert isinstance(top, Convolution) and top.is_transposed
    assert isinstance(top.adn.A, nn.PReLU) and isinstance(top.adn.N, nn.BatchNorm3d)  # already activated ...
    assert isinstance(without.feature_act, nn.Identity)  # ... so no second activation
    n_with = sum(p.numel() for p in with_unit.parameters())
    n_without = sum(p.numel() for p in without.parameters())
    assert n_without < n_with
    x = torch.randn(2, 1, 8, 16, 16)
    out = without(x)
    assert out["logits"].shape == (2, 2, 8, 16, 16) and out["features"].shape == (2, TINY_NET["features"], 8, 16, 16)
    out["logits"].sum().backward()
    assert all(p.grad is not None for p in without.parameters())


@pytest.mark.parametrize("kwargs", [{"num_res_units": 0}, {"arch": "vnet"}])
def test_networks_without_a_top_unit_keep_their_feature_activation(kwargs):
    # Nothing to drop: MONAI's top up-sampling is a bare convolution without residual units, and VNet has no unit.
    cfg = NetworkConfig(**{**TINY_NET, **kwargs})
    assert not cfg.drops_top_unit
    net = build_network(cfg).eval()
    assert isinstance(net.feature_act, nn.PReLU)
    size = 16 if cfg.arch == "vnet" else 8
    out = net(torch.randn(1, 1, size, 16, 16))
    assert out["logits"].shape == (1, 2, size, 16, 16)


def test_a_bad_top_res_unit_setting_gets_a_clear_error():
    with pytest.raises(ValueError, match="must be a bool"):
        NetworkConfig(**{**TINY_NET, "top_res_unit": "no"})


def test_a_checkpoint_without_the_field_builds_the_network_it_was_trained_with(tmp_path):
    net = build_network(**TINY_NET, top_res_unit=True)  # the network every checkpoint had before the option
    old = {k: v for k, v in net.config.to_dict().items() if k != "top_res_unit"}  # written before the option existed
    rebuilt, _ = model_from_checkpoint({"network": old, "model": net.state_dict()})
    assert rebuilt.config.top_res_unit is True
    path = save_checkpoint({"format": CHECKPOINT_FORMAT, "network": old, "model": net.state_dict()}, tmp_path / "old.pt")
    assert load_checkpoint(path)["network"]["top_res_unit"] is True  # fine-tuning reads the same network
    light = build_network(**TINY_NET)
    again, _ = model_from_checkpoint({"network": light.config.to_dict(), "model": light.state_dict()})
    assert again.config.top_res_unit is False


@pytest.mark.parametrize("features", [2, TINY_NET["features"]])
@torch.inference_mode()
def test_head_mc_stays_exact_without_the_top_unit(features):
    net = _net(top_res_unit=False, features=features)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 1, 8, 16, 16)).astype(np.float32))
    full, head = MCDropoutEstimator(net, passes=4, seed=11, pass_batch=1), HeadMCDropoutEstimator(net, passes=4, seed=11)
    with full.activate():
        ref = full.samples(x)
    with head.activate():
        got = head.samples(x)
    assert (ref[0] - ref[1]).abs().max() > 1e-3 or (ref[0] - ref[2]).abs().max() > 1e-3  # really stochastic
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    image = np.random.default_rng(2).standard_normal((16, 24, 40)).astype(np.float32)
    a = predict_volume(net, image, (8, 16, 16), passes=4, device="cpu", estimator="head_mc", seed=2)
    b = predict_volume(net, image, (8, 16, 16), passes=4, device="cpu", estimator="mc_dropout", seed=2, pass_batch=1)
    assert a.estimator == "head_mc"
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    np.testing.assert_allclose(a.mutual_information, b.mutual_information, atol=1e-5)


def test_the_benchmark_network_option_is_checked_and_applied():
    from benchmarks.ssl_methods import PROFILES, network_options, with_network_options

    config = PROFILES["la-quick"].config
    args = argparse.Namespace(network=["features=8", "top_res_unit=true"])
    opts = network_options(args)
    assert opts == {"features": 8, "top_res_unit": True}
    out = with_network_options(config, opts)
    assert out["network"] == {**config["network"], "features": 8, "top_res_unit": True}
    assert config["network"]["features"] == 16 and config["network"]["top_res_unit"] is False  # the profile untouched
    assert with_network_options(config, {}) is config
    with pytest.raises(ValueError, match="--network"):
        with_network_options(config, {"no_such_field": 1})
    with pytest.raises(ValueError, match="must be a bool"):
        with_network_options(config, {"top_res_unit": "maybe"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        network_options(argparse.Namespace(network=["features"]))


def _prelu_slopes(net: nn.Module) -> None:
    """Distinct PReLU slopes, so an activation dropped or applied twice would show."""
    with torch.no_grad():
        for i, m in enumerate(m for m in net.modules() if isinstance(m, nn.PReLU)):
            m.weight.fill_(0.05 + 0.03 * i)


@pytest.mark.parametrize("overrides", [{}, {"top_res_unit": True}, {"arch": "vnet", "features": 4}],
                         ids=["default", "top-unit", "vnet"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_copy_computes_the_same_function_and_leaves_the_network_alone(overrides, channels_last):
    net = _net(**overrides)
    _prelu_slopes(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    shape = (1, 1, 16, 16, 32) if overrides.get("arch") == "vnet" else (1, 1, 8, 16, 24)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal(shape).astype(np.float32))
    with torch.inference_mode():
        ref = net(x)["logits"]
        fast = inference_copy(net, channels_last)
        got = fast(x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x)["logits"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    if overrides.get("arch") != "vnet":  # MONAI UNet blocks: the norms are folded away
        assert not any(isinstance(m, nn.BatchNorm3d) for m in fast.modules())
        assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    # The original keeps its weights and layout and still trains (the copy was made outside inference mode).
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous(), k
    net.train()
    net(x)["logits"].sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_the_cpu_prelu_gives_torchs_gradients_and_keeps_the_checkpoint_layout():
    net = _net()
    _prelu_slopes(net)
    fast = [m for m in net.modules() if isinstance(m, nn.PReLU)]
    assert fast and all(type(m) is FastPReLU for m in fast if m.num_parameters == 1)
    plain = build_network(**TINY_NET)
    for m in plain.modules():  # the same network with torch's own PReLU
        if type(m) is FastPReLU:
            m.__class__ = nn.PReLU
    plain.load_state_dict(net.state_dict())  # strict: the same keys both ways, or it raises
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 1, 8, 16, 24)).astype(np.float32))
    y = torch.from_numpy(np.random.default_rng(6).integers(0, 2, (2, 8, 16, 24)))
    grads = []
    for model in (net, plain):
        model.train()
        torch.manual_seed(1)  # the same head-dropout mask
        xi = x.clone().requires_grad_(True)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xi)["logits"], y).backward()
        grads.append({"input": xi.grad, **{k: p.grad for k, p in model.named_parameters()}})
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4, msg=k)
    assert any("A.weight" in k and grads[0][k].abs().item() > 0 for k in grads[0])  # the slopes do learn

"""Low-confidence consistency + class separation on hand-built tensors, checkpointed prototypes, a short training run."""

import math

import pytest
import torch

from conftest import TINY_NET, assert_learned, train_tiny
from SSLSegmentLib.ml.methods import get_method
from SSLSegmentLib.ml.methods.lcc import LowConfidenceConsistency
from SSLSegmentLib.ml.checkpoint import load_checkpoint


def _v(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).view(1, 1, 1, 1, -1)


def _features(vectors) -> torch.Tensor:
    """[(f1, f2), ...] per voxel → (1, 2, 1, 1, N)."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 2, 1, 1, -1)


def test_confidence_masks_split_unknown_voxels_at_gamma():
    lcc = LowConfidenceConsistency(confidence=0.9)
    t = _v([0.5, 0.95, 0.05, 0.85, 0.6])
    probs = torch.cat([1 - t, t], 1)
    unknown = _v([1.0, 1.0, 1.0, 1.0, 0.0])
    low, high = lcc.confidence_masks(probs, unknown)
    assert low.flatten().tolist() == [1, 0, 0, 1, 0]  # confidence 0.5 and 0.85 < 0.9; voxel 4 is labeled
    assert high.flatten().tolist() == [0, 1, 1, 0, 0]


def test_class_means_and_ema_prototype_update():
    lcc = LowConfidenceConsistency(prototype_momentum=0.5)
    feats = _features([(2.0, 0.0), (0.0, 3.0), (0.0, 1.0), (5.0, 5.0)])
    target = _v([0, 1, 1, 1], torch.long)
    mask = _v([1.0, 1.0, 1.0, 0.0])  # the last voxel is not labeled: it must not move the prototypes
    means, counts = lcc.class_means(feats, target, mask, 2)
    assert counts.tolist() == [1, 2]
    assert means.tolist() == [[1.0, 0.0], [0.0, 1.0]]  # means of the L2-normalised features
    lcc.update_prototypes(means, counts)  # first sighting: take the batch means
    assert lcc.prototypes.tolist() == [[1.0, 0.0], [0.0, 1.0]] and lcc.prototype_seen.tolist() == [1, 1]
    new = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    lcc.update_prototypes(new, torch.tensor([3.0, 0.0]))  # class 1 absent from this batch: unchanged
    assert lcc.prototypes.tolist() == [[0.5, 0.5], [0.0, 1.0]]


def test_separation_loss_equals_hand_computation():
    lcc = LowConfidenceConsistency(temperature=0.1)
    lcc.update_prototypes(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 1.0]))
    feats = _features([(3.0, 0.0), (1.0, 1.0), (0.0, 2.0)])
    target = _v([0, 1, 0], torch.long)
    mask = _v([1.0, 1.0, 0.0])
    # voxel 0: cos = (1, 0), class 0; voxel 1: cos = (1/√2, 1/√2), class 1 (a tie: log 2)
    expected = (-math.log(math.exp(10) / (math.exp(10) + 1)) + math.log(2)) / 2
    assert lcc.separation_loss(feats, target, mask).item() == pytest.approx(expected, rel=1e-5)
    assert lcc.separation_loss(feats, target, torch.zeros_like(mask)).item() == 0.0
    assert LowConfidenceConsistency().separation_loss(feats, target, mask).item() == 0.0  # no prototypes yet


def test_prototypes_travel_in_the_state_dict():
    a = LowConfidenceConsistency()
    a.update_prototypes(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([1.0, 1.0]))
    b = LowConfidenceConsistency()
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.prototypes, a.prototypes) and b.prototype_seen.tolist() == [1, 1]


def test_compute_loss_uses_features_and_low_confidence_voxels(tiny_net_config):
    from SSLSegmentLib.ml.methods.base import StepContext
    from SSLSegmentLib.ml.networks import build_network

    torch.manual_seed(0)
    student, teacher = build_network(tiny_net_config), build_network(tiny_net_config)
    shape = (1, 1, 16, 32, 32)
    label = torch.zeros(2, 1, *shape[2:], dtype=torch.long)
    label[:, :, 4:12, 8:24, 8:24] = 1
    lab = torch.cat([torch.ones(shape), torch.zeros(shape)])
    batch = {"image": torch.randn(2, 1, *shape[2:]) + 2.0 * label, "label": label, "labeled_mask": lab,
             "n_labeled": torch.tensor(1)}
    lcc = LowConfidenceConsistency(confidence=1.0)  # every unknown voxel is "low confidence"
    out = lcc.compute_loss(StepContext(student, teacher, batch, 5, 100, 1.0, torch.Generator().manual_seed(0)))
    assert out.terms["low_frac"] == 1.0 and out.terms["lc"] > 0 and out.terms["cs"] > 0
    assert lcc.prototypes.shape == (2, tiny_net_config.features)  # initialised from the labeled features
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.trunk.parameters())


def test_options_are_validated():
    with pytest.raises(ValueError, match="confidence"):
        LowConfidenceConsistency(confidence=0.0)
    with pytest.raises(ValueError, match="temperature"):
        LowConfidenceConsistency(temperature=0)
    with pytest.raises(ValueError, match="prototype_momentum"):
        get_method("lcc", prototype_momentum=1.0)


def test_lcc_learns_on_tiny_phantoms_and_checkpoints_prototypes(tiny_dataset, tmp_path):
    _, start, result = train_tiny(tiny_dataset, tmp_path, "lcc")
    assert_learned(start, result)
    state = load_checkpoint(tmp_path / "last.pt")["method_state"]
    assert state["prototypes"].shape == (2, TINY_NET["features"]) and state["prototype_seen"].tolist() == [1, 1]

"""UG-MCL on hand-built tensors (SDF, level-set mask, certainty mask, loss value) and a short training run."""

import math

import numpy as np
import pytest
import torch

from conftest import assert_learned, train_tiny
from SSLSegmentLib.ml.methods import get_method
from SSLSegmentLib.ml.methods.ug_mcl import UGMCL, signed_distance_map
from SSLSegmentLib.ml.checkpoint import load_checkpoint


def _fg(p: torch.Tensor) -> torch.Tensor:
    """(B,1,...) foreground probabilities → 2-class logits with exactly those softmax probabilities."""
    return torch.cat([torch.zeros_like(p), torch.log(p) - torch.log1p(-p)], 1)


def _phi_for(m: torch.Tensor, k: float) -> torch.Tensor:
    """The level set φ whose mask σ(−kφ) is m."""
    return -(torch.log(m) - torch.log1p(-m)) / k


def test_sdf_on_a_line_matches_the_dtc_definition():
    label = np.array([0, 0, 1, 1, 1, 0, 0]).reshape(1, 1, 1, 7)
    sdf = signed_distance_map(label)[0, 0, 0, 0]
    # outside distance 2,1 (/2) ; inside 1,2,1 (/2) ; inner boundary voxels (2 and 4) are 0
    assert sdf.tolist() == pytest.approx([1.0, 0.5, 0.0, -1.0, 0.0, 0.5, 1.0])


def test_sdf_sign_and_range_on_a_ball_and_degenerate_patches():
    z, y, x = np.mgrid[:15, :15, :15]
    ball = ((z - 7) ** 2 + (y - 7) ** 2 + (x - 7) ** 2 <= 16).astype(np.uint8)
    label = np.stack([ball, np.zeros_like(ball), np.ones_like(ball)])
    sdf = signed_distance_map(label)
    assert sdf.shape == (3, 1, 15, 15, 15)
    assert sdf[0, 0, 7, 7, 7] == pytest.approx(-1.0) and sdf[0, 0, 0, 0, 0] == pytest.approx(1.0)
    assert (sdf[0, 0][ball == 1] <= 0).all() and (sdf[0, 0][ball == 0] > 0).all()
    assert (sdf[1] == 1.0).all() and (sdf[2] == -1.0).all()  # no foreground: outside; all foreground: inside


def test_levelset_mask_is_the_sharp_dtc_transform():
    m = UGMCL(k=1500).levelset_mask(torch.tensor([0.0, -0.01, 0.01, 0.5]))
    assert m[0].item() == pytest.approx(0.5)
    assert m[1].item() == pytest.approx(1 / (1 + math.exp(-15)), rel=1e-6)
    assert m[2].item() < 1e-6 and m[3].item() == 0.0


def test_certainty_mask_keeps_only_unlabeled_low_entropy_voxels_with_ramped_threshold():
    t = torch.tensor([0.5, 0.8, 0.7, 0.95]).view(1, 1, 1, 1, 4)
    probs = torch.cat([1 - t, t], 1)
    unlabeled = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 1, 4)
    # entropies (nats) 0.693, 0.500, 0.611, 0.199; thresholds 0.520 (start) and 0.693 (end)
    assert UGMCL.certainty_mask(probs, unlabeled, 0.0).flatten().tolist() == [0, 1, 0, 0]
    # at full ramp the threshold is ln 2, the largest binary entropy: every unlabeled voxel is kept, as in UA-MT
    assert UGMCL.certainty_mask(probs, unlabeled, 1.0).flatten().tolist() == [1, 1, 1, 0]
    assert UGMCL.certainty_mask(probs, unlabeled, 0.8).flatten().tolist() == [0, 1, 1, 0]


def test_loss_equals_hand_computation():
    k = 10.0
    method = UGMCL(k=k)
    # voxels 0,1 labeled (y = 1, 0); voxels 2,3 unlabeled (teacher sure on 2, unsure on 3)
    p = torch.tensor([0.8, 0.3, 0.6, 0.4]).view(1, 1, 1, 1, 4)
    m = torch.tensor([0.9, 0.2, 0.5, 0.7]).view(1, 1, 1, 1, 4)
    q = torch.tensor([0.9, 0.1, 0.95, 0.5]).view(1, 1, 1, 1, 4)
    label = torch.tensor([1, 0, 0, 0]).view(1, 1, 1, 1, 4)
    lab = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 1, 4)
    out = method.loss_from_predictions(_fg(p), _phi_for(m, k), torch.cat([1 - q, q], 1), label, lab, weight=0.5, rampup=0.0)
    eps = 1e-5
    ce = (-math.log(0.8) - math.log(0.7)) / 2
    dice_p = 1 - (2 * 0.8 + eps) / (0.64 + 0.09 + 1 + eps)
    dice_m = 1 - (2 * 0.9 + eps) / (0.81 + 0.04 + 1 + eps)
    sup = 0.5 * (ce + dice_p + dice_m)
    # intra: only voxel 2 is certain (entropy of 0.95 < 0.75 ln 2); both channels differ by 0.35
    intra = 0.5 * (2 * 0.35**2) / (2 * 1)
    # cross: unlabeled voxels 2, 3 on the foreground channel
    cross = ((0.5 - 0.6) ** 2 + (0.7 - 0.4) ** 2) / 2
    assert out.terms["sup"] == pytest.approx(sup, rel=1e-4)
    assert out.terms["intra"] == pytest.approx(intra, rel=1e-4)
    assert out.terms["cross"] == pytest.approx(cross, rel=1e-4)
    assert out.loss.item() == pytest.approx(sup + 0.5 * (intra + cross), rel=1e-4)
    assert out.terms["kept"] == pytest.approx(0.5)
    assert "sdf" not in out.terms  # the SDF term is optional and off by default


def test_sdf_term_only_uses_fully_labeled_patches():
    method = UGMCL(sdf_weight=0.3)
    label = torch.zeros(2, 1, 1, 1, 7, dtype=torch.long)
    label[:, 0, 0, 0, 2:5] = 1
    target = torch.from_numpy(signed_distance_map(label[:, 0].numpy()))
    phi = target.clone()
    phi[1] += 0.5  # the second patch is wrong, but it is only partly labeled
    lab = torch.ones(2, 1, 1, 1, 7)
    lab[1, 0, 0, 0, 0] = 0
    assert method.sdf_loss(phi, label, lab).item() == pytest.approx(0.0, abs=1e-7)
    lab[1] = 1
    assert method.sdf_loss(phi, label, lab).item() == pytest.approx(0.25 / 2, rel=1e-5)
    assert method.sdf_loss(phi, label, torch.zeros_like(lab)).item() == 0.0


def test_options_validated_and_network_without_levelset_head_refused(tiny_net_config):
    with pytest.raises(ValueError, match="passes"):
        UGMCL(passes=1)
    with pytest.raises(ValueError, match="sdf_weight"):
        UGMCL(sdf_weight=-1)
    assert get_method("ug-mcl").network_options == {"levelset_head": True}
    from SSLSegmentLib.ml.methods.base import StepContext
    from SSLSegmentLib.ml.networks import build_network

    net = build_network(tiny_net_config)
    batch = {"image": torch.zeros(1, 1, 16, 32, 32), "label": torch.zeros(1, 1, 16, 32, 32, dtype=torch.long),
             "labeled_mask": torch.ones(1, 1, 16, 32, 32)}
    with pytest.raises(ValueError, match="level-set head"):
        UGMCL().compute_loss(StepContext(net, net, batch, 0, 10, 0.0))


def test_ugmcl_learns_on_tiny_phantoms(tiny_dataset, tmp_path):
    trainer, start, result = train_tiny(
        tiny_dataset, tmp_path, "ug-mcl", method_options={"passes": 2, "consistency_weight": 0.1, "sdf_weight": 0.3})
    assert trainer.student.levelset is not None  # the method asked for the level-set head
    assert_learned(start, result)
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["network"]["levelset_head"] is True and ckpt["method_options"]["sdf_weight"] == 0.3

"""SGRS-Net on hand-built tensors (soft Dice, region partition, region loss, mixing) and a short training run."""

import math

import pytest
import torch
from torch import nn

from conftest import assert_learned, train_tiny
from SSLSegmentLib.ml.methods.base import StepContext
from SSLSegmentLib.ml.methods.sgrs import SGRS


def _two(p_fg) -> torch.Tensor:
    p = torch.tensor(p_fg, dtype=torch.float32).view(1, 1, 1, 1, -1)
    return torch.cat([1 - p, p], 1)


def _v(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).view(1, 1, 1, 1, -1)


def test_soft_dice_is_nnunet_per_class_with_background_and_smoothing():
    soft_dice_loss = SGRS.soft_dice  # the one masked Dice (losses.masked_dice_loss) in its nnU-Net form
    probs = _two([0.9, 0.2, 0.6])
    y = _v([1, 0, 1], torch.long)
    mask = _v([1.0, 1.0, 0.0])
    # class 0 on voxels 0,1: p0 = .1, .8 ; y0 = 0, 1 → tp .8, fp .1, fn .2
    # class 1: p1 = .9, .2 ; y1 = 1, 0 → tp .9, fp .2, fn .1
    for s in (1.0, 20.0):
        dc0 = (1.6 + s) / (1.6 + 0.1 + 0.2 + s)
        dc1 = (1.8 + s) / (1.8 + 0.2 + 0.1 + s)
        assert soft_dice_loss(probs, y, mask, s).item() == pytest.approx(1 - (dc0 + dc1) / 2, rel=1e-5)
    # an empty region gives dc = s/s = 1 per class: no loss, whatever the smoothing
    assert soft_dice_loss(probs, y, torch.zeros_like(mask), 20.0).item() == pytest.approx(0.0, abs=1e-6)


def test_partition_consistent_different_uncertain():
    sgrs = SGRS(tau=0.425)
    p = _two([0.9, 0.9, 0.1, 0.52, 0.9])
    p_mix = _two([0.95, 0.2, 0.05, 0.6, 0.45])
    r = sgrs.partition(p, p_mix)
    assert r["consistent"].flatten().tolist() == [1, 0, 1, 1, 0]
    assert r["different"].flatten().tolist() == [0, 1, 0, 0, 1]
    # uncertain: P_bg in (0.425, 0.575) before mixing (voxel 3) or after mixing (voxel 4: P_m,bg = 0.55)
    assert r["uncertain"].flatten().tolist() == [0, 0, 0, 1, 1]
    assert r["consistent_kept"].flatten().tolist() == [1, 0, 1, 0, 0]
    assert r["different_kept"].flatten().tolist() == [0, 1, 0, 0, 0]


def test_region_loss_equals_hand_computation():
    sgrs = SGRS(label_smoothing=0.2, dice_smooth_consistent=1.0, dice_smooth_different=20.0)
    p = [0.9, 0.3, 0.2, 0.6]
    pm = [0.8, 0.7, 0.1, 0.5]
    pseudo = _v([1, 0, 0, 1], torch.long)
    regions = {"consistent": _v([1.0, 0, 1, 0]), "different_kept": _v([0.0, 1, 0, 0]),
               "consistent_kept": _v([1.0, 0, 0, 0])}
    mask = _v([1.0, 1, 1, 0])  # voxel 3 is labeled: it must not count
    logits = torch.log(_two(p))
    logits_m = torch.log(_two(pm))
    loss, terms = sgrs.region_loss(logits, logits_m, pseudo, regions, mask)

    def ce(q, y):
        return -math.log(q if y else 1 - q)

    def ce_ls(q, y, e=0.2):
        return -((1 - e + e / 2) * math.log(q if y else 1 - q) + (e / 2) * math.log(1 - q if y else q))

    ce_p = (ce(p[0], 1) + ce(p[2], 0) + ce_ls(p[1], 0)) / 3
    ce_m = (ce(pm[0], 1) + ce(pm[2], 0) + ce_ls(pm[1], 0)) / 3
    l_ce = 0.5 * (ce_p + ce_m)

    def sd(q, y, s):  # one voxel region, classes bg and fg
        dcs = []
        for qc, yc in ((1 - q, 1 - y), (q, y)):
            tp, fp, fn = qc * yc, qc * (1 - yc), (1 - qc) * yc
            dcs.append((2 * tp + s) / (2 * tp + fp + fn + s))
        return 1 - sum(dcs) / 2

    l_dice = 0.25 * (sd(p[0], 1, 1) + sd(pm[0], 1, 1) + sd(p[1], 0, 20) + sd(pm[1], 0, 20))
    assert terms["pseudo_ce"] == pytest.approx(l_ce, rel=1e-4)
    assert terms["pseudo_dice"] == pytest.approx(l_dice, rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * (l_ce + l_dice), rel=1e-4)


def test_mix_coefficients_favour_the_unlabeled_image_and_are_reproducible():
    sgrs = SGRS()
    a = sgrs.mix_coefficients(500, torch.Generator().manual_seed(1))
    b = sgrs.mix_coefficients(500, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert float(a.min()) >= 0.5 and float(a.max()) <= 1.0
    assert 0.6 < float(a.mean()) < 0.9  # E[max(λ, 1−λ)] for Beta(0.75, 0.75) is about 0.77


class _Recorder(nn.Module):
    """A 1×1×1 convolution that remembers its last input (to see what the student was shown)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return {"logits": self.conv(x)}


def _batch(n_labeled=2, n_unlabeled=2, shape=(2, 4, 4)):
    b = n_labeled + n_unlabeled
    image = torch.cat([torch.full((n_labeled, 1, *shape), -5.0), torch.full((n_unlabeled, 1, *shape), 5.0)])
    lab = torch.cat([torch.ones(n_labeled, 1, *shape), torch.zeros(n_unlabeled, 1, *shape)])
    label = torch.zeros(b, 1, *shape, dtype=torch.long)
    return {"image": image, "label": label, "labeled_mask": lab, "n_labeled": torch.tensor(n_labeled)}


def test_student_sees_the_batch_then_unlabeled_images_mixed_with_labeled_ones():
    student, teacher = _Recorder(), _Recorder()
    batch = _batch()
    out = SGRS().compute_loss(StepContext(student, teacher, batch, 10, 100, 1.0, torch.Generator().manual_seed(0)))
    seen = student.seen
    assert seen.shape[0] == 6  # 2 labeled + 2 unlabeled + 2 mixed
    assert torch.equal(seen[:4], batch["image"])
    mixed = seen[4:].flatten(1).mean(1)
    # λ'·(5 + ε) + (1 − λ')·(−5 + ε'), λ' ≥ 0.5, |ε| ≤ 0.2: the unlabeled image stays dominant
    assert (mixed >= -0.25).all() and (mixed <= 5.25).all()
    assert out.terms["consistent_frac"] + out.terms["different_frac"] <= 1.0
    assert out.loss.requires_grad and math.isfinite(out.loss.item())


def test_partially_labeled_sample_joins_the_pseudo_label_branch():
    student, teacher = _Recorder(), _Recorder()
    batch = _batch(n_labeled=2, n_unlabeled=0)
    batch["labeled_mask"][1, :, 0] = 0  # a corrected case: half of it reviewed
    out = SGRS().compute_loss(StepContext(student, teacher, batch, 10, 100, 1.0, torch.Generator().manual_seed(0)))
    assert student.seen.shape[0] == 3 and "pseudo" in out.terms
    batch = _batch(n_labeled=2, n_unlabeled=0)  # nothing unknown: supervised only
    out = SGRS().compute_loss(StepContext(student, teacher, batch, 10, 100, 1.0, torch.Generator().manual_seed(0)))
    assert student.seen.shape[0] == 2 and "pseudo" not in out.terms


def test_options_are_validated():
    with pytest.raises(ValueError, match="tau"):
        SGRS(tau=0.6)
    with pytest.raises(ValueError, match="mix_alpha"):
        SGRS(mix_alpha=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        SGRS(label_smoothing=1.0)


def test_sgrs_learns_on_tiny_phantoms(tiny_dataset, tmp_path):
    _, start, result = train_tiny(tiny_dataset, tmp_path, "sgrs")
    assert_learned(start, result)

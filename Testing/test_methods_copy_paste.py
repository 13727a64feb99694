"""Bidirectional copy-paste (the shared mix), BCP, brl on mixed images, and the labeled-only pre-training stage."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_learned, train_tiny
from SSLSegmentLib.ml.methods.base import StepContext
from SSLSegmentLib.ml.methods.bcp import BCP
from SSLSegmentLib.ml.methods.brl import BidirectionalRegionLoss
from SSLSegmentLib.ml.methods.copy_paste import BidirectionalCopyPaste
from SSLSegmentLib.ml.methods.losses import keep_largest_component
from SSLSegmentLib.ml.trainer import TrainConfig

SHAPE = (4, 6, 6)


def _batch(n_labeled=2, n_unlabeled=2, partial=False):
    b = n_labeled + n_unlabeled
    image = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, 1, *SHAPE).clone()  # sample i is i
    label = torch.full((b, 1, *SHAPE), 0, dtype=torch.long)
    label[:n_labeled] = 1
    mask = torch.zeros(b, 1, *SHAPE)
    mask[:n_labeled] = 1.0
    if partial:  # sample 1 is a corrected case: only its first z slice was reviewed
        mask[1] = 0.0
        mask[1, :, 0] = 1.0
    return image, label, mask


def test_each_pair_swaps_one_cuboid_both_ways():
    cp = BidirectionalCopyPaste(size_ratio=0.5)
    image, label, mask = _batch()
    mix = cp.draw(4, 2, torch.Generator().manual_seed(3), SHAPE)
    assert (mix.first, mix.second) == ([0, 1], [2, 3])  # labeled i with unlabeled i
    m = mix.cuboids
    assert m.shape == (2, 1, *SHAPE) and m[0].sum() == 2 * 3 * 3  # round(0.5 * side) per axis
    x = mix.apply(image)
    assert x.shape == (4, 1, *SHAPE)
    for p, (a, b) in enumerate(zip(mix.first, mix.second)):
        inside = m[p].bool()
        assert (x[p][inside] == b).all() and (x[p][~inside] == a).all()  # the unlabeled crop pasted into a
        assert (x[2 + p][inside] == a).all() and (x[2 + p][~inside] == b).all()  # the labeled crop pasted into b
    y = mix.apply(label)
    assert y.dtype == torch.long and torch.equal(y.bool(), mix.apply(mask).bool())


def test_keep_labeled_appends_the_labeled_patches_unmixed_to_every_mixed_tensor():
    image, label, mask = _batch(partial=True)
    plain = BidirectionalCopyPaste().draw(4, 2, torch.Generator().manual_seed(5), SHAPE)
    kept = BidirectionalCopyPaste(keep_labeled=True).draw(4, 2, torch.Generator().manual_seed(5), SHAPE)
    assert kept.kept == [0, 1] and plain.kept == [] and torch.equal(kept.cuboids, plain.cuboids)  # same draws
    for t in (image, label, mask):
        x = kept.apply(t)
        assert x.shape[0] == 6 and x.dtype == t.dtype
        assert torch.equal(x[:4], plain.apply(t)) and torch.equal(x[4:], t[:2])
    assert kept.apply(mask)[5].sum() == SHAPE[1] * SHAPE[2]  # the corrected case stays labeled where reviewed only
    pre = BidirectionalCopyPaste(keep_labeled=True).draw(2, 2, None, SHAPE, labeled_only=True)
    assert pre.apply(image[:2]).shape[0] == 2  # the pre-training mix is labeled already: nothing kept beside it
    with pytest.raises(ValueError, match="keep_labeled must be a bool"):
        BidirectionalCopyPaste(keep_labeled=1)
    with pytest.raises(ValueError, match="needs copy_paste=True"):
        BidirectionalRegionLoss(keep_labeled=True)
    assert BCP(keep_labeled=True).options()["keep_labeled"] is True


def test_a_corrected_case_keeps_only_its_reviewed_voxels_labeled_through_the_mix():
    cp = BidirectionalCopyPaste()
    image, label, mask = _batch(partial=True)
    mix = cp.draw(4, 2, torch.Generator().manual_seed(0), SHAPE)
    known = mix.apply(mask)
    m = mix.cuboids[1].bool()  # pair 1 is the corrected case (1) with unlabeled sample 3
    reviewed = torch.zeros(1, *SHAPE, dtype=torch.bool)
    reviewed[:, 0] = True
    assert torch.equal(known[1].bool(), reviewed & ~m)  # into the corrected case: its reviewed voxels outside
    assert torch.equal(known[3].bool(), reviewed & m)  # into the unlabeled one: its reviewed voxels inside
    assert known[0].sum() == (~mix.cuboids[0].bool()).sum()  # a full case stays labeled outside the cuboid


def test_pairing_errors_are_clear():
    cp = BidirectionalCopyPaste()
    with pytest.raises(ValueError, match="two samples to pair"):
        cp.draw(2, 2, None, SHAPE)  # no unlabeled sample
    with pytest.raises(ValueError, match="labeled only"):
        cp.draw(3, 1, None, SHAPE, labeled_only=True)
    with pytest.raises(ValueError, match="size_ratio"):
        BidirectionalCopyPaste(1.0)
    with pytest.raises(ValueError, match="expected"):
        cp.draw(4, 2, None, SHAPE).apply(torch.zeros(4, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="pretrain_iterations"):
        TrainConfig(iterations=10, pretrain_iterations=10)
    with pytest.raises(ValueError, match="batch_labeled must be >= 2"):
        TrainConfig(iterations=10, pretrain_iterations=2, batch_labeled=1)


def test_largest_component_cleaning_keeps_the_bigger_blob():
    lab = torch.zeros(2, 1, 6, 8, 8, dtype=torch.long)
    lab[0, 0, 1:4, 1:4, 1:4] = 1  # 27 voxels
    lab[0, 0, 5, 6, 6] = 1  # a stray voxel
    out = keep_largest_component(lab)
    assert out.dtype == torch.long and out[0].sum() == 27 and out[0, 0, 5, 6, 6] == 0
    assert torch.equal(out[1], lab[1])  # an empty sample stays empty


class _Fixed(torch.nn.Module):
    """A 'network' whose logits are the input's two channels, so the loss can be checked by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return {"logits": self.logits(x)}


def test_brl_on_mixed_images_computes_its_regions_on_the_mix():
    torch.manual_seed(0)
    image = torch.randn(4, 1, *SHAPE)
    _, label, mask = _batch(partial=True)
    head = torch.nn.Conv3d(1, 2, 1)
    student, teacher = _Fixed(head), _Fixed(torch.nn.Conv3d(1, 2, 1))
    brl = BidirectionalRegionLoss(copy_paste=True, beta=0.5)
    batch = {"image": image, "label": label, "labeled_mask": mask, "n_labeled": torch.tensor(2)}
    ctx = StepContext(student, teacher, batch, step=5, max_steps=10, rampup=1.0, generator=torch.Generator().manual_seed(7))
    got = brl.compute_loss(ctx)

    # By hand with the same draws: the teacher's noise first, then the cuboids.
    from SSLSegmentLib.ml.methods.losses import input_noise

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        q = teacher(input_noise(image, g))["logits"].softmax(1)
    mix = BidirectionalCopyPaste().draw(4, 2, g, SHAPE)
    x, y, k, qm = mix.apply(image), mix.apply(label), mix.apply(mask), mix.apply(q)
    want = brl.loss_from_predictions(student(x)["logits"], qm, y, k, brl.weight(ctx))
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    assert got.terms["high_frac"] == pytest.approx(want.terms["high_frac"])
    assert brl.options()["copy_paste"] is True and BidirectionalRegionLoss().options()["copy_paste"] is False


def test_bcp_learns_on_tiny_phantoms(tiny_dataset, tmp_path):
    trainer, start, result = train_tiny(tiny_dataset, tmp_path, "bcp", batch_unlabeled=2)
    assert_learned(start, result)
    assert isinstance(trainer.method, BCP) and trainer.method.options()["pseudo_lcc"] is True
    with pytest.raises(ValueError, match="pseudo_lcc must be a bool"):
        BCP(pseudo_lcc="yes")


def test_brl_with_copy_paste_and_pretraining_learns(tiny_dataset, tmp_path):
    trainer, start, result = train_tiny(tiny_dataset, tmp_path, "brl", batch_unlabeled=2,
                                        method_options={"copy_paste": True}, pretrain_iterations=8)
    assert_learned(start, result)


def test_pretraining_steps_use_the_labeled_only_mix_then_the_method(tiny_dataset, tmp_path):
    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.ml.trainer import Trainer
    from conftest import TINY_NET, TINY_PATCH

    ds = DataSet(tiny_dataset)
    train = ds.training_samples(ds.splits["train"], ds.splits["train"][:2])
    cfg = TrainConfig(method="mean-teacher", network=TINY_NET, patch_size=TINY_PATCH, iterations=6, pretrain_iterations=2,
                      batch_unlabeled=2, seed=0)
    trainer = Trainer(cfg, train)
    terms = [trainer.train_step()[1] for _ in range(3)]
    assert [t.get("pretrain") for t in terms] == [1.0, 1.0, None]
    assert "cons" in terms[2] and "cons" not in terms[0]  # the method's own loss from step 2 on

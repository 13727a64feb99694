"""The shared trainer: it learns, it is reproducible, it stops cleanly, and its checkpoints are safe to load."""

import copy
import pickle

import numpy as np
import pytest
import torch

from conftest import TINY_NET, TINY_PATCH, assert_learned
from SSLSegmentLib.data.dataset import DataSet, Sample
from SSLSegmentLib.ml.checkpoint import checkpoint_patch_size, load_checkpoint, model_from_checkpoint
from SSLSegmentLib.ml.trainer import PatchSampler, TrainConfig, Trainer, TrainingCancelled, TrainingError


def _config(**kw):
    base = dict(network=TINY_NET, patch_size=TINY_PATCH, iterations=40, val_interval=20, lr=0.05, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _data(root, n_labeled=4):
    ds = DataSet(root)
    train = ds.training_samples(ds.splits["train"], ds.splits["train"][:n_labeled])
    val = ds.training_samples(ds.splits["val"], ds.splits["val"])
    return train, val


@pytest.mark.parametrize("method", ["supervised", "brl"])
def test_training_raises_dice_well_above_its_start(tiny_dataset, tmp_path, method):
    train, val = _data(tiny_dataset)
    trainer = Trainer(_config(method=method), train, val, out_dir=tmp_path)
    start = trainer.validate()
    result = trainer.fit()
    assert_learned(start, result)
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["metrics"]["val_dice"] == pytest.approx(result["best_val_dice"])


def test_checkpoint_carries_config_seed_data_and_metrics(tiny_dataset, tmp_path):
    train, val = _data(tiny_dataset)
    snapshot = {"train": [s.case_id for s in train], "labeled": [s.case_id for s in train[:4]]}
    Trainer(_config(iterations=4, val_interval=2, seed=11), train, val, out_dir=tmp_path, data_snapshot=snapshot).fit()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["seed"] == 11 and ckpt["train_config"]["seed"] == 11 and ckpt["data"] == snapshot
    assert ckpt["train_config"]["method"] == "brl" and ckpt["step"] == 4
    net, _ = model_from_checkpoint(tmp_path / "last.pt")
    assert sum(p.numel() for p in net.parameters()) > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_the_patch_size_of_a_checkpoint_has_one_accessor(tiny_dataset, tmp_path):
    train, val = _data(tiny_dataset)
    Trainer(_config(iterations=2, val_interval=2), train, val, out_dir=tmp_path).fit()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint_patch_size(ckpt) == TINY_PATCH
    for broken in ({**ckpt, "train_config": {}}, {k: v for k, v in ckpt.items() if k != "train_config"}):
        with pytest.raises(ValueError, match="no train_config.patch_size"):  # never a silent default window
            checkpoint_patch_size(broken)
    with pytest.raises(ValueError, match="three positive sizes"):
        checkpoint_patch_size({**ckpt, "train_config": {"patch_size": [16, 32]}})


def test_loading_refuses_pickled_code_and_truncated_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": "sslsegment-checkpoint/1", "x": Evil()}))
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an SSLSegment checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    good = tmp_path / "good.pt"
    torch.save({"format": "sslsegment-checkpoint/1", "model": {"w": torch.ones(3)}}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:50])
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "cut.pt")


def test_same_seed_same_losses(tiny_dataset):
    train, _ = _data(tiny_dataset)
    runs = []
    for _ in range(2):
        t = Trainer(_config(method="mean-teacher", iterations=3), train)
        runs.append([t.train_step()[0] for _ in range(3)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_nan_loss_stops_with_a_clear_reason(tiny_dataset):
    train, _ = _data(tiny_dataset)
    train[0].image[:] = np.nan  # a corrupt labeled volume
    t = Trainer(_config(method="supervised", batch_labeled=4), train)
    with pytest.raises(TrainingError, match="loss became nan"):
        t.fit()


def test_cancel_stops_at_the_next_step(tiny_dataset, tmp_path):
    train, val = _data(tiny_dataset)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    t = Trainer(_config(iterations=100), train, val, out_dir=tmp_path, should_stop=stop)
    with pytest.raises(TrainingCancelled):
        t.fit()
    assert t.step == 3


def test_no_labeled_voxels_is_refused(tiny_dataset):
    train, _ = _data(tiny_dataset, n_labeled=0)
    with pytest.raises(TrainingError, match="no labeled voxels"):
        Trainer(_config(), train)


def test_partially_labeled_case_goes_to_the_labeled_stream(tiny_dataset):
    train, _ = _data(tiny_dataset, n_labeled=1)
    train[1].labeled_mask[:, :, :10] = 1  # a correction: part of the case was reviewed
    train[1].label[:] = 0
    t = Trainer(_config(), train)
    assert set(t.sampler.labeled) == {0, 1}
    batch = t.make_batch()
    assert batch["labeled_mask"].shape == (4, 1, *TINY_PATCH)
    assert batch["labeled_mask"][2:].sum() == 0  # unlabeled stream


def test_config_is_validated():
    with pytest.raises(ValueError, match="multiple of"):
        TrainConfig(network=TINY_NET, patch_size=(15, 32, 32))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")


def test_ema_teacher_is_the_parameterwise_rule(tiny_dataset):
    train, _ = _data(tiny_dataset)
    t = Trainer(_config(method="mean-teacher", iterations=5), train)
    for _ in range(3):
        t.train_step()
        with torch.no_grad():  # a teacher that differs from the student, so the update has something to mix
            for p in t.teacher.parameters():
                p.add_(0.01)
        expected = copy.deepcopy(t.teacher)
        alpha = min(1.0 - 1.0 / (t.step + 1), t.config.ema_decay)
        with torch.no_grad():
            for tp, sp in zip(expected.parameters(), t.student.parameters()):
                tp.mul_(alpha).add_(sp, alpha=1.0 - alpha)
            for tb, sb in zip(expected.buffers(), t.student.buffers()):
                tb.copy_(sb)
        t.update_teacher()
        got, want = t.teacher.state_dict(), expected.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def _index_sample(shape):
    """A sample whose image is each voxel's flat index and whose label and mask are functions of it."""
    idx = np.arange(np.prod(shape), dtype=np.int64).reshape(shape)
    return Sample("idx", idx.astype(np.float32), (idx % 7).astype(np.uint8), (idx % 2).astype(np.uint8)), idx


def test_patches_are_aligned_cover_the_volume_and_turn_with_the_right_probabilities():
    sample, idx = _index_sample((10, 12, 12))
    patch = (4, 6, 6)
    sampler = PatchSampler(patch, augment=True, seed=5)
    seen = np.zeros(idx.size, bool)
    flips_y = flips_x = 0
    turns = {1: 0, 2: 0, 3: 0}
    n = 3000
    for _ in range(n):
        params = sampler.draw(idx.shape)
        image, label, mask = (sampler.apply(torch.as_tensor(a), params)
                              for a in (sample.image, sample.label, sample.labeled_mask))
        assert image.shape == label.shape == mask.shape == patch
        values = image.numpy().astype(np.int64)
        np.testing.assert_array_equal(label.numpy(), values % 7)  # the same crop and turns for all three
        np.testing.assert_array_equal(mask.numpy(), values % 2)
        (z, y, x), flips, k = params["start"], params["flips"], params["k"]
        want = idx[z : z + 4, y : y + 6, x : x + 6]
        want = np.rot90(np.flip(want, flips) if flips else want, k, axes=(1, 2))
        np.testing.assert_array_equal(values, want)  # a crop, flipped in y/x, then turned in-plane
        seen[values.ravel()] = True
        flips_y += 1 in flips
        flips_x += 2 in flips
        if k:
            turns[k] += 1
    assert seen.all()  # every voxel, corners included, can be drawn
    for count in (flips_y, flips_x, sum(turns.values())):
        assert abs(count / n - 0.5) < 0.04
    for count in turns.values():
        assert abs(count / sum(turns.values()) - 1 / 3) < 0.05

    # Same seed, same patches; the patches of a whole sample come back in its dtypes.
    a, b = PatchSampler(patch, True, seed=9), PatchSampler(patch, True, seed=9)
    for _ in range(5):
        for pa, pb in zip(a(sample), b(sample)):
            assert torch.equal(pa, pb)
    assert [p.dtype for p in a(sample)] == [torch.float32, torch.uint8, torch.uint8]


def test_patches_pad_small_volumes_and_skip_turns_when_not_asked_or_not_square():
    sample, idx = _index_sample((3, 12, 12))
    image, label, mask = PatchSampler((4, 6, 6), augment=False, seed=0)(sample)
    assert image.shape == (4, 6, 6)
    assert mask[-1].sum() == 0 and image[-1].abs().sum() == 0  # 1 missing slice: zero-padded after, as MONAI pads
    plain = PatchSampler((4, 6, 6), augment=False, seed=0)
    assert all(plain.draw(idx.shape)["flips"] == [] and plain.draw(idx.shape)["k"] == 0 for _ in range(50))
    oblong = PatchSampler((4, 6, 8), augment=True, seed=0)
    assert all(oblong.draw(idx.shape)["k"] == 0 for _ in range(50))
    with pytest.raises(ValueError, match="three positive sizes"):
        PatchSampler((4, 6), augment=True, seed=0)


def _corrected_sample(shape=(20, 40, 40), region=(slice(0, 3), slice(30, 35), slice(2, 7))):
    """A correction: labeled only in one small corner region (the reviewed voxels)."""
    mask = np.zeros(shape, np.uint8)
    mask[region] = 1
    label = mask.copy()
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return Sample("corrected", image, label, mask)


def test_patches_of_a_correction_visit_its_reviewed_voxels_at_the_asked_share():
    sample = _corrected_sample()
    patch, n = (8, 16, 16), 600

    def share_with_reviewed(sampler):
        return np.mean([bool(sampler(sample)[2].any()) for _ in range(n)])

    uniform = share_with_reviewed(PatchSampler(patch, True, seed=3, reviewed_share=0.0))
    always = share_with_reviewed(PatchSampler(patch, True, seed=3, reviewed_share=1.0))
    half = share_with_reviewed(PatchSampler(patch, True, seed=3, reviewed_share=0.5))
    assert uniform < 0.15  # the corner region is inside a uniform crop only now and then
    assert always == 1.0  # centred on a reviewed voxel and moved inside the volume, the crop always holds it
    assert abs(half - (0.5 + 0.5 * uniform)) < 0.07
    # Centred crops stay inside the volume, padding included (a volume thinner than the patch).
    thin = _corrected_sample((3, 40, 40), (slice(0, 3), slice(36, 40), slice(36, 40)))
    sampler = PatchSampler(patch, True, seed=1, reviewed_share=1.0)
    for _ in range(50):
        image, label, mask = sampler(thin)
        assert image.shape == patch and mask.sum() > 0


def test_the_reviewed_share_leaves_fully_labeled_and_unlabeled_samples_as_they_were():
    sample, _ = _index_sample((10, 12, 12))
    full = Sample("full", sample.image, sample.label, np.ones_like(sample.labeled_mask))
    none = Sample("none", sample.image, sample.label, np.zeros_like(sample.labeled_mask))
    a, b = PatchSampler((4, 6, 6), True, seed=4), PatchSampler((4, 6, 6), True, seed=4, reviewed_share=1.0)
    for s in (full, none, full, none):
        for pa, pb in zip(a(s), b(s)):
            assert torch.equal(pa, pb)  # the same crops: no extra random draws for them
    with pytest.raises(ValueError, match="reviewed_share is a probability"):
        PatchSampler((4, 6, 6), True, seed=0, reviewed_share=1.5)
    with pytest.raises(ValueError, match="reviewed_patch_share must be in"):
        TrainConfig(reviewed_patch_share=-0.1)

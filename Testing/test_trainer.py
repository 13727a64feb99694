"""The shared trainer: it learns, it is reproducible, it stops cleanly, and its checkpoints are safe to load."""

import pickle

import numpy as np
import pytest
import torch

from conftest import TINY_NET, TINY_PATCH, assert_learned
from SSLSegmentLib.data.dataset import DataSet
from SSLSegmentLib.ml.checkpoint import checkpoint_patch_size
from SSLSegmentLib.ml.trainer import (
    TrainConfig,
    Trainer,
    TrainingCancelled,
    TrainingError,
    load_checkpoint,
    model_from_checkpoint,
)


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

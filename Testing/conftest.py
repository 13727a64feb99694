"""Shared fixtures: tiny phantom data sets and tiny networks so the whole suite runs in minutes on 2 cores."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_SHAPE = (24, 32, 32)
TINY_PATCH = (16, 32, 32)
TINY_NET = {"channels": [8, 16, 32], "strides": [2, 2], "features": 8, "num_res_units": 1}
# The small phantom model the extension bundles (what the module's self-test serves as the first version).
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "SSLSegment" / "Resources" / "Models" / "phantom-tiny.pt"


@contextlib.contextmanager
def bundled_model_backend(folder, dataset, train_defaults: dict | None = None, poll: float = 0.5,
                          heartbeat: float = 1.0):
    """`sslsegment serve` + `worker` on 127.0.0.1 (the module's LocalBackend) over `dataset` imported into
    `folder`/store the way the self-test sets one up: two labeled train cases, the labeled val split, the bundled
    model as v0001, scoring with 2 passes. Yields the running LocalBackend; stopped on leaving."""
    from SSLSegmentLib.review.local_backend import LocalBackend
    from training.cli import main as sslsegment
    from training.datastore import Datastore

    root = Path(folder) / "store"
    args = ["import-datastore", str(dataset), "--datastore", str(root), "--labels", "train:2",
            "--model", str(BUNDLED_MODEL)]
    if train_defaults is not None:
        args += ["--train-defaults", json.dumps(train_defaults)]
    assert sslsegment(args) == 0
    store = Datastore(root)
    store.update_settings({"score_passes": 2})
    store.close()
    local = LocalBackend(root, python=sys.executable, log_dir=Path(folder) / "logs",
                         worker_args=["--threads", "1", "--poll", str(poll), "--heartbeat", str(heartbeat)])
    local.start().wait_until_ready(timeout=180)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A phantom data set folder: 8 train, 2 val, 2 test cases of 24×32×32 voxels."""
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(root, n_train=8, n_val=2, n_test=2, config=PhantomConfig(shape=TINY_SHAPE), seed=3)


@pytest.fixture
def tiny_net_config():
    from SSLSegmentLib.ml.networks import NetworkConfig

    return NetworkConfig(**TINY_NET)


@pytest.fixture
def one_torch_thread():
    """One torch thread: on a shared 2-core machine two threads stall on each other (benchmarks/results/uncertainty.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_tiny(root, out_dir, method: str, n_labeled: int = 4, **overrides):
    """Train `method` from scratch on the tiny phantoms (first `n_labeled` train cases labeled).

    Returns (trainer, validation Dice before training, `Trainer.fit()` result)."""
    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.ml.trainer import TrainConfig, Trainer

    ds = DataSet(root)
    train = ds.training_samples(ds.splits["train"], ds.splits["train"][:n_labeled])
    val = ds.training_samples(ds.splits["val"], ds.splits["val"])
    config = dict(method=method, network=TINY_NET, patch_size=TINY_PATCH, iterations=24, val_interval=12,
                  batch_unlabeled=1, lr=0.05, seed=0)
    config.update(overrides)
    trainer = Trainer(TrainConfig(**config), train, val, out_dir=out_dir)
    start = trainer.validate()
    return trainer, start, trainer.fit()


def assert_learned(start: float, result: dict) -> None:
    """Validation Dice rose well above where it started and ended up meaningful."""
    assert result["best_val_dice"] > start + 0.3, (start, result["history"])
    assert result["best_val_dice"] > 0.5

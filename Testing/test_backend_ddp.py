"""Distributed training: the worker runs a job under torchrun with 2 CPU processes (gloo, rendezvous on 127.0.0.1)
and it learns like the single-process job on the same data."""

from __future__ import annotations

import pytest

from conftest import TINY_NET, TINY_PATCH
from training.datastore import Datastore, import_folder
from training.registry import ModelRegistry
from training.worker import Worker

TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 30, "val_interval": 10, "device": "cpu",
         "batch_labeled": 1, "batch_unlabeled": 1, "init": "scratch", "tolerance": 1.0}


@pytest.mark.slow
def test_two_process_ddp_learns_like_single_process(tmp_path, tiny_dataset):
    store = Datastore(tmp_path / "store", create=True)
    import_folder(store, tiny_dataset, labels="train:3")
    store.update_settings({"score_passes": 0})
    single = store.create_job({**TRAIN, "nproc": 1})
    ddp = store.create_job({**TRAIN, "nproc": 2})
    Worker(store.root, threads=1, log=lambda m: None).run(once=True)
    single, ddp = store.job(single["job_id"]), store.job(ddp["job_id"])
    assert single["status"] == "succeeded", single["error"]
    assert ddp["status"] == "succeeded", ddp["error"]

    ranks = ddp["result"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    # DDP averaged the gradients, so both processes end with the same weights.
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-6)
    assert all(r["step"] == TRAIN["iterations"] for r in ranks)

    curves = {}
    for name, job in (("single", single), ("ddp", ddp)):
        dices = [h["val_dice"] for h in job["history"]]
        assert [h["step"] for h in job["history"]] == [10, 20, 30], name  # rank 0 reported the validation curve
        assert dices[-1] > dices[0] + 0.15 and job["result"]["val_dice"] > 0.5, (name, dices)
        curves[name] = dices
    # Same learning: the two-process run ends close to the single-process one.
    assert abs(curves["ddp"][-1] - curves["single"][-1]) < 0.15, curves
    assert ModelRegistry(store).model(ddp["result"]["model_version"])["metrics"]["nproc"] == 2
    assert (store.root / "jobs" / ddp["job_id"] / "torchrun.log").is_file()

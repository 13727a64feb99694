"""Training worker: learning from the datastore, promotion rule, NaN, cancellation, missing labels (in-process)."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from conftest import TINY_NET, TINY_PATCH
from SSLSegmentLib.data.volume import Volume
from training.datastore import Datastore, import_folder
from training.worker import Worker, promotion_decision

TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 30, "val_interval": 10,
         "batch_labeled": 2, "batch_unlabeled": 2, "device": "cpu"}


def _worker(root) -> Worker:
    return Worker(root, threads=1, poll_s=0.1, heartbeat_s=0.5, log=lambda m: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset):
    """A datastore (3 labeled train cases, labeled val) with v0001 trained from scratch by the worker."""
    root = tmp_path_factory.mktemp("worker") / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="train:3")
    store.update_settings({"train": TRAIN, "score_passes": 2})
    job = store.create_job({"init": "scratch"})
    _worker(root).run(once=True)
    return store, store.job(job["job_id"])


def test_first_version_learns_and_is_promoted(trained):
    store, job = trained
    assert job["status"] == "succeeded", job["error"]
    r = job["result"]
    assert r["model_version"] == "v0001" and r["promoted"] and store.current_model == "v0001"
    dices = [h["val_dice"] for h in job["history"]]
    assert len(dices) == 3 and dices[-1] > dices[0] + 0.2 and r["val_dice"] > 0.5  # it learned
    model = store.model("v0001")
    assert model["trained_on"]["n_labeled_cases"] == 3 and len(model["trained_on"]["revisions"]) == 3
    meta = json.loads((store.root / "models" / "v0001" / "version.json").read_text())
    assert meta["sha256"] == model["sha256"] and meta["parent"] is None
    assert not (store.root / "jobs" / job["job_id"] / "train").exists()  # scratch removed, the version kept its copy
    # The promotion re-scored every unreviewed train case for the next-case ranking.
    unreviewed = store.unreviewed("train")
    assert r["n_scored"] == len(unreviewed) == 5
    assert all(c["score_model_version"] == "v0001" and 0 <= c["score"] <= 1 for c in store.cases("train")
               if c["case_id"] in unreviewed)


def test_correction_trained_on_but_regression_not_promoted(trained):
    store, _ = trained
    cid = store.unreviewed("train")[0]
    shape = store.grid(cid).shape
    mask = np.zeros(shape, np.uint8)
    mask[:, :16] = 1
    g = store.grid(cid).geometry
    rev, _ = store.add_label(cid, Volume(np.zeros(shape, np.uint8), g), kind="correction", author="alice",
                             reviewed_mask=Volume(mask, g), model_version="v0001")
    # tolerance −1: the new version would have to beat the parent by a Dice of 1, which is impossible.
    job = store.create_job({"iterations": 4, "tolerance": -1.0})
    _worker(store.root).run(once=True)
    job = store.job(job["job_id"])
    assert job["status"] == "succeeded", job["error"]
    r = job["result"]
    assert not r["promoted"] and "not promoted" in r["reason"] and store.current_model == "v0001"
    model = store.model(r["model_version"])
    assert model["parent"] == "v0001" and not model["promoted"] and model["decision"] == r["reason"]
    assert rev["revision"] in model["trained_on"]["revisions"]
    assert r["parent_val_dice"] is not None and r["parent_val_dice"] > 0.5


def test_nan_loss_fails_the_job_and_keeps_current(trained):
    store, _ = trained
    n_models = len(store.models())
    job = store.create_job({"iterations": 20, "lr": 1e8})
    _worker(store.root).run(once=True)
    job = store.job(job["job_id"])
    assert job["status"] == "failed" and re.search(r"loss became (nan|inf)", job["error"])
    assert store.current_model == "v0001" and len(store.models()) == n_models


def test_cancel_stops_a_running_job(trained):
    store, _ = trained
    n_models = len(store.models())
    job = store.create_job({"iterations": 5000, "val_interval": 5000})
    worker = _worker(store.root)
    claimed = worker.store.claim_job(worker.worker_id)
    thread = threading.Thread(target=worker.run_job, args=(claimed,))
    thread.start()
    while (store.job(job["job_id"])["progress"] or {}).get("step", 0) < 2:
        assert thread.is_alive()
        time.sleep(0.1)
    store.request_cancel(job["job_id"])
    thread.join(timeout=120)
    j = store.job(job["job_id"])
    assert not thread.is_alive() and j["status"] == "cancelled" and j["progress"]["step"] < 5000
    assert len(store.models()) == n_models and store.current_model == "v0001"


def test_promotion_rule():
    assert promotion_decision(0.80, 0.81, "v0001", 0.02)[0]
    assert not promotion_decision(0.78, 0.81, "v0001", 0.02)[0]
    assert promotion_decision(0.5, None, None, 0.02)[0]
    promote, why = promotion_decision(float("nan"), 0.8, "v0001", 0.02)
    assert not promote and "no validation" in why


def test_job_without_labels_fails_with_reason(tmp_path, tiny_dataset):
    store = Datastore(tmp_path / "s", create=True)
    import_folder(store, tiny_dataset, labels="none")
    store.update_settings({"train": TRAIN})
    job = store.create_job({"init": "scratch"})
    _worker(store.root).run(once=True)
    j = store.job(job["job_id"])
    assert j["status"] == "failed" and "no labeled" in j["error"] and store.models() == []

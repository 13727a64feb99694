"""Training worker: learning from the datastore, promotion, NaN, cancellation, missing labels (in-process); the
training-parameter schema (training/jobs.py) it and the server follow."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from conftest import TINY_NET, TINY_PATCH
from SSLSegmentLib.data.volume import Volume
from training.datastore import Datastore, InvalidInput, import_folder
from training.jobs import PARAMS, TrainRequest, build_train_config, resolve_train_params
from training.registry import ModelRegistry
from training.worker import Worker

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
    assert r["model_version"] == "v0001" and r["promoted"] and ModelRegistry(store).current == "v0001"
    dices = [h["val_dice"] for h in job["history"]]
    assert len(dices) == 3 and dices[-1] > dices[0] + 0.2 and r["val_dice"] > 0.5  # it learned
    model = ModelRegistry(store).model("v0001")
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
    assert not r["promoted"] and "not promoted" in r["reason"] and ModelRegistry(store).current == "v0001"
    model = ModelRegistry(store).model(r["model_version"])
    assert model["parent"] == "v0001" and not model["promoted"] and model["decision"] == r["reason"]
    assert rev["revision"] in model["trained_on"]["revisions"]
    assert r["parent_val_dice"] is not None and r["parent_val_dice"] > 0.5
    # The decision's numbers are in the registry: per-case Dice of both versions, the paired interval, the rule.
    c = model["metrics"]["promotion"]
    val_cases = sorted(x["case_id"] for x in store.cases("val"))
    assert c["cases"] == val_cases and c["n_cases"] == len(val_cases) and c["tolerance"] == -1.0
    assert c["interval"][0] <= c["mean_difference"] <= c["interval"][1] and c["interval"][0] < 1.0
    assert c["mean_parent"] == pytest.approx(r["parent_val_dice"]) and c["mean_new"] == pytest.approx(r["val_dice"])
    assert model["metrics"]["val_dice_per_case"] == dict(zip(c["cases"], c["new"]))
    # Retention: per corrected case, the share of its reviewed voxels each version labels as the correction does;
    # the parent's number, recomputed here, is what the job recorded.
    from SSLSegmentLib.ml.inference import Predictor

    for key, version in (("parent_retention", "v0001"), ("retention", r["model_version"])):
        kept = r[key]
        assert set(kept["per_case"]) == {cid} and kept["reviewed_voxels"][cid] == int(mask.sum())
        predictor = Predictor.from_checkpoint(ModelRegistry(store).model_path(version), passes=1, device="cpu")
        label = predictor(store.load_image(cid)).label
        assert kept["per_case"][cid] == pytest.approx(float((label[mask > 0] == 0).mean()))
        assert kept["min"] == kept["overall"] == kept["per_case"][cid]
    assert model["metrics"]["retention"] == r["retention"]


def test_nan_loss_fails_the_job_and_keeps_current(trained):
    store, _ = trained
    n_models = len(ModelRegistry(store).models())
    job = store.create_job({"iterations": 20, "lr": 1e8})
    _worker(store.root).run(once=True)
    job = store.job(job["job_id"])
    assert job["status"] == "failed" and re.search(r"loss became (nan|inf)", job["error"])
    assert ModelRegistry(store).current == "v0001" and len(ModelRegistry(store).models()) == n_models


def test_cancel_stops_a_running_job(trained):
    store, _ = trained
    n_models = len(ModelRegistry(store).models())
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
    assert len(ModelRegistry(store).models()) == n_models and ModelRegistry(store).current == "v0001"


# One valid value of every parameter of the schema (a test fails when a parameter is added without one here).
EVERY_PARAM = {
    "method": "mean-teacher", "iterations": 12, "lr": 0.02, "batch_labeled": 2, "batch_unlabeled": 3, "seed": 7,
    "val_interval": 6, "patch_size": [16, 32, 32], "tolerance": 0.1, "init": "scratch", "network": TINY_NET,
    "method_options": {"consistency_weight": 0.5}, "nproc": 2, "device": "cpu", "momentum": 0.8, "weight_decay": 0.0,
    "ema_decay": 0.95, "augment": False, "lr_schedule": "poly", "rampup_steps": 5, "eval_model": "teacher",
    "pretrain_iterations": 2, "reviewed_patch_share": 0.25,
}


def test_the_parameter_schema_gives_request_checks_and_config(trained):
    from SSLSegmentLib.ml.trainer import TrainConfig

    store, _ = trained
    assert set(EVERY_PARAM) == {p.name for p in PARAMS}
    assert set(TrainRequest.model_fields) == {p.name for p in PARAMS}
    request = TrainRequest(**EVERY_PARAM).model_dump(exclude_none=True)
    assert request == EVERY_PARAM
    with pytest.raises(ValueError):
        TrainRequest(colour="blue")
    params = resolve_train_params(store, request, default_nproc=4)
    assert params == {**store.settings["train"], **EVERY_PARAM}  # the request wins over every default
    config = build_train_config(params, None)
    for p in PARAMS:
        if p.config:
            assert getattr(config, p.name) == (tuple(EVERY_PARAM[p.name]) if p.name == "patch_size"
                                               else EVERY_PARAM[p.name]), p.name
        else:
            assert p.name == "network" or not hasattr(TrainConfig, p.name), p.name
    assert build_train_config({**params, "val_interval": 50}, None).val_interval == 12  # at most the iterations
    # Defaults: settings.train, then each parameter's own source; the worker's --nproc beats settings.train.
    defaults = resolve_train_params(store, {}, default_nproc=2)
    assert defaults["init"] == "current" and defaults["tolerance"] == store.settings["tolerance"]
    assert defaults["nproc"] == 2 and defaults["iterations"] == TRAIN["iterations"]
    # Fine-tuning keeps the parent's network and patch size (the checkpoint's one accessor).
    from SSLSegmentLib.ml.checkpoint import load_checkpoint

    parent = load_checkpoint(ModelRegistry(store).model_path("v0001"))
    tuned = build_train_config({**defaults, "patch_size": None, "network": {"channels": [4, 8, 16]}}, parent)
    assert tuned.network == parent["network"] and tuned.patch_size == tuple(parent["train_config"]["patch_size"])


@pytest.mark.parametrize("bad, message", [
    ({"iterations": 0}, "iterations must be between 1 and 1000000"),
    ({"iterations": True}, "iterations must be an integer"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"nproc": 65}, "nproc (processes: at most this machine"),
    ({"method": "magic"}, "unknown method 'magic'"),
    ({"init": "v0099"}, "init must be 'current', 'scratch' or an existing version"),
    ({"init": "../v1"}, "init must be 'current', 'scratch' or an existing version"),
    ({"patch_size": [16, 32]}, "patch_size must be three integers"),
    ({"network": {"colour": 1}}, "network:"),
    ({"method_options": [1]}, "method_options must be an object"),
    ({"augment": 1}, "augment must be a boolean"),
    ({"colour": 3}, "unknown training parameter(s) ['colour']"),
])
def test_the_schema_refuses_bad_parameters(trained, bad, message):
    store, _ = trained
    with pytest.raises(InvalidInput) as err:
        resolve_train_params(store, bad)
    assert message in str(err.value)


def test_job_without_labels_fails_with_reason(tmp_path, tiny_dataset):
    store = Datastore(tmp_path / "s", create=True)
    import_folder(store, tiny_dataset, labels="none")
    store.update_settings({"train": TRAIN})
    job = store.create_job({"init": "scratch"})
    _worker(store.root).run(once=True)
    j = store.job(job["job_id"])
    assert j["status"] == "failed" and "no labeled" in j["error"] and ModelRegistry(store).models() == []


def test_a_case_that_cannot_be_scored_after_a_promotion_leaves_the_job_consistent(tmp_path, tiny_dataset):
    """Scoring runs after the promotion: an unreviewed case whose image is gone from disk is named in the job's
    result, the others are scored, and the job that promoted its version is a succeeded job (it used to fail with
    its version already current)."""
    root = tmp_path / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="train:3")
    store.update_settings({"train": TRAIN, "score_passes": 2})
    unreviewed = store.unreviewed("train")
    lost = unreviewed[0]
    job = store.create_job({"init": "scratch", "iterations": 80, "val_interval": 80})
    worker = threading.Thread(target=_worker(root).run, kwargs={"once": True})
    worker.start()
    # The training set is in memory once training runs; the image goes away before the scoring pass reads it.
    while (store.job(job["job_id"]).get("progress") or {}).get("phase") != "training":
        assert worker.is_alive(), store.job(job["job_id"])
        time.sleep(0.01)
    (root / store.case(lost)["image"]).unlink()
    worker.join(timeout=300)
    job = store.job(job["job_id"])
    assert job["status"] == "succeeded", job["error"]
    r = job["result"]
    assert r["promoted"] and ModelRegistry(store).current == r["model_version"]
    assert r["n_scored"] == len(unreviewed) - 1 and len(r["scoring_errors"]) == 1
    assert r["scoring_errors"][0].startswith(f"{lost}: ")
    scored = {c["case_id"]: c["score_model_version"] for c in store.cases("train") if c["case_id"] in unreviewed}
    assert scored.pop(lost) is None and set(scored.values()) == {r["model_version"]}

"""The retrain after corrections (training/retrain.py): a fine-tune from a published model is sized to the cases
that changed since that model, unless the request names its own schedule; bad schedule settings are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_NET, TINY_PATCH
from SSLSegmentLib.data.volume import Volume
from training.datastore import Datastore, InvalidInput, import_folder
from training.registry import ModelRegistry
from training.retrain import RetrainSchedule, new_cases
from training.worker import Worker

TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 20, "val_interval": 10,
         "batch_labeled": 2, "batch_unlabeled": 2, "device": "cpu"}
RETRAIN = {"base_iterations": 4, "per_new_case": 3, "max_iterations": 12, "lr": 0.005, "val_checks": 2}


def test_the_schedule_grows_with_the_new_cases_up_to_its_cap():
    s = RetrainSchedule(base_iterations=60, per_new_case=60, max_iterations=600)
    assert [s.plan(n)["iterations"] for n in (0, 1, 2, 9, 10, 50)] == [60, 120, 180, 600, 600, 600]
    p = s.plan(2)
    assert p["lr"] == 0.01 and p["lr_schedule"] == "poly" and p["eval_model"] == "student"
    assert p["val_interval"] == 90  # two validations per run
    with pytest.raises(ValueError, match="new_cases"):
        s.plan(-1)


def test_new_cases_are_those_with_a_revision_the_parent_did_not_train_on():
    snapshot = {"a": [1], "b": [2, 5], "c": [], "d": [6]}
    assert new_cases(snapshot, [1, 2]) == ["b", "d"]
    assert new_cases(snapshot, [1, 2, 5, 6]) == []
    assert new_cases(snapshot, []) == ["a", "b", "d"]


@pytest.mark.parametrize("bad, message", [
    ({"lr": -1}, "lr must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"per_new_case": 2.5}, "per_new_case must be an integer"),
    ({"base_iterations": 100, "max_iterations": 50}, "is below base_iterations"),
    ({"eval_model": "both"}, "eval_model must be one of student, teacher"),
    ({"lr_schedule": "cosine"}, "lr_schedule must be one of constant, step, poly"),
    ({"ema_decay": 1.0}, "ema_decay must be in"),
    ({"iterations": 100}, "unknown retrain setting"),
])
def test_a_bad_retrain_setting_is_refused_and_the_settings_stay(tmp_path, bad, message):
    store = Datastore(tmp_path / "store", create=True)
    before = store.settings["retrain"]
    with pytest.raises(InvalidInput, match=message):
        store.update_settings({"retrain": bad})
    assert store.settings["retrain"] == before == RetrainSchedule().to_dict()


def test_a_retrain_setting_is_checked_with_the_ones_already_stored(tmp_path):
    store = Datastore(tmp_path / "store", create=True)
    store.update_settings({"retrain": {"base_iterations": 200}})
    with pytest.raises(InvalidInput, match=r"max_iterations \(150\) is below base_iterations \(200\)"):
        store.update_settings({"retrain": {"max_iterations": 150}})
    assert store.settings["retrain"]["base_iterations"] == 200 and store.settings["retrain"]["max_iterations"] == 600


def _correct(store: Datastore, case_id: str, version: str) -> int:
    grid = store.grid(case_id)
    mask = np.zeros(grid.shape, np.uint8)
    mask[:, :8] = 1
    rev, _ = store.add_label(case_id, Volume(np.zeros(grid.shape, np.uint8), grid.geometry), kind="correction",
                             author="alice", reviewed_mask=Volume(mask, grid.geometry), model_version=version)
    return rev["revision"]


def _params(store: Datastore, model: dict) -> dict:
    return json.loads((store.root / "models" / model["version"] / "version.json").read_text())["params"]


def _run(store: Datastore, params: dict) -> dict:
    job = store.create_job(params)
    Worker(store.root, threads=1, poll_s=0.1, heartbeat_s=0.5, log=lambda m: None).run(once=True)
    job = store.job(job["job_id"])
    assert job["status"] == "succeeded", job["error"]
    return ModelRegistry(store).model(job["result"]["model_version"])


def test_a_fine_tune_runs_the_schedule_sized_to_what_changed_and_a_request_keeps_its_own(tmp_path, tiny_dataset):
    store = Datastore(tmp_path / "store", create=True)
    import_folder(store, tiny_dataset, labels="train:3")
    store.update_settings({"train": TRAIN, "retrain": RETRAIN, "score_passes": 0, "tolerance": 1.0})
    first = _run(store, {"init": "scratch"})
    assert first["metrics"]["iterations"] == 20 and first["metrics"]["retrain"] is None  # not a fine-tune
    for cid in store.unreviewed("train")[:2]:
        _correct(store, cid, first["version"])

    second = _run(store, {})  # as the Slicer panel and `make demo` start a retrain
    m = second["metrics"]
    assert second["parent"] == first["version"] and m["retrain"]["new_cases"] == 2
    assert m["iterations"] == 4 + 2 * 3  # not settings.train's 20
    assert m["retrain"]["applied"]["lr"] == 0.005 and m["retrain"]["applied"]["eval_model"] == "student"
    assert second["trained_on"]["revisions"] != first["trained_on"]["revisions"]

    third = _run(store, {})  # nothing new since the second
    assert third["metrics"]["retrain"]["new_cases"] == 0 and third["metrics"]["iterations"] == 4

    teacher_kept = _run(store, {"eval_model": "teacher"})  # one parameter named: the schedule sizes the rest
    assert teacher_kept["metrics"]["iterations"] == 4 and _params(store, teacher_kept)["eval_model"] == "teacher"
    assert teacher_kept["metrics"]["retrain"]["kept_from_request"] == ["eval_model"]
    assert "eval_model" not in teacher_kept["metrics"]["retrain"]["applied"]

    own = _run(store, {"iterations": 7, "lr": 0.001})  # a request that sizes the run itself runs as asked
    r = own["metrics"]["retrain"]
    assert own["metrics"]["iterations"] == 7 and r["kept_from_request"] == ["iterations", "lr"]
    assert r["applied"] == {} and r["schedule"] is None
    assert "lr_schedule" not in _params(store, own)  # TrainConfig's constant rate, not the schedule's poly

    for cid in store.unreviewed("train")[:5]:
        _correct(store, cid, own["version"])
    capped = _run(store, {})
    assert capped["metrics"]["retrain"]["new_cases"] >= 3 and capped["metrics"]["iterations"] == 12

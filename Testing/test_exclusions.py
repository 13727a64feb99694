"""Audited exclusions: a case or a label revision taken out of training without deleting anything, through the
REST API (live server on 127.0.0.1), the client and the command line; every change stays in the record."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_NET, TINY_PATCH
from SSLSegmentLib.review.client import ConflictError, NotFoundError, ValidationError
from SSLSegmentLib.review.local_backend import LocalBackend
from training.datastore import Datastore, import_folder
from training.registry import ModelRegistry
from training.training_set import training_snapshot

TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 4, "val_interval": 4, "device": "cpu",
         "batch_labeled": 2, "batch_unlabeled": 0}


@pytest.fixture()
def served(tmp_path, tiny_dataset):
    root = tmp_path / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="train:3")
    store.update_settings({"train": TRAIN, "score_passes": 0})
    with LocalBackend(root, with_worker=False).start().wait_until_ready() as handle:
        yield store, handle.client(timeout=60)


def test_an_excluded_revision_or_case_leaves_training_and_comes_back_when_lifted(served):
    store, client = served
    labeled = sorted(c for c, revs in training_snapshot(store)["train"].items() if revs)
    case, other = labeled[0], labeled[1]
    revision = client.label_history(case)[-1]["revision"]
    val_case = sorted(training_snapshot(store)["val"])[0]

    by_revision = client.exclude(case, "label drawn on the wrong series", revision=revision, author="alice")
    by_case = client.exclude(other, "motion artefacts", author="bob")
    by_val = client.exclude(val_case, "not a left atrium", author="bob")
    snap = training_snapshot(store)
    assert snap["train"][case] == []  # the case stays, as unlabeled data
    assert other not in snap["train"] and val_case not in snap["val"]  # out entirely
    assert all((store.root / r["files"]["label"]).is_file() for r in client.label_history(case))  # nothing deleted

    lifted = client.lift_exclusion(by_revision["id"], "checked: it was the right series", author="carol")
    assert lifted["active"] is False and lifted["lifted_by"] == "carol"
    assert training_snapshot(store)["train"][case] == [revision]
    trail = client.exclusions()
    assert [(e["id"], e["active"]) for e in trail] == [(by_revision["id"], False), (by_case["id"], True),
                                                       (by_val["id"], True)]
    assert trail[0]["reason"] == "label drawn on the wrong series" and trail[0]["lift_reason"].startswith("checked")
    assert [e["id"] for e in client.exclusions(active=True)] == [by_case["id"], by_val["id"]]

    # A job started now trains without the excluded case: its version says what it was trained on.
    from training.worker import Worker

    job = client.start_training(init="scratch")
    Worker(store.root, threads=1, poll_s=0.1, heartbeat_s=0.5, log=lambda m: None).run(once=True)
    result = client.job_status(job["job_id"])
    assert result["status"] == "succeeded", result["error"]
    trained_on = ModelRegistry(store).model(result["result"]["model_version"])["trained_on"]
    other_revisions = {r["revision"] for r in client.label_history(other)}
    assert revision in trained_on["revisions"] and not other_revisions & set(trained_on["revisions"])
    assert val_case not in trained_on["val_cases"]


def test_exclusions_refuse_what_they_cannot_record(served):
    store, client = served
    cases = sorted(training_snapshot(store)["train"])
    case, other = cases[0], cases[-1]
    with pytest.raises(ValidationError) as err:
        client.exclude(case, "")
    assert err.value.status == 422
    with pytest.raises(ValidationError):
        client.exclude(case, "   ")  # a reason of blanks says nothing either
    with pytest.raises(NotFoundError):
        client.exclude("no-such-case", "typo")
    foreign = client.label_history(case)[-1]["revision"]
    with pytest.raises(NotFoundError, match="has no label revision"):
        client.exclude(other, "wrong case", revision=foreign)
    first = client.exclude(case, "twice")
    with pytest.raises(ConflictError, match="already excluded"):
        client.exclude(case, "twice")
    client.lift_exclusion(first["id"], "done")
    with pytest.raises(ConflictError, match="lifted already"):
        client.lift_exclusion(first["id"], "done again")
    with pytest.raises(NotFoundError):
        client.lift_exclusion(9999, "none such")
    assert [e["id"] for e in client.exclusions()] == [first["id"]]  # the refusals recorded nothing


def test_the_command_line_excludes_lists_and_lifts(tmp_path, tiny_dataset, capsys):
    from training.cli import main

    root = tmp_path / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="train:2")
    case = sorted(c for c, revs in training_snapshot(store)["train"].items() if revs)[0]
    assert main(["exclude", "--datastore", str(root), "--case", case, "--reason", "bad scan", "--author", "dana"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["case_id"] == case and made["active"] and case not in training_snapshot(store)["train"]
    assert main(["exclusions", "--datastore", str(root), "--lift", str(made["id"])]) == 2  # no reason: refused
    assert "reason" in capsys.readouterr().err
    assert main(["exclusions", "--datastore", str(root), "--lift", str(made["id"]), "--reason", "rescanned"]) == 0
    capsys.readouterr()
    assert main(["exclusions", "--datastore", str(root)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["lift_reason"] == "rescanned" and not entry["active"] and case in training_snapshot(store)["train"]

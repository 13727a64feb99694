"""Datastore: layout, immutable revisions, fixed splits, the correction merge rule (training_set), review orderings
(strategies) and leases, jobs, the archived uncertainty map and region views, the model registry and its promotion
rule."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from SSLSegmentLib.data.volume import Geometry, Volume
from SSLSegmentLib.data.imageio import read_volume, write_volume
from training.datastore import (
    REGION_VIEW_RE,
    Conflict,
    Datastore,
    InvalidInput,
    NotFound,
    hash_split,
    import_folder,
    region_view,
)
from training.registry import ModelRegistry, promotion_decision
from training.strategies import STRATEGIES, RandomOrder, get_strategy
from training.training_set import load_training_set, training_snapshot


@pytest.fixture
def store(tmp_path, tiny_dataset):
    s = Datastore(tmp_path / "store", create=True, split_seed="seed-1")
    import_folder(s, tiny_dataset, labels="train:2")
    return s


def _grid_volume(store: Datastore, case_id: str, array: np.ndarray) -> Volume:
    return Volume(array.astype(np.uint8), store.grid(case_id).geometry)


def _train_ids(store):
    return [c["case_id"] for c in store.cases("train")]


def test_import_keeps_dataset_splits_and_requested_labels(store, tiny_dataset):
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    for split in ("train", "val", "test"):
        assert sorted(c["case_id"] for c in store.cases(split)) == sorted(meta["splits"][split])
    labeled = {c["case_id"] for c in store.cases() if c["labeled"]}
    # train:2 → the first two train cases plus every val case; test and the other train cases stay unlabeled.
    assert labeled == set(meta["splits"]["train"][:2]) | set(meta["splits"]["val"])
    assert (store.root / "labels" / "final" / f"{meta['splits']['train'][0]}.nrrd").is_file()
    # Importing again registers nothing twice.
    again = import_folder(store, tiny_dataset, labels="train:2")
    assert again["registered"] == 0 and again["labels"] == 0 and again["existing"] == 12
    assert oct(store.index_dir.stat().st_mode & 0o777) == "0o700"


def test_hash_split_is_fixed_and_ratio_driven(tmp_path, tiny_dataset):
    ids = [f"c{i:03d}" for i in range(400)]
    splits = [hash_split(i, "s", (0.6, 0.3, 0.1)) for i in ids]
    frac = {k: splits.count(k) / len(ids) for k in ("train", "val", "test")}
    assert abs(frac["train"] - 0.6) < 0.08 and abs(frac["val"] - 0.3) < 0.08 and abs(frac["test"] - 0.1) < 0.05
    assert splits == [hash_split(i, "s", (0.6, 0.3, 0.1)) for i in ids]  # deterministic
    # Registered cases keep their split no matter what is registered later.
    s = Datastore(tmp_path / "s2", create=True, split_ratios=(0.5, 0.5, 0.0), split_seed="abc")
    first = sorted(tiny_dataset.glob("*.nrrd"))[:3]
    for p in first:
        s.register_image(p, case_id=p.stem)
    before = {c["case_id"]: c["split"] for c in s.cases()}
    for p in sorted(tiny_dataset.glob("*.nrrd"))[3:]:
        s.register_image(p, case_id=p.stem)
    after = {c["case_id"]: c["split"] for c in s.cases()}
    assert {k: after[k] for k in before} == before
    assert before == {k: hash_split(k, "abc", (0.5, 0.5, 0.0)) for k in before}


def test_register_rejects_bad_ids_files_and_conflicts(store, tiny_dataset, tmp_path):
    img = sorted(tiny_dataset.glob("*.nrrd"))[0]
    for bad in ("../evil", "a/b", "..", ".hidden", "x" * 200, ""):
        with pytest.raises(InvalidInput):
            store.register_image(img, case_id=bad or "/")
    assert not (store.root.parent / "evil.nrrd").exists()
    other = sorted(tiny_dataset.glob("*.nrrd"))[1]
    with pytest.raises(Conflict, match="different image"):
        store.register_image(other, case_id=img.stem)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"NRRD0004\nthis is not an image\n")
    with pytest.raises(InvalidInput, match="not a readable image"):
        store.register_image(junk, case_id="junk")
    flat = tmp_path / "flat.nrrd"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(flat))
    with pytest.raises(InvalidInput, match="3D"):
        store.register_image(flat, case_id="flat")
    assert "junk" not in {c["case_id"] for c in store.cases()} and "flat" not in {c["case_id"] for c in store.cases()}
    # Content-derived ids make a re-sent image a no-op.
    case, created = store.register_image(img)
    case2, created2 = store.register_image(img)
    assert created and not created2 and case["case_id"] == case2["case_id"].strip() and case["case_id"].startswith("case-")


def test_label_revisions_are_immutable_and_checked(store):
    cid = _train_ids(store)[3]
    grid = store.grid(cid)
    a = np.zeros(grid.shape, np.uint8)
    a[5:10, 5:10, 5:10] = 1
    r1, _ = store.add_label(cid, _grid_volume(store, cid, a), kind="final", author="alice")
    first = store.abs(r1["files"]["label"])
    digest = first.read_bytes()
    r2, _ = store.add_label(cid, _grid_volume(store, cid, 1 - a), kind="final", author="bob")
    assert r2["revision"] > r1["revision"] and r2["files"]["label"] != r1["files"]["label"]
    assert first.read_bytes() == digest  # never overwritten
    assert "@2" in r2["files"]["label"]
    assert [r["revision"] for r in store.revisions(cid)] == [r1["revision"], r2["revision"]]

    with pytest.raises(InvalidInput, match="reviewed mask"):
        store.add_label(cid, _grid_volume(store, cid, a), kind="correction", author="alice")
    with pytest.raises(InvalidInput, match="empty"):
        store.add_label(cid, _grid_volume(store, cid, a), kind="correction", author="alice",
                        reviewed_mask=_grid_volume(store, cid, np.zeros(grid.shape)))
    with pytest.raises(InvalidInput, match="0..1"):
        store.add_label(cid, _grid_volume(store, cid, a * 3), kind="final")
    moved = Volume(a, Geometry(grid.geometry.spacing, tuple(np.add(grid.geometry.origin, 5.0)), grid.geometry.direction))
    with pytest.raises(InvalidInput, match="geometry does not match"):
        store.add_label(cid, moved, kind="final")
    with pytest.raises(InvalidInput, match="size"):
        store.add_label(cid, Volume(a[:-1], grid.geometry), kind="final")
    with pytest.raises(InvalidInput, match="author"):
        store.add_label(cid, _grid_volume(store, cid, a), kind="final", author="../root")
    with pytest.raises(NotFound):
        store.add_label("no-such-case", _grid_volume(store, cid, a), kind="final")
    assert len(store.revisions(cid)) == 2  # nothing of the refused ones was indexed


def test_submission_id_makes_retries_idempotent(store):
    cid = _train_ids(store)[4]
    lab = _grid_volume(store, cid, np.ones(store.grid(cid).shape))
    r1, created1 = store.add_label(cid, lab, kind="final", submission_id="sub-0001-abcdef")
    r2, created2 = store.add_label(cid, lab, kind="final", submission_id="sub-0001-abcdef")
    assert created1 and not created2 and r1["revision"] == r2["revision"]
    assert len(store.revisions(cid)) == 1


def test_training_set_merges_corrections_inside_reviewed_masks(store):
    ids = _train_ids(store)
    labeled, cid = ids[0], ids[5]
    shape = store.grid(cid).shape
    # alice: label 1 in a block she reviewed; bob later reviews an overlapping block and says 0 there.
    la, ma = np.zeros(shape), np.zeros(shape)
    la[2:10, 2:10, 2:10], ma[0:12, 0:12, 0:12] = 1, 1
    lb, mb = np.zeros(shape), np.zeros(shape)
    mb[8:16, 8:16, 8:16] = 1
    store.add_label(cid, _grid_volume(store, cid, la), kind="correction", author="alice",
                    reviewed_mask=_grid_volume(store, cid, ma))
    store.add_label(cid, _grid_volume(store, cid, lb), kind="correction", author="bob",
                    reviewed_mask=_grid_volume(store, cid, mb))
    snap = training_snapshot(store)
    samples, val = load_training_set(store, snap)
    by_id = {s.case_id: s for s in samples}
    s = by_id[cid]
    np.testing.assert_array_equal(s.labeled_mask, np.maximum(ma, mb).astype(np.uint8))
    assert s.label[3, 3, 3] == 1  # alice only
    assert s.label[9, 9, 9] == 0  # both reviewed; bob's later revision wins
    assert s.label[14, 14, 14] == 0 and s.labeled_mask[20, 20, 20] == 0
    assert by_id[labeled].labeled_mask.all()  # a final label: every voxel known
    assert not by_id[ids[6]].labeled_mask.any()  # untouched: unlabeled
    assert {v.case_id for v in val} == {c["case_id"] for c in store.cases("val")}
    # A final label submitted later supersedes earlier corrections.
    final = np.zeros(shape)
    final[0:4] = 1
    store.add_label(cid, _grid_volume(store, cid, final), kind="final", author="carol")
    s2 = {x.case_id: x for x in load_training_set(store, training_snapshot(store))[0]}[cid]
    assert s2.labeled_mask.all() and s2.label[9, 9, 9] == 0 and s2.label[1, 9, 9] == 1
    # Corrections on validation cases are stored but never leak into training.
    vid = store.cases("val")[0]["case_id"]
    store.add_label(vid, _grid_volume(store, vid, np.zeros(shape)), kind="correction", author="alice",
                    reviewed_mask=_grid_volume(store, vid, np.ones(shape)))
    assert vid not in training_snapshot(store)["train"]


def test_next_case_ranks_by_uncertainty_and_respects_leases(store):
    ids = store.unreviewed("train")
    assert len(ids) == 6
    store.set_score(ids[2], 0.9, 10.0, "v0001")
    store.set_score(ids[4], 0.5, 90.0, "v0001")
    uncertainty = get_strategy("uncertainty")
    assert store.next_case(uncertainty, "alice")["case_id"] == ids[2]
    # alice holds ids[2]; bob gets the next best, and alice asking again resumes her own case.
    assert store.next_case(uncertainty, "bob")["case_id"] == ids[4]
    assert store.next_case(uncertainty, "alice")["case_id"] == ids[2]
    served = store.next_case(get_strategy("uncertainty_sum"), "carol")
    assert served["case_id"] not in (ids[2], ids[4]) and served["strategy"] == "uncertainty_sum"
    # Submitting releases the lease and takes the case out of the queue.
    store.add_label(ids[2], _grid_volume(store, ids[2], np.zeros(store.grid(ids[2]).shape)), kind="final")
    assert ids[2] not in store.unreviewed("train")
    # Expired leases are free again.
    store.update_settings({"lease_s": 0.0})
    assert store.next_case(uncertainty, "bob")["case_id"] == ids[4]  # renewed with a zero-length lease
    assert store.next_case(uncertainty, "dave")["case_id"] == ids[4]
    picks = {store.next_case(RandomOrder(np.random.default_rng(i)), "eve")["case_id"] for i in range(20)}
    assert len(picks) > 1 and ids[2] not in picks
    with pytest.raises(InvalidInput):
        get_strategy("most-fun")
    with pytest.raises(InvalidInput, match="author"):
        store.next_case(uncertainty, "../eve")


def test_strategies_order_candidates_without_the_datastore(store):
    from training.datastore import Candidate

    cands = [Candidate("b", None, None), Candidate("a", 0.2, 50.0), Candidate("c", 0.7, 5.0), Candidate("d", 0.7, 1.0)]
    assert STRATEGIES["uncertainty"]().pick(cands) == "c"  # ties broken by id
    assert STRATEGIES["uncertainty_sum"]().pick(cands) == "a"
    assert STRATEGIES["uncertainty"]().pick([Candidate("z", None, None), Candidate("y", None, None)]) == "y"
    assert {STRATEGIES["random"](np.random.default_rng(i)).pick(cands) for i in range(40)} == {"a", "b", "c", "d"}

    class LastById:  # any object with a name and pick() is an ordering; the datastore does not branch on names
        name = "last"

        def pick(self, candidates):
            return max(c.case_id for c in candidates)

    got = store.next_case(LastById(), "alice")
    assert got["case_id"] == max(store.unreviewed("train")) and got["strategy"] == "last"


def test_jobs_are_claimed_once_under_concurrency(store):
    jobs = [store.create_job({"iterations": 1}) for _ in range(6)]
    claimed, barrier = [], threading.Barrier(4)

    def claimer(n):
        s = Datastore(store.root)
        barrier.wait()
        while (job := s.claim_job(f"w{n}")) is not None:
            claimed.append(job["job_id"])
        s.close()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(claimed) == sorted(j["job_id"] for j in jobs)  # every job exactly once


def test_stale_jobs_are_requeued_then_failed(store):
    import subprocess
    import sys

    job = store.create_job({})
    store.claim_job("w1")
    # Pretend the claimer was a process that has since died.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.db.execute("UPDATE jobs SET pid = ? WHERE job_id = ?", (dead.pid, job["job_id"]))
    assert store.recover_stale_jobs(stale_after_s=3600, max_attempts=2)[0]["job_id"] == job["job_id"]
    assert store.job(job["job_id"])["status"] == "queued"
    store.claim_job("w2")
    assert store.recover_stale_jobs(stale_after_s=3600) == []  # alive and fresh: left alone
    store.db.execute("UPDATE jobs SET heartbeat = 0 WHERE job_id = ?", (job["job_id"],))
    store.recover_stale_jobs(stale_after_s=60, max_attempts=2)
    j = store.job(job["job_id"])
    assert j["status"] == "failed" and "worker lost" in j["error"] and j["attempts"] == 2
    # A recovered job can no longer be finished by its old worker.
    assert not store.finish_job(job["job_id"], "succeeded", worker="w2")


def test_retrain_trigger_counts_new_corrections(store):
    store.update_settings({"retrain_every": 2})
    ids = store.unreviewed("train")
    shape = store.grid(ids[0]).shape

    def correct(cid):
        store.add_label(cid, _grid_volume(store, cid, np.zeros(shape)), kind="correction",
                        reviewed_mask=_grid_volume(store, cid, np.ones(shape)))
        return store.maybe_queue_retrain()

    assert correct(ids[0]) is None
    job = correct(ids[1])
    assert job is not None and job["trigger"] == "corrections"
    assert correct(ids[2]) is None  # one is already queued
    store.request_cancel(job["job_id"])
    # The count restarts at the last job: ids[2] and ids[3] are the two new corrections since.
    job2 = correct(ids[3])
    assert job2 is not None and job2["job_id"] != job["job_id"]
    store.update_settings({"retrain_every": 0})
    store.request_cancel(job2["job_id"])
    assert correct(ids[4]) is None and correct(ids[5]) is None  # manual only


def _checkpoint(tmp_path, tiny_net_config):
    from SSLSegmentLib.ml.networks import build_network
    from SSLSegmentLib.ml.checkpoint import CHECKPOINT_FORMAT, save_checkpoint

    net = build_network(tiny_net_config)
    ckpt = {"format": CHECKPOINT_FORMAT, "model": net.state_dict(), "network": tiny_net_config.to_dict(),
            "train_config": {"patch_size": [16, 32, 32]}, "method": "brl"}
    return save_checkpoint(ckpt, tmp_path / "a.pt")


def test_model_versions_promote_rollback_and_compare_and_set(store, tmp_path, tiny_net_config):
    import torch

    registry = ModelRegistry(store)
    path = _checkpoint(tmp_path, tiny_net_config)
    v1 = registry.add_version(path, {"parent": None, "metrics": {"val_dice": 0.5}, "trained_on": {}})
    v2 = registry.add_version(path, {"parent": "v0001", "metrics": {"val_dice": 0.6}, "trained_on": {}})
    assert (v1["version"], v2["version"]) == ("v0001", "v0002") and registry.current is None
    assert (store.root / "models" / "v0001" / "model.pt").read_bytes() == path.read_bytes()
    assert json.loads((store.root / "models" / "v0002" / "version.json").read_text())["parent"] == "v0001"
    with pytest.raises(InvalidInput, match="nothing to roll back"):
        registry.rollback()
    registry.promote("v0002")
    assert registry.promote("v0001")["previous"] == "v0002" and registry.current == "v0001"  # by hand
    assert registry.rollback() == {"current": "v0002", "previous": "v0001"} and registry.current == "v0002"
    with pytest.raises(Conflict):
        registry.promote("v0001", expected_current="v0001")
    assert [p["version"] for p in registry.promotion_history()] == ["v0002", "v0001", "v0002"]
    assert [m["current"] for m in registry.models()] == [False, True]
    assert registry.summary() == {"current_model": "v0002", "n_models": 2}
    with pytest.raises(NotFound):
        registry.promote("v0099")
    with pytest.raises(InvalidInput):
        registry.model("../v1")
    bad = tmp_path / "bad.pt"
    torch.save({"not": "a checkpoint"}, bad)
    with pytest.raises(ValueError, match="not an SSLSegment checkpoint"):
        registry.add_version(bad, {})
    assert len(registry.models()) == 2 and not list((store.root / "models").glob(".tmp-*"))
    # A second datastore handle (another process) sees the same pointer.
    assert ModelRegistry(Datastore(store.root)).current == "v0002"


def _scores(*values):
    return {f"case{i:02d}": float(v) for i, v in enumerate(values)}


def test_promotion_rule():
    parent = _scores(*[0.80] * 10)
    better = promotion_decision(_scores(*[0.83] * 10), parent, "v0001", 0.02)
    assert better[0] and better[2]["interval"][0] > 0 and better[2]["mean_difference"] == pytest.approx(0.03)
    # A small, consistent drop inside the tolerance is not a reason to hold a version back ...
    assert promotion_decision(_scores(*[0.79, 0.795] * 5), parent, "v0001", 0.02)[0]
    # ... a consistent drop beyond it is.
    assert not promotion_decision(_scores(*[0.77] * 10), parent, "v0001", 0.02)[0]
    promote, why, c = promotion_decision(_scores(0.5), _scores(0.9), "v0003", 0.1)
    assert not promote and why.startswith("not promoted") and "v0003" in why and c["n_cases"] == 1
    assert promotion_decision(_scores(0.5), None, None, 0.02)[:2] == (True, "first model version (validation Dice 0.5000)")
    promote, why, _ = promotion_decision(_scores(0.6), _scores(float("nan")), "v0001", 0.02)
    assert promote and "could not be validated" in why
    promote, why, _ = promotion_decision(_scores(float("nan")), _scores(0.8), "v0001", 0.02)
    assert not promote and "no validation" in why
    promote, why, _ = promotion_decision({}, None, None, 0.02)
    assert not promote and "promote it by hand" in why


def test_promotion_decides_on_paired_cases_not_on_one_mean():
    """A version that gains a little on nine cases and collapses on the tenth has a mean inside the tolerance (the
    former rule promoted it); the paired interval sees the collapse and holds it back, with its numbers."""
    from training.registry import paired_difference

    parent = _scores(*[0.80] * 10)
    new = _scores(*[0.85] * 9, 0.45)
    assert sum(new.values()) / 10 >= sum(parent.values()) / 10 - 0.02
    promote, why, c = promotion_decision(new, parent, "v0001", 0.02)
    assert not promote and "possibly worse" in why
    lo, hi = c["interval"]
    assert lo < -0.02 < c["mean_difference"] < hi
    assert c["cases"] == sorted(new) and c["new"][-1] == 0.45 and c["parent"] == [0.8] * 10
    assert c["tolerance"] == 0.02 and c["confidence"] == 0.95 and c["resamples"] > 1000
    assert paired_difference(new, parent) == paired_difference(new, parent)  # seeded: the same numbers, the same call
    with pytest.raises(ValueError, match="different cases"):
        paired_difference(_scores(0.8, 0.8), _scores(0.8))


def _inference(store, cid, version="v0001", passes=2):
    """A cached inference whose entropy and mutual-information maps differ (as a real one's do)."""
    grid = store.grid(cid)
    rng = np.random.default_rng(0)
    vols = {"label": Volume(np.zeros(grid.shape, np.uint8), grid.geometry)}
    for name in ("probability", "entropy", "mutual_information"):
        vols[name] = Volume(rng.random(grid.shape, dtype=np.float32), grid.geometry)
    return store.add_inference(cid, version, passes, vols, {"score": {"mean": 0.5, "sum": 1.0}})


def test_correction_archives_the_map_of_the_kind_shown(store, tmp_path, tiny_net_config):
    cid = _train_ids(store)[6]
    shape = store.grid(cid).shape
    # The version the annotator's inference came from (a label may only name a version the datastore has).
    ModelRegistry(store).add_version(_checkpoint(tmp_path, tiny_net_config), {"parent": None, "metrics": {},
                                                                              "trained_on": {}})
    entry = _inference(store, cid)
    folder = store.inference_dir(cid, entry["inference_id"])
    assert "uncertainty_kind" not in entry  # the cache entry serves every kind
    lab, mask = _grid_volume(store, cid, np.zeros(shape)), _grid_volume(store, cid, np.ones(shape))

    def archived(rev):
        return store.revision_file(cid, rev["revision"], "uncertainty").read_bytes()

    mi, _ = store.add_label(cid, lab, kind="correction", reviewed_mask=mask, inference_id=entry["inference_id"],
                            uncertainty_kind="mutual_information", threshold=0.25)
    assert archived(mi) == (folder / "mutual_information.nrrd").read_bytes()
    assert (mi["uncertainty_kind"], mi["threshold"]) == ("mutual_information", 0.25)
    meta = json.loads((store.abs(mi["files"]["label"]).parent / "revision.json").read_text())
    assert (meta["uncertainty_kind"], meta["threshold"]) == ("mutual_information", 0.25)
    # Without an inference id: the newest inference of the model version; the default kind is entropy.
    ent, _ = store.add_label(cid, lab, kind="correction", reviewed_mask=mask, model_version="v0001")
    assert archived(ent) == (folder / "entropy.nrrd").read_bytes() and ent["uncertainty_kind"] == "entropy"
    assert [(r["uncertainty_kind"], r["threshold"]) for r in store.revisions(cid)] == [
        ("mutual_information", 0.25), ("entropy", None)]
    for bad in ({"uncertainty_kind": "variance"}, {"threshold": 1.0}, {"threshold": float("nan")}):
        with pytest.raises(InvalidInput):
            store.add_label(cid, lab, kind="correction", reviewed_mask=mask, model_version="v0001", **bad)
    final, _ = store.add_label(cid, lab, kind="final", uncertainty_kind="mutual_information", threshold=0.5)
    assert "uncertainty" not in final["files"] and final["uncertainty_kind"] is None and final["threshold"] is None
    assert len(store.revisions(cid)) == 3


def test_region_views_are_canonical_and_stay_in_their_folder(store):
    cid = _train_ids(store)[7]
    entry = _inference(store, cid)
    iid = entry["inference_id"]
    folder = store.inference_dir(cid, iid)
    assert region_view("entropy", 0.5, 8, 50) == "entropy-t0.5000-m8-r50"
    assert region_view("mutual_information", 0.12345, 1, 3) == "mutual_information-t0.12345-m1-r3"
    assert region_view("entropy", 0.0, 8, 50) == "entropy-t0.0000-m8-r50"
    # Two thresholds never share a view (a cached rank map is only reused for its own parameters).
    assert region_view("entropy", 0.5, 8, 50) != region_view("entropy", 0.50001, 8, 50)
    assert region_view("entropy", 1e-7, 8, 50) == "entropy-t0.0000001-m8-r50"
    for kind, threshold in (("variance", 0.5), ("entropy", 1.0), ("entropy", -0.1)):
        with pytest.raises(InvalidInput):
            region_view(kind, threshold, 8, 50)
    view = region_view("entropy", 0.5, 8, 50)
    grid = store.grid(cid)
    ranks = np.zeros(grid.shape, np.int32)
    ranks[2:4, 2:4, 2:4] = 1
    path = store.put_region_map(cid, iid, view, Volume(ranks, grid.geometry))
    assert path.parent == folder and store.region_map(cid, iid, view) == path
    assert np.array_equal(read_volume(path).array, ranks) and read_volume(path).array.dtype == np.int32
    before = path.stat().st_mtime_ns
    store.put_region_map(cid, iid, view, Volume(ranks, grid.geometry))  # deterministic: the file is reused
    assert path.stat().st_mtime_ns == before
    with pytest.raises(NotFound):
        store.region_map(cid, iid, region_view("entropy", 0.25, 8, 50))  # well formed, never computed
    for forged in ("..", "../../.sslsegment/token", "entropy-t0.5000-m8-r50/../../x", "entropy-t0.5000-m8-r50\n",
                   "variance-t0.5000-m8-r50", "entropy-t0.5-m8-r50", "entropy-t1.0000-m8-r50", "entropy-t0.5000-m08-r50",
                   "", None):
        assert forged is None or not REGION_VIEW_RE.match(forged)
        with pytest.raises(NotFound):
            store.region_map_path(cid, iid, forged)
    with pytest.raises(InvalidInput):
        store.region_map(cid, "../" + iid, view)


def test_an_index_of_schema_1_gains_the_new_revision_columns(tmp_path, tiny_dataset):
    import sqlite3

    root = tmp_path / "old"
    s = Datastore(root, create=True)
    cid = s.register_image(sorted(tiny_dataset.glob("*.nrrd"))[0], case_id="old-case")[0]["case_id"]
    s.close()
    # What a version-1 index looked like: no uncertainty_kind / threshold columns in labels.
    db = sqlite3.connect(root / ".sslsegment" / "index.sqlite")
    db.execute("ALTER TABLE labels DROP COLUMN uncertainty_kind")
    db.execute("ALTER TABLE labels DROP COLUMN threshold")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    s = Datastore(root)
    assert s.get_meta(s.db, "schema_version") == 2
    shape = s.grid(cid).shape
    rev, _ = s.add_label(cid, _grid_volume(s, cid, np.zeros(shape)), kind="correction",
                         reviewed_mask=_grid_volume(s, cid, np.ones(shape)), uncertainty_kind="mutual_information")
    assert rev["uncertainty_kind"] == "mutual_information"


def test_check_reports_leftovers_without_touching_indexed_files(store):
    cid = _train_ids(store)[0]
    (store.root / "labels" / "corrections" / "alice" / cid / ".tmp-crashed").mkdir(parents=True)
    write_volume(read_volume(store.image_path(cid)), store.root / "labels" / "final" / "orphan.nrrd")
    report = store.check()
    assert report["ok"] and report["integrity"] == "ok"
    assert any(".tmp-crashed" in p for p in report["staging"]) and "labels/final/orphan.nrrd" in report["unindexed"]
    store.check(clean=True)
    assert not (store.root / "labels" / "corrections" / "alice" / cid / ".tmp-crashed").exists()
    assert all(os.path.exists(store.abs(r["files"]["label"])) for r in store.revisions(cid))


def test_cli_import_monai_label_folder_token_check_settings(tmp_path, tiny_dataset, capsys):
    import shutil

    from training.cli import main

    # A MONAI Label-style folder: images at the root, some final labels, an original (pre-)label, no dataset.json.
    src = tmp_path / "monai"
    (src / "labels" / "final").mkdir(parents=True)
    (src / "labels" / "original").mkdir(parents=True)
    for cid in ("phantom_000", "phantom_001", "phantom_002"):
        shutil.copy(tiny_dataset / f"{cid}.nrrd", src / f"{cid}.nrrd")
    shutil.copy(tiny_dataset / "labels" / "final" / "phantom_000.nrrd", src / "labels" / "final" / "phantom_000.nrrd")
    shutil.copy(tiny_dataset / "labels" / "final" / "phantom_001.nrrd", src / "labels" / "original" / "phantom_001.nrrd")
    dest = tmp_path / "store"
    assert main(["import-datastore", str(src), "--datastore", str(dest), "--split-seed", "s1"]) == 0
    store = Datastore(dest)
    cases = {c["case_id"]: c for c in store.cases()}
    assert set(cases) == {"phantom_000", "phantom_001", "phantom_002"}
    assert all(c["split"] == hash_split(cid, "s1", (0.8, 0.2, 0.0)) for cid, c in cases.items())
    assert cases["phantom_000"]["labeled"] and not cases["phantom_001"]["labeled"]
    assert [r["kind"] for r in store.revisions("phantom_001")] == ["original"]
    assert (dest / "labels" / "original" / "phantom_001.nrrd").is_file()

    capsys.readouterr()
    assert main(["token", "--datastore", str(dest)]) == 0
    token = capsys.readouterr().out.strip()
    assert token == store.token_path.read_text().strip() and len(token) >= 32
    assert oct(store.token_path.stat().st_mode & 0o777) == "0o600"
    assert main(["datastore-check", "--datastore", str(dest)]) == 0
    assert main(["datastore-settings", "--datastore", str(dest), "retrain_every=3"]) == 0
    assert Datastore(dest).settings["retrain_every"] == 3
    assert main(["datastore-settings", "--datastore", str(dest), "colour=3"]) == 2
    assert main(["import-datastore", str(src), "--datastore", str(dest), "--labels", "some"]) == 2
    assert main(["token", "--datastore", str(tmp_path / "nowhere")]) == 2


def test_an_index_made_before_the_shown_map_was_recorded_is_upgraded_in_place(store):
    """A datastore whose label table predates `uncertainty_kind`/`threshold` opens, gains the columns, keeps its
    revisions and records the shown map of new corrections."""
    import sqlite3

    cid = _train_ids(store)[0]
    grid = store.grid(cid)
    before = store.revisions(cid)
    store.close()
    db = sqlite3.connect(store.index_dir / "index.sqlite")
    db.execute("ALTER TABLE labels DROP COLUMN uncertainty_kind")
    db.execute("ALTER TABLE labels DROP COLUMN threshold")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()

    reopened = Datastore(store.root)
    columns = {r["name"] for r in reopened.db.execute("PRAGMA table_info(labels)")}
    assert {"uncertainty_kind", "threshold"} <= columns
    assert reopened.revisions(cid) == before
    mask = np.zeros(grid.shape, np.uint8)
    mask[0, :4, :4] = 1
    rev, _ = reopened.add_label(cid, _grid_volume(reopened, cid, np.zeros(grid.shape)), kind="correction",
                                author="alice", reviewed_mask=_grid_volume(reopened, cid, mask),
                                uncertainty_kind="mutual_information", threshold=0.4)
    assert rev["uncertainty_kind"] == "mutual_information" and rev["threshold"] == pytest.approx(0.4)


@pytest.mark.parametrize("change, message", [
    ({"max_voxels": "many"}, "must be an integer"), ({"max_voxels": 0}, r"finite number in \[1, inf\]"),
    ({"max_voxels": 1.5}, "must be an integer"), ({"lease_s": float("nan")}, "finite number"),
    ({"tolerance": 2}, r"in \[-1, 1\]"), ({"score_passes": True}, "must be an integer"),
    ({"train": 3}, "group of settings"), ({"max_upload_mb": -1}, "finite number"),
])
def test_settings_keep_their_kind_and_range(tmp_path, change, message):
    store = Datastore(tmp_path / "store", create=True)
    before = store.settings
    with pytest.raises(InvalidInput, match=message):
        store.update_settings(change)
    assert store.settings == before  # nothing of a refused change is kept
    assert store.update_settings({"tolerance": -0.5, "max_voxels": 1000})["max_voxels"] == 1000

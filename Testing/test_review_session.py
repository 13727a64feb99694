"""The review session the Slicer widget drives, against a real backend (`sslsegment serve` + `worker`) on 127.0.0.1.

The backend is started by the module's own launcher (review/local_backend.LocalBackend, what the panel's "Start on this
computer" uses) on a real SQLite datastore of phantoms; the session trains the first model through the REST API,
then reviews cases end to end: fetch, infer, visit regions, correct, submit; the stored revision is read back.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import TINY_NET, TINY_PATCH, bundled_model_backend
from SSLSegmentLib.review.client import AuthError, BackendUnavailable, SSLSegmentClient
from SSLSegmentLib.data.volume import ImageError
from SSLSegmentLib.data.imageio import read_label, read_volume
from SSLSegmentLib.data.regions import ReviewRegion
from SSLSegmentLib.review.requirements import missing_requirements
from SSLSegmentLib.review.session import (
    ReviewSession,
    SessionError,
    SessionState,
    describe_job,
    job_fraction,
    reviewed_mask,
)
from SSLSegmentLib.review.tasks import BackgroundTask

TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 20, "val_interval": 10,
         "batch_labeled": 2, "batch_unlabeled": 2, "device": "cpu"}


# ---- pieces that need no backend ------------------------------------------------------------------------------


def test_reviewed_mask_is_the_union_of_visited_regions_and_edits():
    rank_map = np.zeros((4, 5, 6), np.int32)
    rank_map[0, :2, :2] = 1
    rank_map[3, 3:, 3:] = 2
    predicted = np.zeros((4, 5, 6), np.uint8)
    corrected = predicted.copy()
    corrected[2, 2, 2] = 1
    mask = reviewed_mask(rank_map, {2}, predicted, corrected)
    expected = (rank_map == 2) | (corrected != predicted)
    np.testing.assert_array_equal(mask.astype(bool), expected)
    assert mask[0, 0, 0] == 0  # region 1 was not visited
    with pytest.raises(ValueError, match="shapes differ"):
        reviewed_mask(rank_map, {1}, predicted, corrected[:3])


def test_background_task_returns_raises_and_can_be_abandoned():
    done = BackgroundTask("add", lambda a, b: a + b, 2, b=3)
    assert done.wait(5) == 5 and done.done() and done.outcome() == (5, None)

    failing = BackgroundTask("fail", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.wait(5)
    result, error = failing.outcome()
    assert result is None and isinstance(error, ZeroDivisionError)

    release = threading.Event()
    slow = BackgroundTask("slow", release.wait, 10)
    assert not slow.done()
    slow.cancel()
    assert slow.done() and slow.outcome() == (None, None)  # the GUI moves on at once
    # Abandoned calls hold no pool slot: a new task runs while two abandoned ones still wait; none delays exit.
    other = BackgroundTask("slow too", release.wait, 10)
    other.cancel()
    quick = BackgroundTask("quick", lambda: "done")
    assert quick.wait(5) == "done" and not release.is_set()
    assert slow.daemon and other.daemon and quick.daemon
    release.set()


def test_missing_requirements_checks_versions_without_importing():
    assert missing_requirements(["numpy>=1.0", "pytest"]) == []
    assert missing_requirements(["numpy>=999"]) == ["numpy>=999"]
    assert missing_requirements(["surely-not-installed-sslsegment-pkg>=1"]) == ["surely-not-installed-sslsegment-pkg>=1"]


def test_an_installed_torch_too_old_for_the_backend_is_told_apart_from_a_missing_one():
    from importlib import metadata

    from SSLSegmentLib.review.requirements import TORCH_REQUIREMENT, torch_status

    installed = metadata.version("torch")
    assert torch_status() == ("ok", installed)
    assert torch_status(TORCH_REQUIREMENT) == ("ok", installed)
    assert torch_status("torch>=999") == ("old", installed)  # installed, but not what the backend needs
    assert torch_status("surely-not-installed-sslsegment-torch>=1") == ("missing", None)


def test_job_descriptions_for_the_status_line():
    assert describe_job(None) == "No training job."
    running = {"status": "running", "progress": {"step": 30, "iterations": 120, "val_dice": 0.812, "eta_s": 41.6}}
    text = describe_job(running)
    assert "30/120" in text and "0.812" in text and "41 s" in text
    assert job_fraction(running) == pytest.approx(0.25)
    done = {"status": "succeeded", "progress": {}, "result": {"model_version": "v0003", "promoted": False,
                                                              "reason": "val Dice dropped"}}
    assert "v0003" in describe_job(done) and "not promoted" in describe_job(done) and job_fraction(done) == 1.0


def test_session_refuses_steps_out_of_order(tmp_path):
    session = ReviewSession(SSLSegmentClient("http://127.0.0.1:9"), tmp_path)
    with pytest.raises(SessionError, match="connect"):
        session.fetch_next_case()
    session.state = SessionState.CONNECTED
    with pytest.raises(SessionError, match="load a case"):
        session.infer()
    with pytest.raises(SessionError, match="load a case"):
        session.submit(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="annotator"):
        ReviewSession(SSLSegmentClient("http://127.0.0.1:9"), tmp_path, annotator="../etc")
    with pytest.raises(ValueError, match="max 64"):  # the contract's one author rule
        ReviewSession(SSLSegmentClient("http://127.0.0.1:9"), tmp_path, annotator="a" * 65)
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        ReviewSession(SSLSegmentClient("http://127.0.0.1:9"), tmp_path, uncertainty="variance")
    # Bad options are refused before anything is sent (nothing listens on port 9).
    session.state = SessionState.CASE_LOADED
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        session.infer(uncertainty="variance")
    with pytest.raises(ValueError, match="threshold must be in"):
        session.infer(threshold=1.0)


# ---- against a real backend ---------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_dataset):
    """serve + worker on a datastore set up the way the module's self-test sets one up (the other 6 train cases are
    left to review)."""
    with bundled_model_backend(tmp_path_factory.mktemp("review"), tiny_dataset, TRAIN, poll=0.2,
                               heartbeat=0.5) as local:
        yield local


@pytest.fixture(scope="module")
def trained_session(backend, tmp_path_factory):
    """A connected session that ran one fine-tuning job of the bundled model through the backend's queue."""
    session = ReviewSession(backend.client(), tmp_path_factory.mktemp("work"), annotator="alice")
    info = session.connect()
    assert info["current_model"] == "v0001" and session.model_version == "v0001"
    job = session.start_training()
    with pytest.raises(SessionError, match="still"):
        session.start_training()
    deadline = time.monotonic() + 240
    while session.training_status()["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, describe_job(session.job)
        time.sleep(0.5)
    assert session.job["job_id"] == job["job_id"]
    return session


def test_wrong_token_is_refused_and_the_session_stays_disconnected(backend, tmp_path):
    session = ReviewSession(SSLSegmentClient(backend.base_url, token="not-the-token"), tmp_path)
    with pytest.raises(AuthError):
        session.connect()
    assert session.state == SessionState.DISCONNECTED


def test_training_through_the_session_publishes_a_version(trained_session):
    session = trained_session
    job = session.job
    assert job["status"] == "succeeded", job.get("error")
    assert job_fraction(job) == 1.0
    result = job["result"]
    assert result["model_version"] == "v0002" and "v0002" in describe_job(job)
    models = {m["version"]: m for m in session.models()}
    assert set(models) == {"v0001", "v0002"} and models["v0002"]["parent"] == "v0001"
    # The session follows the backend's decision: v0002 is current only if it did not regress.
    current = "v0002" if result["promoted"] else "v0001"
    assert models[current]["current"] and session.model_version == current


def test_a_whole_case_fetch_infer_visit_correct_submit(trained_session, tiny_dataset):
    session = trained_session
    case = session.fetch_next_case(strategy="uncertainty")
    assert case is not None and case.split == "train" and session.state == SessionState.CASE_LOADED
    image = read_volume(case.image_path)
    source = read_volume(tiny_dataset / f"{case.case_id}.nrrd")
    np.testing.assert_array_equal(image.array, source.array)
    assert image.geometry.matches(source.geometry)

    first = session.infer(passes=2)
    # A small model is unsure along much of the boundary, which can form one connected shell at a low threshold.
    # Raise the threshold to its most uncertain few percent until that shell breaks into separate regions (the
    # server reuses its cached inference and only re-ranks).
    for quantile in (0.95, 0.98, 0.99, 0.995):
        threshold = float(np.quantile(first.uncertainty["entropy"].array, quantile))
        result = session.infer(passes=2, threshold=threshold)
        if len(result.regions) >= 2:
            break
    assert result.inference_id == first.inference_id and result.threshold == pytest.approx(threshold)
    assert session.state == SessionState.INFERRED and result.model_version == session.client.current_model()
    assert result.label.shape == image.shape and set(np.unique(result.label.array)) <= {0, 1}
    assert len(result.regions) >= 2, "the model should be unsure in more than one place"
    # The regions and their map are the backend's, of the map shown.
    assert result.regions == [ReviewRegion.from_dict(r) for r in result.answer["regions"]] and result.kind == "entropy"
    assert [r.rank for r in result.regions] == list(range(1, len(result.regions) + 1))
    _assert_regions_are_of(result.uncertainty["entropy"].array, result)
    assert set(result.paths) == {"label", "entropy", "regions"}  # what the review shows, nothing else

    assert session.next_region().rank == 1
    assert session.next_region().rank == 2
    assert session.previous_region().rank == 1
    assert session.visited == {1, 2} and session.current_region.rank == 1

    # The clinician fixes region 1 with the truth and paints one extra block.
    truth = read_label(tiny_dataset / "labels" / "final" / f"{case.case_id}.nrrd").array
    corrected = result.label.array.copy()
    inside = result.rank_map == 1
    corrected[inside] = truth[inside]
    corrected[1:3, 1:4, 1:4] = 1
    expected = np.isin(result.rank_map, [1, 2]) | (corrected != result.label.array)
    np.testing.assert_array_equal(session.reviewed_mask(corrected).astype(bool), expected)

    revision = session.submit(corrected)
    assert session.state == SessionState.SUBMITTED
    with pytest.raises(SessionError, match="already submitted"):
        session.submit(corrected)

    stored = session.client.label_history(case.case_id)[-1]
    assert stored["revision"] == revision["revision"] and stored["kind"] == "correction"
    assert stored["uncertainty_kind"] == "entropy" and stored["threshold"] == pytest.approx(threshold)
    assert stored["author"] == "alice" and stored["model_version"] == result.model_version
    assert stored["reviewed_voxels"] == int(expected.sum())
    back = tmp = session.work_dir / "readback"
    mask_file = session.client.download_label(case.case_id, revision["revision"], tmp / "mask.nrrd", "reviewed_mask")
    label_file = session.client.download_label(case.case_id, revision["revision"], back / "label.nrrd", "label")
    mask = read_volume(mask_file)
    assert mask.geometry.matches(image.geometry)
    np.testing.assert_array_equal(mask.array.astype(bool), expected)
    np.testing.assert_array_equal(read_label(label_file, image).array, corrected)

    following = session.fetch_next_case()
    assert following is not None and following.case_id != case.case_id  # the reviewed case left the queue


def _assert_regions_are_of(uncertainty: np.ndarray, result) -> None:
    """Every region's voxels in the region map lie above the threshold of `uncertainty`, with the region's mean."""
    for region in result.regions:
        inside = uncertainty[result.rank_map == region.rank]
        assert inside.size == region.voxel_count and inside.min() > result.threshold
        assert inside.mean() == pytest.approx(region.uncertainty_mean, rel=1e-4, abs=1e-6)


def test_changing_the_kind_asks_the_backend_for_its_regions_and_the_submission_archives_that_map(
        trained_session, tmp_path):
    session = trained_session
    if session.state != SessionState.CASE_LOADED:
        assert session.fetch_next_case() is not None
    case_id = session.case.case_id
    first = session.infer(passes=2, uncertainty="entropy")  # creates the backend's cache entry
    entropy = first.uncertainty["entropy"].array
    if first.regions:
        session.next_region()

    # The other map: the same inference on the backend (a cache hit, no forward pass), its own regions.
    regions = session.recompute_regions(kind="mutual_information")
    result = session.result
    assert result is first and result.answer["cached"] and result.inference_id == first.inference_id
    assert result.kind == session.uncertainty_kind == "mutual_information" and session.visited == set()
    mi = result.uncertainty["mutual_information"].array
    assert not np.allclose(mi, entropy)  # two different maps, so archiving the wrong one would show
    # A threshold at which the mutual information has regions to review.
    threshold = float(np.quantile(mi, 0.99))
    regions = session.recompute_regions(threshold=threshold)
    assert result.kind == "mutual_information" and result.threshold == pytest.approx(threshold) and regions
    _assert_regions_are_of(mi, result)

    # They are exactly the backend's answer for that map and threshold.
    answer = session.client.infer(case_id, tmp_path / "mi", passes=2, uncertainty="mutual_information",
                                  threshold=threshold, min_voxels=session.region_min_voxels,
                                  max_regions=session.max_regions)
    assert answer["cached"] and answer["inference_id"] == result.inference_id
    assert regions == [ReviewRegion.from_dict(r) for r in answer["regions"]]
    np.testing.assert_array_equal(result.rank_map, read_volume(answer["paths"]["regions"]).array)
    np.testing.assert_array_equal(mi, np.clip(read_volume(answer["paths"]["mutual_information"]).array, 0, 1))

    session.next_region()
    corrected = result.label.array.copy()
    corrected[0, :2, :2] = 1 - corrected[0, :2, :2]
    revision = session.submit(corrected)
    stored = session.client.label_history(case_id)[-1]
    assert stored["revision"] == revision["revision"] and stored["model_version"] == result.model_version
    assert stored["uncertainty_kind"] == "mutual_information" and stored["threshold"] == pytest.approx(threshold)
    assert session.last_submission["uncertainty_kind"] == "mutual_information"
    # The archived map is the one the clinician saw, though the cache entry was made for entropy.
    archived = session.client.download_label(case_id, revision["revision"], tmp_path / "shown.nrrd", "uncertainty")
    np.testing.assert_array_equal(read_volume(archived).array, read_volume(answer["paths"]["mutual_information"]).array)
    # The session keeps the kind for the next case.
    assert session.uncertainty_kind == "mutual_information"
    session.uncertainty_kind, session.threshold = "entropy", 0.5


def test_regions_of_another_model_version_are_refused(trained_session):
    """A promotion between Run and a change of kind: the backend would rank another prediction's regions, so the
    session refuses them and keeps the review as it was."""
    session = trained_session
    if session.state != SessionState.CASE_LOADED:
        assert session.fetch_next_case() is not None
    result = session.infer(passes=2)
    regions, rank_map = list(result.regions), result.rank_map.copy()
    if regions:
        session.next_region()
    visited = set(session.visited)
    current = session.client.current_model()
    other = next(m["version"] for m in session.client.models() if m["version"] != current)
    session.client.promote(other)
    try:
        with pytest.raises(SessionError, match="run the model again"):
            session.recompute_regions(kind="mutual_information")
    finally:
        session.client.promote(current)
    assert session.result is result and result.kind == "entropy" and result.regions == regions
    np.testing.assert_array_equal(result.rank_map, rank_map)
    assert session.visited == visited and session.state == SessionState.INFERRED
    assert not list(session._inference_dir().glob(".incoming-*"))  # nothing half-downloaded left behind
    session.skip_case()


def test_an_empty_review_is_refused_and_nothing_is_lost(trained_session):
    session = trained_session
    if session.state != SessionState.CASE_LOADED:
        assert session.fetch_next_case() is not None
    result = session.infer(passes=2)
    case_id = session.case.case_id
    before = session.client.label_history(case_id)
    with pytest.raises(SessionError, match="nothing was reviewed"):
        session.submit(result.label.array.copy())  # no region visited, no voxel edited
    with pytest.raises(ImageError, match="not on the image grid"):
        session.submit(np.zeros((2, 2, 2), np.uint8))
    assert session.state == SessionState.INFERRED and session.client.label_history(case_id) == before
    session.skip_case()  # gives the lease back
    assert session.state == SessionState.CONNECTED
    leased = [c for c in session.client.list_cases() if c["case_id"] == case_id][0]
    assert leased["lease"] is None


def test_a_volume_from_slicer_is_registered_then_reviewed(trained_session, tiny_dataset):
    session = trained_session
    test_case = sorted(p for p in tiny_dataset.glob("*.nrrd"))[-1]
    before = {c["case_id"] for c in session.client.list_cases()}
    case = session.open_image(test_case)
    assert session.state == SessionState.CASE_LOADED and case.image_path == test_case
    assert case.case_id in before or case.case_id in {c["case_id"] for c in session.client.list_cases()}
    result = session.infer(passes=2)
    assert result.label.shape == read_volume(test_case).shape
    session.skip_case()


def test_training_can_be_stopped_from_the_session(trained_session):
    session = trained_session
    session.start_training(iterations=100000)
    session.cancel_training()
    deadline = time.monotonic() + 60
    while session.training_status()["status"] not in ("cancelled", "failed", "succeeded"):
        assert time.monotonic() < deadline, describe_job(session.job)
        time.sleep(0.3)
    assert session.job["status"] == "cancelled"
    assert [m["version"] for m in session.models()] == ["v0001", "v0002"]  # a cancelled job publishes nothing


def test_a_cancelled_submit_changes_nothing_and_a_resubmit_stores_one_revision(trained_session):
    """Cancel while the submission is in flight: the GUI drops the call, the session stays in review (the request
    may still reach the backend); Submit again with the same edits: one revision in all, never two."""
    session = trained_session
    case = session.fetch_next_case()
    result = session.infer(passes=2)
    corrected = result.label.array.copy()
    corrected[1:3, 1:4, 1:4] = 1 - corrected[1:3, 1:4, 1:4]
    before = len(session.client.label_history(case.case_id))
    pending = session.prepare_submission(corrected)
    task = BackgroundTask("Submitting", session.send_submission, pending)
    task.cancel()  # the clinician pressed Cancel
    assert task.done() and task.outcome() == (None, None)
    assert session.state == SessionState.INFERRED and session.last_submission is None
    task.wait(60)  # the abandoned request did reach the backend
    revision = session.submit(corrected)  # Submit again, same edits
    history = session.client.label_history(case.case_id)
    assert len(history) == before + 1 and history[-1]["revision"] == revision["revision"]
    assert session.state == SessionState.SUBMITTED
    assert session.last_submission["submission_id"] == pending.submission_id


def test_a_cancelled_run_leaves_the_review_as_it_was(trained_session, tiny_dataset):
    """Run fetched on a worker thread and then abandoned: the segmentation under review, its regions and the
    visited marks are untouched; an inference fetched for a case the clinician has since left is refused."""
    session = trained_session
    case = session.fetch_next_case()
    first = session.infer(passes=2)
    if first.regions:
        session.next_region()
    visited = set(session.visited)
    abandoned = BackgroundTask("Running the model", session.fetch_inference, 2, "mutual_information")
    abandoned.cancel()
    pending = abandoned.wait(60)
    assert session.result is first and session.visited == visited and session.result.kind == "entropy"
    other = next(p for p in sorted(tiny_dataset.glob("phantom_*.nrrd")) if p.stem != case.case_id)
    assert session.open_image(other).case_id != case.case_id  # the clinician moved on to another case
    with pytest.raises(SessionError, match=f"inference is of case {case.case_id}"):
        session.apply_inference(pending)
    assert session.state == SessionState.CASE_LOADED and session.result is None
    assert not pending.staging.exists()  # its downloads are cleaned up either way


def test_the_panel_asks_before_discarding_review_work_and_offers_one_call_at_a_time(trained_session):
    from SSLSegmentLib.review.presenter import PanelInputs, controls, unsaved_work

    session = trained_session
    session.fetch_next_case()
    assert unsaved_work(session, edited_voxels=0) is None  # nothing to lose before Run
    on = controls(session, PanelInputs())
    assert on["run"] and on["skip_case"] and not on["submit"] and not on["next_region"]
    result = session.infer(passes=2)
    assert unsaved_work(session, edited_voxels=0) is None  # a fresh inference: nothing done yet
    question = unsaved_work(session, edited_voxels=12)
    assert question.startswith(f"Case {session.case.case_id} has 12 edited voxels") and "Discard" in question
    if result.regions:
        session.next_region()
        assert "1 visited region" in unsaved_work(session, edited_voxels=0)
    on = controls(session, PanelInputs())
    assert on["run"] and on["submit"] and on["next_region"] == bool(result.regions) and not on["cancel"]
    busy = controls(session, PanelInputs(busy=True))
    assert busy["cancel"] and not any(v for k, v in busy.items() if k not in ("cancel", "stop_training"))
    corrected = result.label.array.copy()
    corrected[0, 0, 0] = 1 - corrected[0, 0, 0]
    session.submit(corrected)
    assert unsaved_work(session, edited_voxels=1) is None  # submitted: nothing left to lose
    assert not controls(session, PanelInputs())["submit"]
    assert controls(None, PanelInputs()) == {**{k: False for k in on}, "connect": True}


def test_the_panel_follows_a_kind_or_threshold_changed_after_run(trained_session):
    """The regions table is the session's, of one map at one threshold: a change in the panel after Run is a fetch of
    that map's regions; once fetched, nothing more is asked for."""
    from SSLSegmentLib.review.presenter import regions_to_fetch

    session = trained_session
    session.fetch_next_case()
    assert regions_to_fetch(session, "entropy", 0.5) is None  # nothing run yet: nothing to follow
    result = session.infer(passes=2, uncertainty="entropy")
    assert regions_to_fetch(session, result.kind, result.threshold) is None
    assert regions_to_fetch(session, "mutual_information", result.threshold) == ("mutual_information",
                                                                                 result.threshold)
    threshold = float(np.quantile(result.uncertainty["entropy"].array, 0.99))
    wanted = regions_to_fetch(session, "entropy", threshold)
    assert wanted == ("entropy", pytest.approx(threshold))
    session.apply_regions(session.fetch_regions(*wanted))
    assert session.result.threshold == pytest.approx(threshold) and regions_to_fetch(session, *wanted) is None
    _assert_regions_are_of(result.uncertainty["entropy"].array, session.result)
    assert regions_to_fetch(None, "entropy", 0.5) is None
    session.uncertainty_kind, session.threshold = "entropy", 0.5


def test_undo_submit_takes_the_revision_out_of_training_and_keeps_the_history(trained_session, backend):
    """The way back from a wrong Submit: an audited exclusion of that revision; the files and the label history stay,
    the snapshot a training job takes leaves it out; pressing Undo again (after a Cancel) makes no second record."""
    from SSLSegmentLib.review.presenter import PanelInputs, controls
    from training.datastore import Datastore
    from training.training_set import training_snapshot

    session = trained_session
    case = session.fetch_next_case()
    result = session.infer(passes=2)
    with pytest.raises(SessionError):
        session.withdraw_submission()  # nothing submitted yet
    corrected = result.label.array.copy()
    corrected[1:3, 1:4, 1:4] = 1 - corrected[1:3, 1:4, 1:4]
    revision = session.submit(corrected)["revision"]
    assert controls(session, PanelInputs())["undo_submit"]
    history = session.client.label_history(case.case_id)

    def trained_on() -> list[int]:
        store = Datastore(backend.datastore)
        try:
            return training_snapshot(store)["train"].get(case.case_id, [])
        finally:
            store.close()

    assert revision in trained_on()
    record = session.withdraw_submission()
    assert record["case_id"] == case.case_id and record["revision"] == revision and record["author"] == "alice"
    assert session.withdraw_submission() == record  # again: the same exclusion, not a second one
    assert [e["id"] for e in session.client.exclusions() if e["revision"] == revision] == [record["id"]]
    assert not controls(session, PanelInputs())["undo_submit"]
    assert session.client.label_history(case.case_id) == history  # immutable: nothing removed or rewritten
    assert revision not in trained_on()


def test_stopping_the_local_backend_ends_its_processes(backend):
    """Last in this file: it stops the module's backend (the fixture's own stop is then a no-op)."""
    assert backend.running() and backend.token
    procs = list(backend.processes.values())
    assert len(procs) == 2  # serve and worker
    backend.stop()
    assert all(p.poll() is not None for p in procs) and not backend.running()
    with pytest.raises(BackendUnavailable):
        SSLSegmentClient(backend.base_url, retries=1, timeout=2).health()
    with pytest.raises(RuntimeError, match="stopped"):
        backend.poll_ready()

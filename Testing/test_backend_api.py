"""Integration: the real server (uvicorn subprocess on 127.0.0.1) and a real worker process on a temp datastore,
driven through the standard-library client: the review loop, auth, upload validation, path traversal, concurrent
submissions, retrain trigger, cancellation and a killed worker."""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import TINY_NET, TINY_PATCH
from SSLSegmentLib.review.client import AuthError, BackendError, NotFoundError, SSLSegmentClient, ValidationError
from SSLSegmentLib.data.volume import Geometry, Volume
from SSLSegmentLib.data.imageio import read_label, read_volume, write_volume
from SSLSegmentLib.data.regions import ReviewRegion, find_review_regions
from SSLSegmentLib.review.local_backend import LocalBackend
from training.datastore import Datastore, import_folder

TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 30, "val_interval": 10, "device": "cpu"}
WORKER_ARGS = ["--threads", "1", "--poll", "0.2", "--heartbeat", "0.5", "--stale-after", "30"]


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("api") / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="train:2")
    store.update_settings({"train": TRAIN, "score_passes": 2, "infer": {"passes": 4}})
    with LocalBackend(root, worker_args=WORKER_ARGS, serve_args=["--max-upload-mb", "1"],
                      env_overrides={"OMP_NUM_THREADS": "1"}).start().wait_until_ready() as handle:
        yield handle


@pytest.fixture(scope="module")
def client(backend):
    return backend.client(timeout=60)


def _wait(predicate, what: str, limit_s: float = 300.0, poll_s: float = 0.2):
    """Poll for a state; the limit only guards against hangs (no assertion on how long it took)."""
    deadline = time.monotonic() + limit_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(poll_s)
    return value


def _raw(backend, path: str, token: str | None = None) -> int:
    req = urllib.request.Request(backend.base_url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_auth_required_except_health(backend, client):
    anon = SSLSegmentClient(backend.base_url)
    assert anon.health()["status"] == "ok"
    for call in (anon.info, anon.list_cases, anon.models, lambda: anon.start_training()):
        with pytest.raises(AuthError) as err:
            call()
        assert err.value.status == 401 and "token" in err.value.message
    with pytest.raises(AuthError):
        SSLSegmentClient(backend.base_url, token="wrong" + backend.token).info()
    assert _raw(backend, "/api/v1/cases", token="x") == 401
    assert client.info()["n_cases"] == 12
    assert _raw(backend, "/openapi.json") == 200


def test_upload_validation(backend, client, tmp_path, tiny_dataset):
    from SSLSegmentLib.data.phantoms import PhantomConfig, make_phantom

    image, _ = make_phantom(99, PhantomConfig(shape=(24, 32, 32)))
    path = write_volume(image, tmp_path / "new.nrrd")
    case = client.upload_case(path, case_id="upload-1")
    assert case["case_id"] == "upload-1" and case["shape"] == [24, 32, 32] and case["split"] in ("train", "val", "test")
    assert client.upload_case(path, case_id="upload-1")["created"] == case["created"]  # same image again: no-op
    auto = client.upload_case(path)
    assert auto["case_id"].startswith("case-") and client.upload_case(path)["case_id"] == auto["case_id"]
    dest = client.download_image("upload-1", tmp_path / "back.nrrd")
    assert dest.read_bytes() == path.read_bytes()

    other = write_volume(make_phantom(98, PhantomConfig(shape=(24, 32, 32)))[0], tmp_path / "other.nrrd")
    with pytest.raises(BackendError) as err:
        client.upload_case(other, case_id="upload-1")
    assert err.value.status == 409
    corrupt = tmp_path / "corrupt.nrrd"
    corrupt.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 9 9\nencoding: raw\n\n" + b"\0" * 40)
    with pytest.raises(ValidationError) as err:
        client.upload_case(corrupt, case_id="corrupt")
    assert err.value.status == 422 and "not a readable image" in err.value.message and "/tmp" not in err.value.message
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValidationError) as err:
        client.upload_case(text, case_id="notes")
    assert err.value.status == 415 and ".nrrd" in err.value.message
    big = tmp_path / "big.nrrd"
    rng = np.random.default_rng(0)
    write_volume(Volume(rng.random((40, 64, 128), dtype=np.float32)), big, compress=False)
    with pytest.raises(ValidationError) as err:
        client.upload_case(big, case_id="big")
    assert err.value.status == 413 and "limit" in err.value.message
    flat = tmp_path / "flat.nrrd"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(flat))
    with pytest.raises(ValidationError, match="3D"):
        client.upload_case(flat, case_id="flat")
    ids = {c["case_id"] for c in client.list_cases()}
    assert not ids & {"corrupt", "notes", "big", "flat"}
    assert not list((backend.datastore / ".sslsegment" / "uploads").iterdir())  # temp uploads cleaned up


def test_path_traversal_ids_refused(backend, client, tmp_path, tiny_dataset):
    img = sorted(tiny_dataset.glob("*.nrrd"))[0]
    for bad in ("../evil", "..", "a/../../b", "x\\..\\y"):
        with pytest.raises(ValidationError) as err:
            client.upload_case(img, case_id=bad)
        assert err.value.status in (400, 422) and "invalid case id" in err.value.message
    for path in ("/api/v1/cases/..%2F..%2Fetc%2Fpasswd", "/api/v1/cases/%2e%2e/image",
                 "/api/v1/cases/phantom_000/labels/1/..%2F..%2F.sslsegment%2Ftoken",
                 "/api/v1/models/..%2F.sslsegment/weights", "/api/v1/train/..%2F..%2Fx"):
        assert 400 <= _raw(backend, path, backend.token) < 500, path
    with pytest.raises((ValidationError, NotFoundError)):
        client.get_case("../.sslsegment")
    assert not (backend.datastore.parent / "evil.nrrd").exists()


ALL_VOLUMES = ("label", "probability", "entropy", "mutual_information", "regions")


def _correction(client, case_id, result, tiny_dataset, tmp_path):
    """A simulated clinician: fixes the visited regions and every wrong voxel, marks them reviewed."""
    truth = read_label(tiny_dataset / "labels" / "final" / f"{case_id}.nrrd").array
    pred = read_label(result["paths"]["label"])
    rank_map = read_volume(result["paths"]["regions"]).array
    reviewed = ((rank_map > 0) | (pred.array != truth)).astype(np.uint8)
    label = np.where(reviewed > 0, truth, pred.array).astype(np.uint8)
    lp = write_volume(pred.like(label), tmp_path / f"{case_id}-label.nrrd")
    mp = write_volume(pred.like(reviewed), tmp_path / f"{case_id}-mask.nrrd")
    return lp, mp, reviewed


def test_review_loop_train_correct_retrain(backend, client, tmp_path, tiny_dataset):
    job = client.start_training(init="scratch")
    assert job["status"] == "queued" and job["trigger"] == "manual"
    job = client.wait_for_job(job["job_id"], timeout=600)
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["model_version"] == "v0001" and job["result"]["promoted"]
    assert job["history"][-1]["val_dice"] > job["history"][0]["val_dice"]  # it learned
    assert client.models()[0]["current"]

    case = client.next_case(annotator="alice")
    cid = case["case_id"]
    assert case["split"] == "train" and not case["labeled"] and case["score_model_version"] == "v0001"
    assert case["lease"]["annotator"] == "alice"
    result = client.infer(cid, tmp_path / "infer1", download=ALL_VOLUMES)
    assert result["model_version"] == "v0001" and not result["cached"]
    assert result["uncertainty_kind"] == "entropy" and (result["min_voxels"], result["max_regions"]) == (8, 50)
    assert all(path.startswith("/api/v1/") for path in result["volumes"].values())
    image = read_volume(client.download_image(cid, tmp_path / "img.nrrd"))
    for name, path in result["paths"].items():
        vol = read_volume(path)
        assert vol.shape == image.shape and vol.geometry.matches(image.geometry), name
    prob = read_volume(result["paths"]["probability"]).array
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    ranks = [r["rank"] for r in result["regions"]]
    assert ranks == list(range(1, len(ranks) + 1)) and ranks
    sums = [r["uncertainty_sum"] for r in result["regions"]]
    assert sums == sorted(sums, reverse=True)
    # The regions are the ones of the stored map, and the region map is exactly their rank map.
    entropy = read_volume(result["paths"]["entropy"])
    regions, rank_map = find_review_regions(entropy.array, threshold=result["threshold"], geometry=entropy.geometry)
    assert [ReviewRegion.from_dict(r) for r in result["regions"]] == regions
    served = read_volume(result["paths"]["regions"])
    assert served.array.dtype == np.int32 and np.array_equal(served.array, rank_map)
    assert result["uncertainty_mean"] == pytest.approx(float(entropy.array.mean()), rel=1e-6)

    # Wrong grid → 422 with a message that says what is wrong; nothing stored.
    truth = read_label(tiny_dataset / "labels" / "final" / f"{cid}.nrrd")
    shifted = write_volume(Volume(truth.array, Geometry(truth.geometry.spacing, (9.0, 9.0, 9.0), truth.geometry.direction)),
                           tmp_path / "shifted.nrrd")
    with pytest.raises(ValidationError, match="geometry does not match") as err:
        client.submit_label(cid, shifted, kind="final")
    assert err.value.status == 422
    small = write_volume(Volume(truth.array[:20], truth.geometry), tmp_path / "small.nrrd")
    with pytest.raises(ValidationError, match="size"):
        client.submit_label(cid, small, kind="final")
    assert client.label_history(cid) == []

    label_path, mask_path, reviewed = _correction(client, cid, result, tiny_dataset, tmp_path)
    rev = client.submit_label(cid, label_path, kind="correction", reviewed_mask_path=mask_path,
                              model_version=result["model_version"], author="alice",
                              inference_id=result["inference_id"])
    assert rev["kind"] == "correction" and rev["reviewed_voxels"] == int(reviewed.sum())
    assert set(rev["files"]) == {"label", "reviewed_mask", "uncertainty"}
    assert rev["uncertainty_kind"] == "entropy" and rev["threshold"] is None  # the defaults: nothing else was sent
    assert rev["files"]["label"].startswith(f"labels/corrections/alice/{cid}/r0001/")
    shown = client.download_label(cid, rev["revision"], tmp_path / "shown.nrrd", name="uncertainty")
    assert shown.read_bytes() == result["paths"]["entropy"].read_bytes()
    assert client.label_history(cid)[-1]["revision"] == rev["revision"]
    assert client.get_case(cid)["lease"] is None  # submitting released alice's lease

    job = client.wait_for_job(client.start_training(iterations=20, tolerance=1.0)["job_id"], timeout=600)
    assert job["status"] == "succeeded", job["error"]
    r = job["result"]
    assert r["model_version"] == "v0002" and r["promoted"] and r["parent"] == "v0001"
    v2 = [m for m in client.models() if m["version"] == "v0002"][0]
    assert v2["current"] and rev["revision"] in v2["trained_on"]["revisions"]
    again = client.infer(cid, tmp_path / "infer2")
    assert again["model_version"] == "v0002" and not again["cached"]  # the server reloaded the new current model

    assert client.promote("v0001") == {"current": "v0001", "previous": "v0002"}  # rollback
    back = client.infer(cid, tmp_path / "infer3")
    assert back["model_version"] == "v0001" and back["inference_id"] == result["inference_id"] and back["cached"]
    weights = client.download_weights("v0002", tmp_path / "v2.pt")
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == v2["sha256"]
    client.promote("v0002")


def test_cache_hit_mutual_information_is_what_gets_archived(backend, client, tmp_path, tiny_dataset):
    """The map archived with a correction is the one of the kind the annotator was shown, also when the inference
    came from the cache (it was made for an entropy request)."""
    cid = [c["case_id"] for c in client.list_cases("train")
           if c["case_id"].startswith("phantom_") and not c["labeled"] and c["n_corrections"] == 0][0]
    first = client.infer(cid, tmp_path / "e")
    mi = client.infer(cid, tmp_path / "mi", uncertainty="mutual_information", threshold=0.05, min_voxels=2,
                      max_regions=5, download=("label", "mutual_information", "regions", "entropy"))
    assert mi["cached"] and mi["inference_id"] == first["inference_id"]
    assert mi["uncertainty_kind"] == "mutual_information" and mi["volumes"]["regions"] != first["volumes"]["regions"]
    stored = read_volume(mi["paths"]["mutual_information"])
    regions, rank_map = find_review_regions(stored.array, threshold=0.05, min_voxels=2, max_regions=5,
                                            geometry=stored.geometry)
    assert [ReviewRegion.from_dict(r) for r in mi["regions"]] == regions and len(regions) <= 5
    assert np.array_equal(read_volume(mi["paths"]["regions"]).array, rank_map)
    assert mi["uncertainty_sum"] == pytest.approx(float(stored.array.sum()), rel=1e-5)

    lp, mp, _ = _correction(client, cid, mi, tiny_dataset, tmp_path)
    rev = client.submit_label(cid, lp, kind="correction", reviewed_mask_path=mp, model_version=mi["model_version"],
                              author="carol", inference_id=mi["inference_id"], uncertainty_kind="mutual_information",
                              threshold=0.05)
    assert rev["uncertainty_kind"] == "mutual_information" and rev["threshold"] == 0.05
    shown = client.download_label(cid, rev["revision"], tmp_path / "shown.nrrd", name="uncertainty")
    assert shown.read_bytes() == mi["paths"]["mutual_information"].read_bytes()
    assert shown.read_bytes() != mi["paths"]["entropy"].read_bytes()
    history = client.label_history(cid)[-1]
    assert (history["uncertainty_kind"], history["threshold"]) == ("mutual_information", 0.05)
    with pytest.raises(ValidationError) as err:
        client.submit_label(cid, lp, kind="correction", reviewed_mask_path=mp, uncertainty_kind="variance")
    assert err.value.status == 422
    with pytest.raises(ValidationError):
        client.submit_label(cid, lp, kind="correction", reviewed_mask_path=mp, threshold=1.0)
    assert len(client.label_history(cid)) == 1


def test_region_map_refuses_forged_views(backend, client, tmp_path):
    cid = client.list_cases("train")[0]["case_id"]
    result = client.infer(cid, tmp_path / "r")
    base = f"/api/v1/cases/{cid}/inference/{result['inference_id']}/regions/"
    assert _raw(backend, result["volumes"]["regions"], backend.token) == 200
    folder = backend.datastore / "inference" / cid / result["inference_id"]
    # A file next to the inference folder that a view escaping it would reach.
    (folder.parent / "regions-x.nrrd").write_bytes((folder / "label.nrrd").read_bytes())
    view = result["volumes"]["regions"].rsplit("/", 1)[1]
    for forged in ("..", "%2e%2e", "..%2Fregions-x", "..%2F..%2F..%2F.sslsegment%2Ftoken", "variance" + view[7:],
                   view.replace("entropy", "Entropy"), view + "%0A", view + ".nrrd", view.replace("-r50", "-r51"),
                   view.replace("t0.5000", "t0.5"), "entropy-t1.0000-m8-r50", "entropy-t0.5000-m0-r50"):
        status = _raw(backend, base + forged, backend.token)
        assert status in (404, 422), (forged, status)
    assert _raw(backend, base + view, None) == 401
    assert _raw(backend, f"/api/v1/cases/{cid}/inference/0123456789abcdef/regions/{view}", backend.token) == 404


def test_train_request_follows_the_schema(backend, client):
    with pytest.raises(ValidationError) as err:
        client.start_training(colour="blue")
    assert err.value.status == 422 and "colour" in err.value.message
    with pytest.raises(ValidationError) as err:
        client.start_training(iterations=0)
    assert err.value.status == 422 and "iterations must be between" in err.value.message
    assert client.list_jobs("queued") == []


def test_concurrent_submissions_all_stored(backend, client, tmp_path):
    cases = [c["case_id"] for c in client.list_cases("test")]
    grid = read_volume(client.download_image(cases[0], tmp_path / "g.nrrd"))
    sent = {}

    def submit(i):
        cid = cases[i % len(cases)]
        rng = np.random.default_rng(i)
        label = (rng.random(grid.shape) > 0.5).astype(np.uint8)
        mask = np.zeros(grid.shape, np.uint8)
        mask[i % 20: i % 20 + 4] = 1
        lp = write_volume(grid.like(label), tmp_path / f"c{i}-l.nrrd")
        mp = write_volume(grid.like(mask), tmp_path / f"c{i}-m.nrrd")
        c = SSLSegmentClient(backend.base_url, token=backend.token, timeout=60)
        rev = c.submit_label(cid, lp, kind="correction", reviewed_mask_path=mp, author=f"user{i % 4}")
        sent[rev["revision"]] = (cid, label)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(sent) == 12
    history = [r for cid in cases for r in client.label_history(cid)]
    assert sorted(r["revision"] for r in history) == sorted(sent)
    assert len({r["files"]["label"] for r in history}) == 12  # every revision its own folder
    for rev, (cid, label) in list(sent.items())[:4]:
        back = read_label(client.download_label(cid, rev, tmp_path / f"back{rev}.nrrd"))
        np.testing.assert_array_equal(back.array, label)


def test_next_case_leases_and_exhaustion(backend, client, tmp_path, tiny_dataset):
    a = client.next_case(annotator="ann")
    b = client.next_case(annotator="bob")
    assert a["case_id"] != b["case_id"]
    assert client.release_case(a["case_id"], annotator="ann")["released"]
    with pytest.raises(ValidationError):
        client.next_case(strategy="alphabetical")
    for c in client.list_cases("val"):
        if not c["labeled"]:  # an uploaded case may have been assigned to val
            img = read_volume(client.download_image(c["case_id"], tmp_path / "v.nrrd"))
            client.submit_label(c["case_id"], write_volume(img.like(np.zeros(img.shape, np.uint8)), tmp_path / "z.nrrd"))
    assert client.next_case(split="val") is None  # nothing left to review there: 204


def test_retrain_trigger_and_cancel(backend, client, tmp_path, tiny_dataset):
    store = Datastore(backend.datastore)
    store.update_settings({"retrain_every": 2})
    try:
        todo = [c["case_id"] for c in client.list_cases("train")
                if c["case_id"].startswith("phantom_") and not c["labeled"] and c["n_corrections"] == 0][:3]

        def correct(cid):
            result = client.infer(cid, tmp_path / cid)
            lp, mp, _ = _correction(client, cid, result, tiny_dataset, tmp_path)
            return client.submit_label(cid, lp, kind="correction", reviewed_mask_path=mp,
                                       model_version=result["model_version"], author="bob")

        def cancel(job_id):
            assert client.job_status(job_id)["trigger"] == "corrections"
            client.cancel_job(job_id)
            assert client.wait_for_job(job_id, timeout=300)["status"] == "cancelled"

        # The corrections submitted earlier in this module are already more than 2: the first new one triggers.
        first = correct(todo[0])
        cancel(first["queued_job"])
        # Then one new correction is not enough, the second is.
        assert "queued_job" not in correct(todo[1])
        third = correct(todo[2])
        cancel(third["queued_job"])
        assert client.current_model() == "v0002"
    finally:
        store.update_settings({"retrain_every": 0})


def test_killed_worker_recovered_nothing_lost(backend, client):
    store = Datastore(backend.datastore)

    def files_digest():
        out = {}
        for r in store.db.execute("SELECT path, reviewed_mask FROM labels"):
            for rel in r:
                if rel:
                    out[rel] = hashlib.sha256((backend.datastore / rel).read_bytes()).hexdigest()
        return out

    before_models = [m["version"] for m in client.models()]
    before_files = files_digest()
    job = client.start_training(iterations=5000, val_interval=5000)
    _wait(lambda: (client.job_status(job["job_id"]).get("progress") or {}).get("step", 0) >= 2, "training to start")
    backend.kill_worker()
    assert client.job_status(job["job_id"])["status"] == "running"  # nobody has noticed yet
    backend.start_worker()
    # The new worker sees that the job's process is gone, re-queues it and runs it again (second attempt).
    _wait(lambda: (s := client.job_status(job["job_id"]))["attempts"] == 2 and s["status"] == "running", "re-run")
    client.cancel_job(job["job_id"])
    j = client.wait_for_job(job["job_id"], timeout=300)
    assert j["status"] == "cancelled"
    assert [m["version"] for m in client.models()] == before_models and client.current_model() == "v0002"
    assert files_digest() == before_files  # every revision intact
    report = store.check()
    assert report["ok"] and not [p for p in report["staging"] if p.startswith("models")]
    assert not list((backend.datastore / "models").glob(".tmp-*"))
    assert "recovered job" in (backend.log_dir / "worker1.log").read_text()

"""The standard-library client against a real uvicorn server in a thread (no worker): error mapping, retries,
downloads, jobs and models without training."""

from __future__ import annotations

import ast
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from SSLSegmentLib.review.client import (
    AuthError,
    BackendUnavailable,
    ConflictError,
    NotFoundError,
    SSLSegmentClient,
    ValidationError,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dataset):
    import uvicorn

    from SSLSegmentLib.review.local_backend import free_port
    from training.datastore import Datastore, import_folder
    from training.server import create_app

    root = tmp_path_factory.mktemp("client") / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="val")
    app = create_app(root, token="test-token")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield store, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def client(served):
    return SSLSegmentClient(served[1], token="test-token")


def test_client_uses_only_the_standard_library():
    tree = ast.parse(Path(__import__("SSLSegmentLib.review.client", fromlist=["x"]).__file__).read_text())
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    import sys

    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported


def test_constructor_validates_and_normalises():
    assert SSLSegmentClient("http://h:1/api/v1/").base_url == "http://h:1"
    with pytest.raises(ValueError):
        SSLSegmentClient("ftp://h")
    with pytest.raises(ValueError):
        SSLSegmentClient("http://h", retries=0)


def test_unreachable_server_raises_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    c = SSLSegmentClient(f"http://127.0.0.1:{port}", token="t", timeout=2, retries=2)
    c.backoff_s = 0.01
    with pytest.raises(BackendUnavailable) as err:
        c.list_cases()
    assert err.value.status is None and "after 2 attempts" in err.value.message


def test_timeouts_retry_reads_but_never_repeat_a_job_start():
    """A server that accepts connections and never answers: reads are retried, starting a job is not."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    c = SSLSegmentClient(f"http://127.0.0.1:{listener.getsockname()[1]}", token="t", timeout=0.5, retries=3)
    c.backoff_s = 0.01
    try:
        with pytest.raises(BackendUnavailable, match="after 3 attempts"):
            c.list_cases()
        n_reads = len(accepted)
        with pytest.raises(BackendUnavailable, match="after 1 attempts"):
            c.start_training(iterations=5)
        time.sleep(0.2)
        assert n_reads == 3 and len(accepted) == 4
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_typed_errors_carry_the_server_message(served, client):
    with pytest.raises(AuthError):
        SSLSegmentClient(served[1], token="nope").info()
    with pytest.raises(NotFoundError, match="unknown case 'missing'"):
        client.get_case("missing")
    with pytest.raises(ConflictError, match="no model version"):
        client.infer("phantom_000", "/tmp/unused")
    with pytest.raises(ValidationError, match="unknown method 'magic'") as err:
        client.start_training(method="magic")
    assert err.value.status == 422
    with pytest.raises(ValidationError, match="colour"):  # pydantic's field errors, joined into one message
        client.start_training(colour="blue")
    with pytest.raises(NotFoundError):
        client.job_status("0123456789ab")
    with pytest.raises(NotFoundError):
        client.download_weights("v0042", "/tmp/unused.pt")
    with pytest.raises(ValueError, match="reviewed_mask_path"):
        client.submit_label("phantom_000", "/tmp/x.nrrd", kind="correction")


def test_download_is_atomic_and_exact(served, client, tmp_path):
    store, _ = served
    dest = client.download_image("phantom_001", tmp_path / "sub" / "img.nrrd")
    assert dest.read_bytes() == store.image_path("phantom_001").read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["img.nrrd"]  # no temp leftovers
    with pytest.raises(NotFoundError):
        client.download_image("phantom_999", tmp_path / "sub" / "none.nrrd")
    assert not (tmp_path / "sub" / "none.nrrd").exists()


def test_jobs_queue_and_cancel_without_a_worker(client):
    job = client.start_training(iterations=5)
    assert job["status"] == "queued" and job["params"] == {"iterations": 5}
    assert job["job_id"] in [j["job_id"] for j in client.list_jobs(status="queued")]
    cancelled = client.cancel_job(job["job_id"])
    assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"]
    assert client.wait_for_job(job["job_id"], timeout=5)["status"] == "cancelled"


def test_models_weights_and_promotion(served, client, tmp_path, tiny_net_config):
    from SSLSegmentLib.ml.networks import build_network
    from SSLSegmentLib.ml.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
    from training.registry import ModelRegistry

    store, _ = served
    net = build_network(tiny_net_config)
    path = save_checkpoint({"format": CHECKPOINT_FORMAT, "model": net.state_dict(), "network": tiny_net_config.to_dict(),
                            "train_config": {"patch_size": [16, 32, 32]}}, tmp_path / "m.pt")
    ModelRegistry(store).add_version(path, {"parent": None, "metrics": {}, "trained_on": {}})
    assert client.current_model() is None and client.models()[0]["version"] == "v0001"
    assert client.promote("v0001") == {"current": "v0001", "previous": None}
    got = client.download_weights("v0001", tmp_path / "w.pt")
    assert set(load_checkpoint(got)["model"]) == set(net.state_dict())
    result = client.infer("phantom_000", tmp_path / "out", passes=2)
    assert result["model_version"] == "v0001" and result["passes"] == 2
    # What the review shows: the label, the map of the answer's kind and the region map; nothing else.
    kind = result["uncertainty_kind"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["label.nrrd", f"{kind}.nrrd", "regions.nrrd"])
    with pytest.raises(ValidationError):
        client.infer("phantom_000", tmp_path / "out", passes=0)


def _regions_match_the_map(answer: dict, kind: str) -> None:
    """The answer's region map holds exactly its regions, and they are regions of the `kind` map."""
    from SSLSegmentLib.data.imageio import read_volume
    from SSLSegmentLib.data.regions import ReviewRegion, check_rank_map

    regions = [ReviewRegion.from_dict(r) for r in answer["regions"]]
    region_map = read_volume(answer["paths"]["regions"]).array
    assert region_map.dtype == np.int32
    check_rank_map(region_map, regions)
    uncertainty = read_volume(answer["paths"][kind]).array
    for region in regions:
        inside = uncertainty[region_map == region.rank]
        assert inside.min() > answer["threshold"]
        assert inside.mean() == pytest.approx(region.uncertainty_mean, rel=1e-4, abs=1e-6)


def test_infer_downloads_only_the_volumes_asked_for(served, client, tmp_path):
    from SSLSegmentLib.data.imageio import read_volume

    if client.current_model() is None:
        pytest.skip("needs the model version test_models_weights_and_promotion publishes")
    case = "phantom_002"
    first = client.infer(case, tmp_path / "first", passes=2, uncertainty="entropy")
    assert all(v.startswith("/api/v1/") for v in first["volumes"].values())
    assert first["volumes"]["regions"].startswith(f"/api/v1/cases/{case}/inference/{first['inference_id']}/regions/")
    only = client.infer(case, tmp_path / "only", passes=2, download=["probability"])
    assert only["cached"] and only["inference_id"] == first["inference_id"]
    assert set(only["paths"]) == {"probability"} and [p.name for p in (tmp_path / "only").iterdir()] == [
        "probability.nrrd"]
    assert read_volume(only["paths"]["probability"]).shape == read_volume(first["paths"]["label"]).shape
    assert client.infer(case, tmp_path / "none", passes=2, download=[])["paths"] == {}
    with pytest.raises(ValueError, match="serves no volume"):
        client.infer(case, tmp_path / "bad", passes=2, download=["weights"])
    with pytest.raises(TypeError, match="sequence of volume names"):
        client.infer(case, tmp_path / "bad", passes=2, download="label")


def test_a_cache_hit_of_the_other_kind_is_ranked_on_its_map_and_archived_with_the_revision(served, client, tmp_path):
    """The cache entry is made by an entropy request; a later mutual-information request reuses it and gets the
    regions of the mutual-information map; a correction made on it archives that map, not the entropy map."""
    from SSLSegmentLib.data.imageio import read_volume, write_volume

    if client.current_model() is None:
        pytest.skip("needs the model version test_models_weights_and_promotion publishes")
    case = "phantom_004"
    entropy = client.infer(case, tmp_path / "entropy", passes=2, uncertainty="entropy", threshold=0.0)
    mi_map = read_volume(client.infer(case, tmp_path / "probe", passes=2, uncertainty="mutual_information",
                                      download=["mutual_information"])["paths"]["mutual_information"]).array
    # A briefly trained model's two-pass map can be zero almost everywhere, its top 2% scattered single voxels:
    # keep the threshold under the map's maximum and count single voxels, so the answer always has a region.
    assert mi_map.max() > 0
    threshold = min(float(np.quantile(mi_map, 0.98)), 0.5 * float(mi_map.max()))
    mi = client.infer(case, tmp_path / "mi", passes=2, uncertainty="mutual_information", threshold=threshold,
                      min_voxels=1)
    assert mi["cached"] and mi["inference_id"] == entropy["inference_id"]
    assert mi["uncertainty_kind"] == "mutual_information" and mi["threshold"] == pytest.approx(threshold)
    assert set(mi["paths"]) == {"label", "mutual_information", "regions"} and mi["regions"]
    assert mi["volumes"]["regions"] != entropy["volumes"]["regions"]
    _regions_match_the_map(entropy, "entropy")
    _regions_match_the_map(mi, "mutual_information")
    assert mi["uncertainty_sum"] == pytest.approx(float(mi_map.sum()), rel=1e-4)

    label = read_volume(mi["paths"]["label"])
    corrected = write_volume(label, tmp_path / "corrected.nrrd")
    reviewed = read_volume(mi["paths"]["regions"]).array > 0
    mask = write_volume(label.like(reviewed.astype(np.uint8)), tmp_path / "reviewed.nrrd")
    revision = client.submit_label(case, corrected, kind="correction", reviewed_mask_path=mask,
                                   model_version=mi["model_version"], author="alice", inference_id=mi["inference_id"],
                                   uncertainty_kind="mutual_information", threshold=threshold)
    assert revision["uncertainty_kind"] == "mutual_information" and revision["threshold"] == pytest.approx(threshold)
    stored = client.label_history(case)[-1]
    assert stored["uncertainty_kind"] == "mutual_information" and stored["threshold"] == pytest.approx(threshold)
    archived = read_volume(client.download_label(case, revision["revision"], tmp_path / "shown.nrrd", "uncertainty"))
    np.testing.assert_array_equal(archived.array, mi_map)
    assert not np.array_equal(archived.array, read_volume(entropy["paths"]["entropy"]).array)


def test_disk_full_on_write_is_a_5xx_and_indexes_nothing(served, client, tmp_path, monkeypatch):
    import errno
    import os

    from SSLSegmentLib.data.imageio import read_volume, write_volume

    store, _ = served
    image = read_volume(store.image_path("phantom_003"))
    label = write_volume(image.like((image.array > image.array.mean()).astype("uint8")), tmp_path / "l.nrrd")
    before = client.label_history("phantom_003")
    files_before = sorted(p.relative_to(store.root) for p in (store.root / "labels").rglob("*"))

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the storage fails, not the product
    from SSLSegmentLib.review.client import BackendError

    with pytest.raises(BackendError) as err:
        client.submit_label("phantom_003", label, kind="final")
    monkeypatch.undo()
    assert err.value.status == 507 and "No space left" in err.value.message
    assert client.label_history("phantom_003") == before
    assert sorted(p.relative_to(store.root) for p in (store.root / "labels").rglob("*")) == files_before
    assert client.submit_label("phantom_003", label, kind="final")["kind"] == "final"  # works again once there is room

"""Bad input is refused at the door: the real server on 127.0.0.1 answers a 4xx naming the problem, the answer is
valid JSON, and nothing reaches storage (no job queued, no case or label revision stored)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import TINY_NET, TINY_PATCH
from SSLSegmentLib.data.imageio import read_volume, write_volume
from SSLSegmentLib.data.volume import Volume
from SSLSegmentLib.review.client import ValidationError
from SSLSegmentLib.review.local_backend import LocalBackend
from SSLSegmentLib.data.imageio import DEFAULT_MAX_VOXELS
from training.datastore import Datastore, import_folder

TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 30, "val_interval": 10, "device": "cpu"}


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("refusals") / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="train:2")
    store.update_settings({"train": TRAIN})
    # No worker: a job that got queued would stay visible in the queue.
    with LocalBackend(root, with_worker=False, serve_args=["--max-upload-mb", "1"]).start().wait_until_ready() as handle:
        yield handle


@pytest.fixture(scope="module")
def client(backend):
    return backend.client(timeout=60)


def _post_json(backend, path: str, body: bytes) -> tuple[int, dict]:
    """POST a raw JSON body (json.dumps would refuse NaN literals; a client in another language may send them)."""
    req = urllib.request.Request(backend.base_url + path, data=body, method="POST",
                                 headers={"Authorization": f"Bearer {backend.token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, text = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    return status, json.loads(text)  # always JSON, NaN never in it (json.loads would accept it: checked below)


def _no_nan(text: str) -> bool:
    return not any(tok in text for tok in ("NaN", "Infinity"))


@pytest.mark.parametrize("field", ["momentum", "weight_decay", "ema_decay", "lr", "tolerance"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_training_numbers_are_refused_and_queue_nothing(backend, client, field, literal):
    status, body = _post_json(backend, "/api/v1/train", f'{{"{field}": {literal}}}'.encode())
    assert status == 422 and field in json.dumps(body) and _no_nan(json.dumps(body))
    assert client.list_jobs("queued") == []  # nothing queued, and the job list still answers


def test_non_finite_inference_threshold_is_a_422_with_a_json_body(backend, client):
    case = client.list_cases("train")[0]["case_id"]
    status, body = _post_json(backend, f"/api/v1/cases/{case}/infer", b'{"threshold": NaN}')
    assert status == 422 and "threshold" in json.dumps(body) and _no_nan(json.dumps(body))


# Each: a parameter the worker would have failed on (or silently coerced) after a 202.
BAD_TRAIN_PARAMS = [
    ({"batch_labeled": 0}, "batch_labeled"),
    ({"batch_labeled": -1}, "batch_labeled"),
    ({"batch_labeled": 1_000_000}, "batch_labeled"),
    ({"batch_unlabeled": -1}, "batch_unlabeled"),
    ({"val_interval": 0}, "val_interval"),
    ({"device": "tpu:99"}, "device"),
    ({"device": "cuda:7"}, "device"),
    ({"lr_schedule": "bogus"}, "lr_schedule"),
    ({"eval_model": "both"}, "eval_model"),
    ({"seed": 2**70}, "seed"),
    ({"seed": -1}, "seed"),
    ({"patch_size": [4096, 4096, 4096]}, "patch_size"),
    ({"network": {"channels": [100000, 200000, 400000], "strides": [2, 2]}}, "network"),
    ({"nproc": 64}, "nproc"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"ema_decay": 5.0}, "ema_decay"),
    ({"momentum": 2.0}, "momentum"),
    ({"rampup_steps": -10}, "rampup_steps"),
    ({"pretrain_iterations": -1}, "pretrain_iterations"),
    ({"pretrain_iterations": 5, "iterations": 5}, "pretrain_iterations"),
    ({"method_options": {"nonsense": 1}}, "nonsense"),
    ({"method": "mean-teacher", "method_options": {"ema_decay": "high"}}, "method_options"),
    ({"iterations": "10"}, "iterations"),
    ({"iterations": True}, "iterations"),
    ({"lr": "0.1"}, "lr"),
    ({"augment": 1}, "augment"),
]


@pytest.mark.parametrize("params,field", BAD_TRAIN_PARAMS, ids=[json.dumps(p)[:40] for p, _ in BAD_TRAIN_PARAMS])
def test_training_parameters_are_checked_before_the_job_is_queued(backend, client, params, field):
    status, body = _post_json(backend, "/api/v1/train", json.dumps(params).encode())
    assert status == 422, body
    assert field in body["detail"] if isinstance(body["detail"], str) else field in json.dumps(body["detail"])
    assert client.list_jobs("queued") == []


def test_a_good_training_request_is_still_queued(backend, client):
    job = client.start_training(iterations=20, seed=3, device="cpu", method_options={})
    try:
        assert job["status"] == "queued" and job["params"]["seed"] == 3
    finally:
        client.cancel_job(job["job_id"])


def _grid_of(client, case_id, tmp_path) -> Volume:
    return read_volume(client.download_image(case_id, tmp_path / f"{case_id}.nrrd"))


@pytest.mark.parametrize("dtype,value", [(np.uint16, 256), (np.uint16, 257), (np.int16, -1), (np.float64, 1e10),
                                         (np.int32, 2**16 + 1), (np.float32, 256.0)])
def test_label_values_are_checked_before_they_are_narrowed(backend, client, tmp_path, dtype, value):
    case = client.list_cases("train")[-1]["case_id"]
    image = _grid_of(client, case, tmp_path)
    before = client.label_history(case)
    arr = np.zeros(image.shape, dtype=dtype)
    arr[2:6, 4:10, 4:10] = value  # 256 and 257 would wrap to 0 and 1, and be stored as a plausible label
    path = write_volume(image.like(arr), tmp_path / "label.nrrd")
    with pytest.raises(ValidationError) as err:
        client.submit_label(case, path, kind="final")
    assert err.value.status == 422 and "label" in err.value.message
    assert client.label_history(case) == before


def test_reviewed_mask_values_are_checked_before_they_are_narrowed(backend, client, tmp_path):
    case = client.list_cases("train")[-2]["case_id"]
    image = _grid_of(client, case, tmp_path)
    before = client.label_history(case)
    label = write_volume(image.like(np.zeros(image.shape, np.uint8)), tmp_path / "label.nrrd")
    mask = np.zeros(image.shape, np.uint16)
    mask[2:6, 4:10, 4:10] = 257  # would wrap to 1: a mask of reviewed voxels nobody marked
    mask_path = write_volume(image.like(mask), tmp_path / "mask.nrrd")
    with pytest.raises(ValidationError) as err:
        client.submit_label(case, label, kind="correction", reviewed_mask_path=mask_path)
    assert err.value.status == 422 and "mask" in err.value.message
    assert client.label_history(case) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_images_with_non_finite_voxels_are_refused(backend, client, tmp_path, bad):
    arr = np.random.default_rng(0).random((12, 16, 16), dtype=np.float32)
    arr[3, 4, 5] = bad
    path = write_volume(Volume(arr), tmp_path / "bad.nrrd")
    n = len(client.list_cases())
    with pytest.raises(ValidationError) as err:
        client.upload_case(path, case_id="non-finite")
    assert err.value.status == 422 and "finite" in err.value.message and "1 voxel" in err.value.message
    assert len(client.list_cases()) == n


@pytest.mark.parametrize("chunked", [False, True])
def test_an_upload_over_the_limit_is_answered_413_even_while_the_client_is_still_sending(backend, chunked):
    """The server knows the answer from the headers (or from the first MB of a chunked body), long before the body
    has arrived; a client that keeps sending must still read the 413 and its reason, not a reset connection."""
    import http.client
    import time
    import urllib.parse

    url = urllib.parse.urlsplit(backend.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = (b'--B0UNDARY\r\nContent-Disposition: form-data; name="case_id"\r\n\r\nbig\r\n'
            b'--B0UNDARY\r\nContent-Disposition: form-data; name="image"; filename="big.nrrd"\r\n\r\n'
            + b"x" * (3 * 2**20) + b"\r\n--B0UNDARY--\r\n")  # 3 MB against the 1 MB limit
    conn.putrequest("POST", "/api/v1/cases")
    conn.putheader("Authorization", f"Bearer {backend.token}")
    conn.putheader("Content-Type", "multipart/form-data; boundary=B0UNDARY")
    conn.putheader("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(len(body)))
    conn.endheaders()
    time.sleep(0.3)  # the server has seen the headers by now; the body follows in pieces
    step = 64 * 2**10
    for i in range(0, len(body), step):
        piece = body[i:i + step]
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
    if chunked:
        conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 413 and "limit" in json.loads(resp.read())["detail"]
    conn.close()
    assert "big" not in [c["case_id"] for c in backend.client().list_cases()]


def test_a_full_index_answers_507_and_keeps_no_file_of_the_refused_write(tmp_path, tiny_dataset):
    """The index capped at its present size (SSLSEGMENT_INDEX_MAX_MB; past it SQLite reports SQLITE_FULL as on a
    full disk): uploads and corrections are stored until one no longer fits; that one gets a 507 with a message and
    leaves nothing on disk or in the index; reads still work; with room again the same request succeeds."""
    from training.datastore import INDEX_QUOTA_ENV

    root = tmp_path / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="train:2")
    case = store.cases("train")[0]["case_id"]
    grid = store.grid(case)
    label = write_volume(Volume(np.zeros(grid.shape, np.uint8), grid.geometry), tmp_path / "label.nrrd")
    mask = np.zeros(grid.shape, np.uint8)
    mask[:4] = 1
    mask = write_volume(Volume(mask, grid.geometry), tmp_path / "mask.nrrd")
    rng = np.random.default_rng(1)
    images = [write_volume(Volume(rng.random((8, 16, 16), dtype=np.float32)), tmp_path / f"new{i}.nrrd")
              for i in range(60)]
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    quota_mb = store.db.execute("PRAGMA page_count").fetchone()[0] * 4096 / 2**20
    assert store.db.execute("PRAGMA page_size").fetchone()[0] == 4096

    def files():
        return {p for p in root.rglob("*") if p.is_file() and p.parent.name != "index" and "index" not in p.parts}

    refused = {}
    with LocalBackend(root, with_worker=False, env_overrides={INDEX_QUOTA_ENV: f"{quota_mb:.6f}"}).start() \
            .wait_until_ready() as full:
        client = full.client(timeout=60)
        sends = {"upload": lambda i: client.upload_case(images[i], case_id=f"newcase{i:02d}"),
                 "correction": lambda i: client.submit_label(case, label, kind="correction", reviewed_mask_path=mask)}
        for what, send in sends.items():
            for i in range(len(images)):
                before = files()
                try:
                    send(i)
                except Exception as exc:
                    assert getattr(exc, "status", None) == 507 and "full" in str(exc), exc
                    assert files() == before  # nothing of the refused write stays on disk
                    refused[what] = i
                    break
            assert what in refused, f"the index never filled up with {what}s"
        assert client.info()["n_cases"] == len(store.cases())  # reads are unaffected
    stored = {c["case_id"] for c in store.cases()}
    assert {f"newcase{i:02d}" for i in range(refused["upload"])} <= stored
    assert f"newcase{refused['upload']:02d}" not in stored
    report = store.check()
    assert report["ok"] and report["unindexed"] == report["staging"] == report["uploads"] == []
    with LocalBackend(root, with_worker=False).start().wait_until_ready() as roomy:
        client = roomy.client(timeout=60)
        i = refused["upload"]
        assert client.upload_case(images[i], case_id=f"newcase{i:02d}")["case_id"] == f"newcase{i:02d}"
        assert client.submit_label(case, label, kind="correction", reviewed_mask_path=mask)["kind"] == "correction"


def test_datastore_check_reports_spooled_uploads_and_cleans_only_stale_ones(tmp_path):
    import os
    import time

    from training.datastore import UPLOAD_PREFIX, UPLOAD_STALE_S

    store = Datastore(tmp_path / "store", create=True)
    stale, fresh = (store.upload_dir / f"{UPLOAD_PREFIX}{n}.nrrd" for n in ("old", "new"))
    for p in (stale, fresh):
        p.write_bytes(b"partial upload")
    old = time.time() - UPLOAD_STALE_S - 60
    os.utime(stale, (old, old))
    report = store.check()
    assert report["uploads"] == sorted(store.rel(p) for p in (stale, fresh))
    store.check(clean=True)
    assert not stale.exists() and fresh.exists()  # a young one may be a request in flight


def test_an_image_over_the_voxel_cap_is_refused_from_its_header(backend, client, tmp_path):
    """The datastore's max_voxels setting bounds what an upload may declare; the refusal names the size and the
    limit, and the case is not registered."""
    store = Datastore(backend.datastore)
    image = write_volume(Volume(np.random.default_rng(2).random((10, 20, 30), dtype=np.float32)), tmp_path / "i.nrrd")
    store.update_settings({"max_voxels": 5999})
    try:
        with pytest.raises(ValidationError) as err:
            client.upload_case(image, case_id="capped")
        assert err.value.status == 422 and "30x20x10 voxels is more than the limit of 5,999" in err.value.message
        assert "capped" not in {c["case_id"] for c in client.list_cases()}
    finally:
        store.update_settings({"max_voxels": DEFAULT_MAX_VOXELS})
    assert client.upload_case(image, case_id="capped")["case_id"] == "capped"


def _raw_request(backend, head: str, body: bytes = b"", pause_s: float = 0.0, timeout: float = 10.0) -> str:
    """Send a hand-made request on a socket and return the first response line (what a client reads first)."""
    import socket
    import time
    import urllib.parse

    url = urllib.parse.urlsplit(backend.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        if pause_s:
            time.sleep(pause_s)
        if body:
            sock.sendall(body)
        return sock.makefile("rb").readline().decode().strip()


def test_the_token_is_checked_before_the_body_is_asked_for(backend):
    """An upload with a wrong token is answered 401 from its headers: a client waiting with `Expect: 100-continue`
    is never asked for its body (the form used to be parsed, and the body asked for, before the token check)."""
    head = ("POST /api/v1/cases HTTP/1.1\nHost: x\nAuthorization: Bearer wrong\nExpect: 100-continue\n"
            "Content-Type: multipart/form-data; boundary=B\nContent-Length: 500000\n")
    assert _raw_request(backend, head).startswith("HTTP/1.1 401")
    ok = head.replace("Bearer wrong", f"Bearer {backend.token}")
    assert _raw_request(backend, ok).startswith("HTTP/1.1 100")  # with the token the server does ask for it


def test_a_body_that_stops_arriving_is_answered_408(tmp_path):
    """A slow-drip client (headers, a few bytes, then nothing) holds the connection only for the body timeout."""
    with LocalBackend(tmp_path / "store", with_worker=False, serve_args=["--body-timeout-s", "1"]).start() \
            .wait_until_ready() as slow:
        head = (f"POST /api/v1/cases HTTP/1.1\nHost: x\nAuthorization: Bearer {slow.token}\n"
                f"Content-Type: multipart/form-data; boundary=B\nContent-Length: 5000\n")
        line = _raw_request(slow, head, body=b"--B\r\n", timeout=20)
        assert line.startswith("HTTP/1.1 408"), line
        assert slow.client().list_cases() == []


def test_the_server_says_where_the_token_is_and_never_logs_it(backend):
    log = (backend.log_dir / "serve.log").read_text()
    assert "API token in" in log and str(Datastore(backend.datastore).token_path) in log
    assert backend.token not in log


def test_the_body_timeout_never_cuts_a_slow_download(tmp_path):
    """The timeout is for a request body that stops arriving; a response the client reads slowly (a big image
    over a slow link) outlasts it and still arrives whole (the server listens for a disconnect meanwhile)."""
    import socket
    import time
    import urllib.parse

    root = tmp_path / "store"
    store = Datastore(root, create=True)
    big = write_volume(Volume(np.random.default_rng(3).random((128, 128, 128), dtype=np.float32)),
                       tmp_path / "big.nrrd", compress=False)
    case, _ = store.register_image(big, case_id="big")
    store.close()
    with LocalBackend(root, with_worker=False, serve_args=["--body-timeout-s", "0.3"]).start() \
            .wait_until_ready() as slow:
        url = urllib.parse.urlsplit(slow.base_url)
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(f"GET /api/v1/cases/big/image HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {slow.token}\r\n"
                         "Connection: close\r\n\r\n".encode())
            data, t0 = b"", time.monotonic()
            while True:
                piece = sock.recv(256 * 1024)
                if not piece:
                    break
                data += piece
                time.sleep(0.05)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        assert time.monotonic() - t0 > 1.0  # the download outlasted the body timeout several times over
        assert len(body) == length == big.stat().st_size

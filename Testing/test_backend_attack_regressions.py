"""What the attack on the backend found (benchmarks/backend_attack.py), each pinned: a header that makes the reader
open another file, a decompression bomb under the voxel cap, networks no job could train, row ids beyond SQLite's
integers, a label naming a model version that does not exist, ambiguous body framing, a plain-text 400, racing
submissions and uploads, a damaged checkpoint, and what a killed writer leaves behind."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest

from conftest import TINY_NET, TINY_PATCH
from SSLSegmentLib.data.imageio import read_label, read_volume, write_volume
from SSLSegmentLib.data.volume import ImageError, Volume
from SSLSegmentLib.review.local_backend import LocalBackend
from training import datastore
from training.datastore import Conflict, Datastore, InvalidInput, import_folder
from training.jobs import resolve_train_params
from training.registry import ModelRegistry

TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 6, "val_interval": 6, "device": "cpu"}


@pytest.fixture
def store(tmp_path, tiny_dataset):
    s = Datastore(tmp_path / "store", create=True, split_seed="seed-1")
    import_folder(s, tiny_dataset, labels="train:2")
    s.update_settings({"train": TRAIN})
    return s


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("attack-regressions") / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="train:2")
    store.close()
    with LocalBackend(root, with_worker=False, serve_args=["--max-upload-mb", "1"]).start().wait_until_ready() as b:
        yield b


def _raw(backend, data: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes as they are; (status, head, body) of the answer."""
    url = urllib.parse.urlsplit(backend.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


def _request(backend, method: str, path: str, body: bytes = b"", ctype: str = "application/json") -> tuple[int, dict]:
    status, _, answer = _raw(backend, (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {backend.token}\r\n"
                                       f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                                       ).encode() + body)
    return status, json.loads(answer)


def _nrrd(sizes, data: bytes, extra: str = "", encoding: str = "raw", kind: str = "uint8") -> bytes:
    return (f"NRRD0004\ntype: {kind}\ndimension: 3\nsizes: {' '.join(map(str, sizes))}\nspacings: 1 1 1\n"
            f"endian: little\nencoding: {encoding}\n{extra}\n").encode() + data


# -- the reader as the door -------------------------------------------------------------------------------------
def test_a_header_naming_a_separate_data_file_is_refused_unread(tmp_path):
    """An NRRD `data file:` or a MetaImage ElementDataFile makes the reader open whatever path it names: an upload
    of 150 bytes became a case whose voxels were the datastore's token. Every such header is refused; so is a NIfTI
    header whose data would be in a separate .img."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cr3t-token-value-of-44-bytes-------------\n")
    nrrd = tmp_path / "detached.nrrd"
    nrrd.write_bytes(_nrrd((2, 2, 11), b"", extra=f"data file: {secret}\n"))
    mha = tmp_path / "detached.mha"
    mha.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 11\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"
                   f"ElementDataFile = {secret}\n")
    single = write_volume(Volume(np.zeros((4, 4, 4), np.uint8)), tmp_path / "x.nii").read_bytes()
    pair = bytearray(single)
    pair[344:348] = b"ni1\0"  # the same header, saying its voxels are in pair.img
    (tmp_path / "pair.nii").write_bytes(bytes(pair))
    (tmp_path / "pair.img").write_bytes(single[352:])
    for path in (nrrd, mha, tmp_path / "pair.nii"):
        with pytest.raises(ImageError, match="separate"):
            read_volume(path)
        with pytest.raises(ImageError, match="separate"):
            read_label(path)
    # Attached data still reads, in every format the backend takes.
    for suffix in (".nrrd", ".nii.gz", ".nii", ".mha"):
        assert read_volume(write_volume(Volume(np.ones((3, 4, 5), np.float32)), tmp_path / f"ok{suffix}")).shape == (3, 4, 5)


def test_an_upload_whose_header_points_at_the_token_does_not_become_a_case(live):
    body = (b'--B\r\nContent-Disposition: form-data; name="case_id"\r\n\r\nleak\r\n'
            b'--B\r\nContent-Disposition: form-data; name="image"; filename="x.mha"\r\n\r\n'
            + (f"ObjectType = Image\nNDims = 3\nDimSize = 2 2 11\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"
               f"ElementDataFile = {live.datastore / '.sslsegment' / 'token'}\n").encode() + b"\r\n--B--\r\n")
    status, answer = _request(live, "POST", "/api/v1/cases", body, "multipart/form-data; boundary=B")
    assert status == 422 and "separate data file" in answer["detail"]
    assert "leak" not in {c["case_id"] for c in live.client().list_cases()}


def test_an_image_decoding_to_more_than_max_expansion_times_its_file_is_refused(store, tmp_path):
    """A 260 KB gzip NRRD of zeros declared 256 MB of float voxels, under the voxel cap: it was decoded (700 MB
    held by the server) and stored as a case that every scoring pass then ran the network over."""
    bomb = tmp_path / "bomb.nrrd"
    bomb.write_bytes(_nrrd((256, 256, 128), gzip.compress(b"\0" * (32 * 2**20)), encoding="gzip", kind="float"))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageError, match="more than 100 times its size"):
        read_volume(bomb, max_expansion=100)
    with pytest.raises(InvalidInput, match="more than 100 times its size"):
        store.register_image(bomb, case_id="bomb")
    assert "bomb" not in {c["case_id"] for c in store.cases()}
    # A header that claims more voxels than its file holds is refused before anything is allocated.
    claim = tmp_path / "claim.nrrd"
    claim.write_bytes(_nrrd((800, 800, 800), b"\0" * 900))
    with pytest.raises(ImageError, match="times its size"):
        read_volume(claim, max_expansion=100)
    # A real scan (noise does not compress) is far from the bound; the setting 0 lifts it.
    scan = write_volume(Volume(np.random.default_rng(0).random((16, 24, 24), dtype=np.float32)), tmp_path / "s.nrrd")
    assert store.register_image(scan, case_id="scan")[1]
    store.update_settings({"max_expansion": 0})
    assert store.register_image(bomb, case_id="bomb")[1]


# -- requests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network,message", [
    ({**TINY_NET, "features": -1}, "features must be integers of at least 1"),
    ({**TINY_NET, "channels": [0, 0, 0]}, "channels must be integers of at least 1"),
    ({**TINY_NET, "num_res_units": -2}, "num_res_units must be integers of at least 0"),
    ({**TINY_NET, "norm": "bogus"}, "cannot be built"),
    ({**TINY_NET, "in_channels": 3}, "in_channels must be 1"),
    ({**TINY_NET, "num_classes": 7}, "num_classes must be the datastore's 2"),
])
def test_a_network_no_job_could_train_is_refused_when_asked_for(store, network, message):
    """These were queued (202) and left to fail in the worker, or to train a network the datastore's labels do not
    fit."""
    with pytest.raises(InvalidInput, match=message):
        resolve_train_params(store, {"init": "scratch", "network": network})
    resolve_train_params(store, {"init": "scratch", "network": TINY_NET})


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/labels/1180591620717411303424/label", b""),
    ("POST", "/exclusions/1180591620717411303424/lift", b'{"reason": "x"}'),
    ("POST", "/exclusions", b'{"case_id": "CASE", "reason": "x", "revision": 1180591620717411303424}'),
])
def test_row_ids_beyond_sqlite_integers_are_refused_not_a_500(live, method, path, body):
    case = live.client().list_cases()[0]["case_id"]
    path = f"/api/v1/cases/{case}{path}" if path.startswith("/labels") else f"/api/v1{path}"
    status, answer = _request(live, method, path, body.replace(b"CASE", case.encode()))
    assert status == 422 and "less than or equal to 9223372036854775807" in json.dumps(answer)


def test_releasing_a_lease_checks_the_annotator_name(live):
    case = live.client().list_cases()[0]["case_id"]
    status, answer = _request(live, "DELETE", f"/api/v1/cases/{case}/lease?annotator=..%2F..%2Fx")
    assert status == 400 and "annotator name" in answer["detail"]


def test_a_body_with_two_framings_is_refused(live, tmp_path):
    """Content-Length and Transfer-Encoding together: the server used to take the chunked one and store the case;
    a proxy taking the other would see a different request (smuggling)."""
    form = (b'--B\r\nContent-Disposition: form-data; name="case_id"\r\n\r\ntwoframes\r\n'
            b'--B\r\nContent-Disposition: form-data; name="image"; filename="i.nrrd"\r\n\r\n'
            + write_volume(Volume(np.random.default_rng(1).random((4, 6, 6), dtype=np.float32)),
                           tmp_path / "i.nrrd").read_bytes() + b"\r\n--B--\r\n")
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(form), form)
    status, _, body = _raw(live, (f"POST /api/v1/cases HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live.token}\r\n"
                                  f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {len(form)}\r\n"
                                  "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + chunked)
    assert status == 400 and "both Content-Length and Transfer-Encoding" in json.loads(body)["detail"]
    assert "twoframes" not in {c["case_id"] for c in live.client().list_cases()}


def test_a_request_the_http_parser_refuses_is_answered_in_json(live):
    for request in (b"GARBAGE\r\n\r\n", b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"):
        status, head, body = _raw(live, request)
        assert status == 400 and b"application/json" in head.lower()
        assert "malformed HTTP request" in json.loads(body)["detail"]


def test_a_label_naming_a_model_version_that_does_not_exist_is_refused(store):
    case = store.cases("test")[0]["case_id"]
    grid = store.grid(case)
    label = Volume(np.zeros(grid.shape, np.uint8), grid.geometry)
    with pytest.raises(InvalidInput, match="'v9999' is not a model version"):
        store.add_label(case, label, model_version="v9999")
    assert store.revisions(case) == []


# -- races ----------------------------------------------------------------------------------------------------
def _correction(store, case, seed=0):
    grid = store.grid(case)
    rng = np.random.default_rng(seed)
    mask = np.zeros(grid.shape, np.uint8)
    mask[:3] = 1
    return (Volume(rng.integers(0, 2, grid.shape).astype(np.uint8), grid.geometry), Volume(mask, grid.geometry))


def test_a_submission_id_raced_for_two_cases_is_never_acknowledged_for_the_one_not_stored(store):
    """Two requests with one submission id, for cases A and B, at once: B's passed the early look-up, A's got
    indexed first, and B was answered with A's revision (200): acknowledged, never stored."""
    a, b = store.cases("test")[0]["case_id"], store.cases("test")[1]["case_id"]
    sid = "raced-submission-1"
    write = store._write_correction

    def a_wins_meanwhile(case_id, *args, **kwargs):
        if case_id == b and not store.revisions(a):
            lab, mask = _correction(store, a)
            store.add_label(a, lab, kind="correction", reviewed_mask=mask, submission_id=sid)
        return write(case_id, *args, **kwargs)

    store._write_correction = a_wins_meanwhile
    lab, mask = _correction(store, b, 1)
    with pytest.raises(Conflict, match="another case"):
        store.add_label(b, lab, kind="correction", reviewed_mask=mask, submission_id=sid)
    assert len(store.revisions(a)) == 1 and store.revisions(b) == []
    assert not (store.root / "labels" / "corrections" / "anonymous" / b).exists() or not any(
        (store.root / "labels" / "corrections" / "anonymous" / b).iterdir())  # B's files taken back
    # The same id with other content for the same case is refused too; the same content is a retry.
    other, _ = _correction(store, a, 2)
    with pytest.raises(Conflict, match="different label"):
        store.add_label(a, other, kind="correction", reviewed_mask=mask, submission_id=sid)
    same, same_mask = _correction(store, a)
    assert store.add_label(a, same, kind="correction", reviewed_mask=same_mask, submission_id=sid)[1] is False


@pytest.mark.parametrize("same_image", [True, False])
def test_an_image_raced_for_one_case_id_is_one_case_never_a_500(store, tmp_path, same_image):
    """Two uploads for one case id placed their files at once: the later link failed with EEXIST, answered 500
    ("storage error: File exists"). The same image is now one case (200 for the other), another image a 409."""
    rng = np.random.default_rng(3)
    first = write_volume(Volume(rng.random((6, 8, 8), dtype=np.float32)), tmp_path / "first.nrrd")
    second = first if same_image else write_volume(Volume(rng.random((6, 8, 8), dtype=np.float32)),
                                                   tmp_path / "second.nrrd")
    place = store._place_file
    raced = []

    def other_upload_first(source, dest, move):
        if not raced:  # the other upload places and indexes its file between this one's look and its link
            raced.append(True)
            store._place_file = place
            store.register_image(first, case_id="raced")
        return place(source, dest, move)

    store._place_file = other_upload_first
    if same_image:
        case, created = store.register_image(second, case_id="raced")
        assert case["case_id"] == "raced" and created is False
    else:
        with pytest.raises(Conflict, match="different image"):
            store.register_image(second, case_id="raced")
    store._place_file = place
    assert len(list(store.root.glob("raced.*"))) == 1 and not list(store.root.glob(".tmp-*"))


# -- a damaged checkpoint ---------------------------------------------------------------------------------------
def _two_versions(store, tmp_path):
    from SSLSegmentLib.ml.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from SSLSegmentLib.ml.networks import NetworkConfig, build_network

    cfg = NetworkConfig(**TINY_NET)
    ckpt = {"format": CHECKPOINT_FORMAT, "model": build_network(cfg).state_dict(), "network": cfg.to_dict(),
            "train_config": {"patch_size": list(TINY_PATCH)}, "method": "brl"}
    path = save_checkpoint(ckpt, tmp_path / "a.pt")
    registry = ModelRegistry(store)
    for parent in (None, "v0001"):
        registry.add_version(path, {"parent": parent, "metrics": {}, "trained_on": {}})
    registry.promote("v0002")
    return registry


def _flip(path):
    data = path.read_bytes()
    mid = len(data) // 2
    path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:])


def test_a_damaged_checkpoint_is_never_made_current_served_or_trained_from(store, tmp_path):
    """Bytes flipped inside a version's model.pt (it may still load, with wrong weights): promoting it moved the
    current pointer to it, the server loaded it, and a job fine-tuned from it and published the result."""
    from training.service import CurrentModel

    registry = _two_versions(store, tmp_path)
    _flip(store.root / "models" / "v0001" / "model.pt")
    with pytest.raises(datastore.Damaged, match="v0001"):
        registry.promote("v0001")
    assert registry.current == "v0002"
    _flip(store.root / "models" / "v0002" / "model.pt")
    with pytest.raises(datastore.Damaged, match="v0002"):
        CurrentModel(registry, "cpu").get()
    with pytest.raises(datastore.Damaged, match="v0002"):
        resolve_train_params(store, {})  # POST /train fine-tunes from current: refused before a job is queued
    assert store.jobs() == []


# -- what a killed writer leaves --------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_what_a_killed_writer_leaves_is_removed_and_nothing_else(store):
    """A server killed mid-request left spooled uploads (kept an hour even by --clean), staging folders, and a
    correction folder published but never indexed, which datastore-check reported and nothing removed. Writers now
    name themselves in what they write; what a writer that is gone left is removed when a server or worker starts,
    while a live writer's files and anything indexed stay."""
    from SSLSegmentLib.data.imageio import writer_tag

    WRITER_FILE = datastore.WRITER_FILE
    alive = writer_tag()
    dead = f"{alive.split('-')[0]}-{_dead_pid()}"
    case = store.cases("test")[0]["case_id"]
    lab, mask = _correction(store, case)
    kept = store.add_label(case, lab, kind="correction", reviewed_mask=mask, author="alice")[0]
    kept_folder = store.abs(kept["files"]["label"]).parent
    (kept_folder / WRITER_FILE).write_text(dead)  # indexed: stays whoever wrote it
    corrections = store.root / "labels" / "corrections" / "alice" / case
    orphan = corrections / "r0099"
    orphan.mkdir()
    write_volume(lab, orphan / "label.nrrd")
    (orphan / WRITER_FILE).write_text(dead)
    in_flight = corrections / "r0100"
    in_flight.mkdir()
    write_volume(lab, in_flight / "label.nrrd")
    (in_flight / WRITER_FILE).write_text(alive)
    staging_dead, staging_alive = corrections / f".tmp-{dead}-abc", corrections / f".tmp-{alive}-abc"
    staging_dead.mkdir()
    staging_alive.mkdir()
    upload_dead = store.upload_dir / f"upload-{dead}-x.nrrd"
    upload_dead.write_bytes(b"partial")
    image = store.root / "placed-never-indexed.nrrd"  # a case image whose writer died before its index row
    write_volume(Volume(np.zeros((4, 4, 4), np.float32)), image)
    os.link(image, store.root / f".tmp-{dead}-xyplaced-never-indexed.nrrd")
    final = store.root / "labels" / "final" / f"{case}.nrrd"
    write_volume(lab, final)
    os.link(final, store.root / "labels" / "final" / f".tmp-{dead}-qq.nrrd")

    report = store.check()
    assert set(report["interrupted"]) >= {store.rel(p) for p in (orphan, staging_dead, upload_dead, image, final)}
    removed = set(Datastore(store.root).clean_interrupted())
    assert {store.rel(p) for p in (orphan, staging_dead, upload_dead, image, final)} <= removed
    for gone in (orphan, staging_dead, upload_dead, image, final):
        assert not gone.exists()
    for stays in (kept_folder, in_flight, staging_alive):
        assert stays.exists()
    assert not list(store.root.glob(".tmp-*")) and not list((store.root / "labels" / "final").glob(".tmp-*"))
    assert store.check()["ok"] and store.check()["interrupted"] == []


def test_a_server_starting_removes_what_a_killed_one_left(tmp_path, tiny_dataset):
    root = tmp_path / "store"
    store = Datastore(root, create=True)
    import_folder(store, tiny_dataset, labels="none")
    from SSLSegmentLib.data.imageio import writer_tag

    dead = f"{writer_tag().split('-')[0]}-{_dead_pid()}"
    upload = store.upload_dir / f"upload-{dead}-x.nrrd"
    upload.write_bytes(b"partial")
    store.close()
    with LocalBackend(root, with_worker=False).start().wait_until_ready():
        assert not upload.exists()

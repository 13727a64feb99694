"""The backend attacked as a hostile client would: malformed requests, races, faults and crashes, with the figures.

    python -m benchmarks.backend_attack [--quick] [--out-name backend-attack] [--keep]

A real `sslsegment serve` and `sslsegment worker` run on 127.0.0.1 over a tiny phantom datastore (16x24x24 voxels, a
tiny network trained for a few iterations). Then:

  1. malformed requests, table-driven (category, name, request): auth, JSON bodies, image uploads, labels and
     reviewed masks, body framing. Each answer is recorded and counted: refused (a 4xx, 413 or 507 with a JSON
     message), accepted (2xx), 5xx, or no answer. Afterwards nothing of them may have reached storage: no new case,
     label revision, job or exclusion, the datastore check clean, no spooled upload left;
  2. races: the same submission, image or case id sent from several threads at once;
  3. faults: workers and the server killed with SIGKILL at chosen moments, a disk that fills up (a small tmpfs,
     where this process may mount one), an index over its quota, a checkpoint corrupted on disk, a scoring pass
     that fails after a promotion, a diverging job, a cancel and a manual rollback during a job. After each: the
     server answers, the current model is a promoted version whose checkpoint matches its digest and whose job
     succeeded with it, and no file is left that the index does not know;
  4. submissions: corrections sent from many threads at once, and corrections sent while the server is killed
     (SIGKILL) and restarted over and over, each client retrying with its submission id until it is acknowledged;
     every acknowledged one must then be in the index and on disk with the content that was sent;
  5. security checks: the token comparison, the default bind address, a checkpoint carrying pickled code.

Writes benchmarks/results/<out-name>.json and .md (machine, versions, date; the headline figures first). No token and
no volume data goes into the results. `run_attack(work_dir, quick=True)` is the reduced run the tests use.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
from http import client as httpclient
import inspect
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS = Path("benchmarks/results")
API = "/api/v1"

SHAPE = (16, 24, 24)  # z, y, x: a few milliseconds per request, a training step in a few milliseconds
NETWORK = {"channels": [4, 8, 16], "strides": [2, 2], "features": 4, "num_res_units": 0}
TRAIN = {"network": NETWORK, "patch_size": list(SHAPE), "iterations": 8, "val_interval": 8, "batch_labeled": 1,
         "batch_unlabeled": 1, "device": "cpu"}
UPLOAD_LIMIT_MB = 1  # the attack's bombs and oversized bodies are sized against it
BODY_TIMEOUT_S = 2.0
WORKER_ARGS = ["--threads", "1", "--poll", "0.1", "--heartbeat", "0.5", "--stale-after", "30"]

PROFILES = {
    # every attack, every fault, 40 concurrent corrections and 105 across repeated server kills
    "full": {"every_nth_attack": 1, "faults": "all", "worker": True, "concurrent": 40, "killed": 105, "kill_clients": 3,
             "server_kills": 8, "races": True},
    # a slice of every category, two faults that need no training, fewer submissions and one server kill, no
    # worker (its imports alone cost seconds): what the test suite runs
    "quick": {"every_nth_attack": 6, "faults": ("corrupt checkpoint promoted", "index full"), "worker": False,
              "concurrent": 12, "killed": 12, "kill_clients": 2, "server_kills": 1, "races": False},
}


# -- talking to the server --------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int | None
    body: bytes = b""
    error: str | None = None

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None

    @property
    def message(self) -> str | None:
        """The refusal's message: a JSON body {"detail": non-empty text or field errors}, else None."""
        body = self.json()
        detail = body.get("detail") if isinstance(body, dict) else None
        return json.dumps(detail)[:300] if detail not in (None, "", []) else None


@dataclass
class Target:
    """The backend under attack and what the attacks aim at."""

    backend: object  # LocalBackend
    work: Path
    token: str
    cases: dict = field(default_factory=dict)  # role -> case id
    grids: dict = field(default_factory=dict)  # case id -> Volume with the case's geometry (zeros)
    version: str | None = None
    inference_id: str | None = None  # an inference of cases["inferred"]
    host: str = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.backend.port

    @property
    def root(self) -> Path:
        return Path(self.backend.datastore)

    def store(self):
        from training.datastore import Datastore

        return Datastore(self.root)


DEFAULT = object()


def http(t: Target, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         token=DEFAULT, timeout: float = 60.0) -> Answer:
    """One request on its own connection; any failure to get an answer is an Answer without a status."""
    hdrs = {"Connection": "close", **(headers or {})}
    tok = t.token if token is DEFAULT else token
    if tok is not None and "Authorization" not in hdrs:
        hdrs["Authorization"] = f"Bearer {tok}"
    conn = httpclient.HTTPConnection(t.host, t.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return Answer(resp.status, resp.read())
    except (OSError, httpclient.HTTPException) as exc:
        return Answer(None, error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        conn.close()


def post_json(t: Target, path: str, text: str | bytes, **kw) -> Answer:
    body = text.encode() if isinstance(text, str) else text
    return http(t, "POST", path, body, {"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


def raw(t: Target, pieces: list, timeout: float = 30.0) -> Answer:
    """Send bytes as they are (a number in `pieces` is a pause in seconds) and read the first answer."""
    try:
        with socket.create_connection((t.host, t.port), timeout=timeout) as sock:
            try:
                for piece in pieces:
                    if isinstance(piece, (int, float)):
                        time.sleep(piece)
                    else:
                        sock.sendall(piece)
            except OSError:
                pass  # the server may answer and close before the client has sent everything: read the answer
            return _read_answer(sock)
    except OSError as exc:
        return Answer(None, error=f"{type(exc).__name__}: {exc}"[:200])


def _read_answer(sock) -> Answer:
    buf = b""
    while b"\r\n\r\n" not in buf:
        piece = sock.recv(65536)
        if not piece:
            break
        buf += piece
    if not buf:
        return Answer(None, error="the connection closed without an answer")
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Answer(None, error=f"not an HTTP answer: {lines[0][:80]!r}")
    length = next((int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.strip().lower() == b"content-length"),
                  None)
    try:
        while length is None or len(body) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
    except OSError:
        pass
    return Answer(status, body if length is None else body[:length])


def multipart(fields: dict | None = None, files: dict | None = None, boundary: str = "AtTaCkB0uNdArY") -> tuple[bytes, str]:
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_form(t: Target, path: str, fields: dict | None = None, files: dict | None = None, **kw) -> Answer:
    body, ctype = multipart(fields, files)
    return http(t, "POST", path, body, {"Content-Type": ctype}, **kw)


# -- files an attacker sends --------------------------------------------------------------------------------------
def volume_bytes(array: np.ndarray, geometry=None, suffix: str = ".nrrd", compress: bool = True) -> bytes:
    from SSLSegmentLib.data.imageio import write_volume
    from SSLSegmentLib.data.volume import Geometry, Volume

    with tempfile.TemporaryDirectory() as d:
        path = write_volume(Volume(array, geometry or Geometry((1.0, 1.0, 1.0))), Path(d) / f"v{suffix}",
                            compress=compress)
        return path.read_bytes()


def nrrd(sizes, data: bytes, kind: str = "uint8", encoding: str = "raw", spacings=(1.0, 1.0, 1.0),
         origin=(0.0, 0.0, 0.0), directions=None, extra: str = "", dimension: int = 3) -> bytes:
    """An NRRD file written by hand: any header an attacker likes, over `data`."""
    d = directions or [[spacings[i] if j == i else 0.0 for j in range(3)] for i in range(3)]
    dirs = " ".join("(" + ",".join(repr(float(v)) for v in row) + ")" for row in d)
    head = ["NRRD0004", f"type: {kind}", f"dimension: {dimension}", "sizes: " + " ".join(map(str, sizes))]
    if dimension == 3:
        head += ["space: left-posterior-superior", f"space directions: {dirs}",
                 "space origin: (" + ",".join(repr(float(o)) for o in origin) + ")"]
    else:
        head += ["spacings: " + " ".join(["1"] * dimension)]
    head += ["endian: little", f"encoding: {encoding}"]
    return ("\n".join(head) + "\n" + extra + "\n").encode() + data


def vector_image_bytes() -> bytes:
    """A 3D image with three components per voxel (an RGB volume)."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as d:
        sitk.WriteImage(sitk.Image([12, 12, 8], sitk.sitkVectorFloat32, 3), str(Path(d) / "v.nrrd"))
        return (Path(d) / "v.nrrd").read_bytes()


def zeros_gzip(n_bytes: int) -> bytes:
    """n_bytes of zeros, gzip-compressed without holding them in memory (a decompression bomb's payload)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk, out, left = b"\0" * 2**20, [], n_bytes
    while left > 0:
        out.append(comp.compress(chunk[:min(left, len(chunk))]))
        left -= len(chunk)
    out.append(comp.flush())
    return b"".join(out)


def nifti_gz_bomb(shape=(512, 512, 1024)) -> bytes:
    """A .nii.gz of uint8 zeros: a few hundred KB that decode to shape's voxels (256 MB by default)."""
    import struct

    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, shape[0], shape[1], shape[2], 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 2, 8)  # datatype uint8, bitpix 8
    struct.pack_into("<8f", hdr, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<h", hdr, 254, 1)  # sform_code
    struct.pack_into("<4f", hdr, 280, 1, 0, 0, 0)
    struct.pack_into("<4f", hdr, 296, 0, 1, 0, 0)
    struct.pack_into("<4f", hdr, 312, 0, 0, 1, 0)
    hdr[344:348] = b"n+1\0"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [comp.compress(bytes(hdr) + b"\0" * 4)]
    left, chunk = int(np.prod(shape)), b"\0" * 2**20
    while left > 0:
        out.append(comp.compress(chunk[:min(left, len(chunk))]))
        left -= len(chunk)
    out.append(comp.flush())
    return b"".join(out)


# -- the malformed requests -------------------------------------------------------------------------------------
@dataclass
class Attack:
    category: str
    name: str
    send: Callable[[Target], Answer]


def attack_table(t: Target) -> list[Attack]:
    """Every malformed request, by category. Each must be refused with a 4xx (413, 507) and a message."""
    table: list[Attack] = []

    def add(category, name):
        def register(fn):
            table.append(Attack(category, name, fn))
            return fn
        return register

    test_case = t.cases["test"]
    grid = t.grids[test_case]
    geometry = grid.geometry
    good_image = volume_bytes(np.random.default_rng(5).random((8, 12, 12), dtype=np.float32))
    good_label = volume_bytes(np.zeros(grid.shape, np.uint8), geometry)
    mask = np.zeros(grid.shape, np.uint8)
    mask[: grid.shape[0] // 2] = 1
    good_mask = volume_bytes(mask, geometry)
    labels = f"{API}/cases/{test_case}/labels"

    # -- auth: every kind of route, without the token or with a wrong one -----------------------------------------
    form, ctype = multipart({"case_id": "auth-probe"}, {"image": ("i.nrrd", good_image)})
    label_form, label_ctype = multipart({"kind": "final"}, {"label": ("l.nrrd", good_label)})
    routes = [
        ("GET", f"{API}/info", None, None), ("GET", f"{API}/cases", None, None),
        ("POST", f"{API}/cases", form, ctype), ("GET", f"{API}/cases/{test_case}/image", None, None),
        ("POST", f"{API}/cases/{test_case}/infer", b"{}", "application/json"),
        ("POST", labels, label_form, label_ctype), ("POST", f"{API}/train", b"{}", "application/json"),
        ("GET", f"{API}/models/{t.version}/weights", None, None),
        ("POST", f"{API}/models/{t.version}/promote", None, None), ("DELETE", f"{API}/train/0123456789ab", None, None),
        ("POST", f"{API}/exclusions", json.dumps({"case_id": test_case, "reason": "x"}).encode(), "application/json"),
        ("GET", f"{API}/cases/next", None, None),
    ]
    wrong = "A" * len(t.token)
    for method, path, body, ct in routes:
        for label, tok in (("no token", None), ("wrong token", wrong)):
            add("auth", f"{label}: {method} {path.replace(API, '')}")(
                lambda t, m=method, p=path, b=body, c=ct, k=tok: http(t, m, p, b, {"Content-Type": c} if c else {},
                                                                    token=k))
    info = f"{API}/info"
    for name, header in (("empty bearer", "Bearer "), ("Basic scheme with the token", None),
                         ("another scheme", "Token {tok}"), ("token plus one character", "Bearer {tok}x"),
                         ("token less its last character", "Bearer {tok1}"), ("10 KB token", "Bearer " + "a" * 10_000),
                         ("token in lower case", "Bearer {low}")):
        add("auth", name)(lambda t, h=header, n=name: http(t, "GET", info, headers={"Authorization": (
            "Basic " + base64.b64encode(f"x:{t.token}".encode()).decode()) if h is None else h.format(
                tok=t.token, tok1=t.token[:-1], low=t.token.lower() if t.token.lower() != t.token else t.token + "Z")},
            token=None))
    add("auth", "token in the query string")(lambda t: http(t, "GET", f"{info}?token={t.token}", token=None))
    add("auth", "token in a cookie")(lambda t: http(t, "GET", info, headers={"Cookie": f"token={t.token}"}, token=None))
    add("auth", "two Authorization headers, wrong one last")(lambda t: raw(t, [
        f"GET {info} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t.token}\r\nAuthorization: Bearer {wrong}\r\n"
        "Connection: close\r\n\r\n".encode()]))
    add("auth", "two Authorization headers, wrong one first")(lambda t: raw(t, [
        f"GET {info} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {wrong}\r\nAuthorization: Bearer {t.token}\r\n"
        "Connection: close\r\n\r\n".encode()]))
    add("auth", "non-ASCII bytes in the Authorization header")(lambda t: raw(t, [
        b"GET " + info.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x00\r\nConnection: close\r\n\r\n"]))
    add("auth", "Expect: 100-continue upload with a wrong token")(lambda t: raw(t, [
        f"POST {API}/cases HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {wrong}\r\nExpect: 100-continue\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(form)}\r\nConnection: close\r\n\r\n".encode()]))

    # -- JSON bodies: training parameters -------------------------------------------------------------------------
    train = f"{API}/train"
    bad_params = [
        {"batch_labeled": -1}, {"batch_labeled": 0}, {"batch_labeled": 1_000_000}, {"batch_unlabeled": -1},
        {"val_interval": 0}, {"device": "tpu:99"}, {"device": "cuda:7"}, {"device": "cpu:0"}, {"device": ""},
        {"lr_schedule": "bogus"}, {"eval_model": "both"}, {"seed": 2**70}, {"seed": -1},
        {"patch_size": [4096, 4096, 4096]}, {"patch_size": [16, 24]}, {"patch_size": [0, 24, 24]},
        {"network": {"channels": [100000, 200000, 400000], "strides": [2, 2]}, "init": "scratch"},
        {"network": {"channels": [1e5, 2e5, 4e5], "strides": [2, 2]}, "init": "scratch"},
        {"network": {"channels": [4, 8, 16], "strides": [2, 2], "features": -1}, "init": "scratch"},
        {"network": {"channels": [0, 0, 0], "strides": [2, 2]}, "init": "scratch"},
        {"network": {"channels": [4, 8, 16], "strides": [2, 2], "norm": "bogus"}, "init": "scratch"},
        {"network": {"channels": [4, 8, 16], "strides": [2, 2], "in_channels": 3}, "init": "scratch"},
        {"network": {"channels": [4, 8, 16], "strides": [2, 2], "num_classes": 7}, "init": "scratch"},
        {"network": {"bogus": 1}}, {"network": "unet"},
        {"nproc": 64}, {"nproc": 0}, {"weight_decay": -1.0}, {"weight_decay": 1e6}, {"ema_decay": 5.0},
        {"ema_decay": -0.5}, {"momentum": 2.0}, {"momentum": -1}, {"rampup_steps": -10}, {"pretrain_iterations": -1},
        {"pretrain_iterations": 8, "iterations": 8}, {"method_options": {"nonsense": 1}},
        {"method": "mean-teacher", "method_options": {"ema_decay": "high"}}, {"method_options": "x"},
        {"method": "bogus"}, {"method": ""}, {"iterations": "10"}, {"iterations": True}, {"iterations": 0},
        {"iterations": -5}, {"iterations": 10**30}, {"iterations": 4.5}, {"lr": "0.1"}, {"lr": 0}, {"lr": -0.01},
        {"augment": 1}, {"augment": "yes"}, {"tolerance": 5}, {"init": "v9999"}, {"init": "../../etc"}, {"init": 5},
        {"reviewed_patch_share": 2.0}, {"unknown_key": 1},
    ]
    for params in bad_params:
        text = json.dumps(params)
        add("json", f"train {text[:70]}")(lambda t, s=text: post_json(t, train, s))
    for fld in ("lr", "momentum", "weight_decay", "ema_decay", "tolerance", "reviewed_patch_share"):
        for literal in ("NaN", "Infinity", "-Infinity"):
            add("json", f"train {fld}: {literal}")(lambda t, s=f'{{"{fld}": {literal}}}': post_json(t, train, s))
    add("json", "train method_options holding NaN")(lambda t: post_json(
        t, train, '{"method": "mean-teacher", "method_options": {"ema_decay": NaN}}'))
    add("json", "train iterations 1e400 (infinite)")(lambda t: post_json(t, train, '{"iterations": 1e400}'))
    add("json", "train iterations: a 5000-digit integer")(lambda t: post_json(t, train, '{"iterations": 1' + "0" * 5000 + "}"))
    for name, text in (("a JSON null body", "null"), ("a JSON array body", "[]"), ("a JSON string body", '"x"'),
                       ("a JSON number body", "1"), ("truncated JSON", '{"iterations": '), ("bare NaN", "NaN"),
                       ("JSON with trailing garbage", "{} x"), ("duplicate keys, the last one wrong",
                                                                '{"iterations": 5, "iterations": "x"}'),
                       ("100000-deep nesting", "[" * 100_000 + "]" * 100_000),
                       ("invalid UTF-8", b'{"method": "\xff\xfe"}'), ("UTF-16 JSON", '{"iterations": 5x}'.encode("utf-16")),
                       ("a 600 KB string value", json.dumps({"method": "b" * 600_000}))):
        add("json", f"train: {name}")(lambda t, s=text: post_json(t, train, s))
    add("json", "train: JSON sent as text/plain")(lambda t: http(t, "POST", train, b'{"iterations": "x"}',
                                                                 {"Content-Type": "text/plain"}))

    # -- JSON bodies: inference options ---------------------------------------------------------------------------
    infer = f"{API}/cases/{t.cases['inferred']}/infer"
    for text in ('{"threshold": NaN}', '{"threshold": Infinity}', '{"threshold": 1.0}', '{"threshold": -0.1}',
                 '{"threshold": "0.5"}', '{"passes": 0}', '{"passes": 65}', '{"passes": 4.5}', '{"passes": true}',
                 '{"passes": 100000000000000000000}', '{"min_voxels": 0}', '{"min_voxels": 1' + "0" * 30 + "}",
                 '{"max_regions": 0}', '{"max_regions": 1001}', '{"uncertainty": "variance"}', '{"bogus": 1}', "[]"):
        add("json", f"infer {text[:60]}")(lambda t, s=text: post_json(t, infer, s))
    add("json", "infer an unknown case")(lambda t: post_json(t, f"{API}/cases/no-such-case/infer", "{}"))
    add("json", "infer a case id with a path in it")(lambda t: post_json(t, f"{API}/cases/..%2F..%2Fetc/infer", "{}"))

    # -- JSON bodies: exclusions ----------------------------------------------------------------------------------
    excl = f"{API}/exclusions"
    for body in ({"case_id": test_case}, {"case_id": test_case, "reason": ""}, {"case_id": test_case, "reason": "   "},
                 {"case_id": test_case, "reason": "r" * 2000}, {"case_id": test_case, "reason": "x", "revision": 0},
                 {"case_id": test_case, "reason": "x", "revision": 2**70},
                 {"case_id": test_case, "reason": "x", "revision": "__other_case_revision__"},
                 {"case_id": "../x", "reason": "x"}, {"case_id": "no-such-case", "reason": "x"},
                 {"case_id": test_case, "reason": "x", "author": "a b"}, {"case_id": test_case, "reason": "x", "extra": 1},
                 {"case_id": test_case, "reason": 5}, {"case_id": 5, "reason": "x"}):
        text = json.dumps(body)
        add("json", f"exclude {text[:70]}")(
            lambda t, s=text: post_json(t, excl, s.replace('"__other_case_revision__"', str(t.cases["other_revision"]))))
    for path, text in ((f"{excl}/999999/lift", '{"reason": "x"}'), (f"{excl}/{2**70}/lift", '{"reason": "x"}'),
                       (f"{excl}/abc/lift", '{"reason": "x"}'), (f"{excl}/1/lift", "{}")):
        add("json", f"lift {path.replace(excl, '')} {text}")(lambda t, p=path, s=text: post_json(t, p, s))

    # -- other routes' parameters ---------------------------------------------------------------------------------
    for name, method, path in (
            ("revision 2**70 of a label file", "GET", f"{labels}/{2**70}/label"),
            ("revision -1 of a label file", "GET", f"{labels}/-1/label"),
            ("a label file name that is not one", "GET", f"{labels}/1/..%2F..%2Ftoken"),
            ("an inference id that is a path", "GET", f"{API}/cases/{test_case}/inference/..%2F..%2F..%2F.sslsegment/label"),
            ("a forged region view", "GET", f"{API}/cases/{t.cases['inferred']}/inference/{t.inference_id}/regions/"
                                            "..%2F..%2F..%2F.sslsegment%2Ftoken"),
            ("a model version that is a path", "GET", f"{API}/models/..%2F..%2F.sslsegment%2Ftoken/weights"),
            ("an unknown model version", "POST", f"{API}/models/v9999/promote"),
            ("a job id that is not one", "GET", f"{API}/train/..%2F..%2Fx"),
            ("an unknown job status filter", "GET", f"{API}/train?status=bogus"),
            ("an unknown split", "GET", f"{API}/cases?split=bogus"),
            ("an unknown review strategy", "GET", f"{API}/cases/next?strategy=alphabetical"),
            ("an annotator name that is a path", "GET", f"{API}/cases/next?annotator=..%2F..%2Fx"),
            ("releasing a lease for an annotator name that is a path", "DELETE",
             f"{API}/cases/{test_case}/lease?annotator=..%2F..%2Fx"),
            ("an unknown case's image", "GET", f"{API}/cases/no-such-case/image"),
            ("a 200-character case id", "GET", f"{API}/cases/{'c' * 200}"),
            ("a method the route does not have", "PUT", f"{API}/cases"),
            ("a route that does not exist", "GET", f"{API}/admin")):
        add("json", name)(lambda t, m=method, p=path: http(t, m, p))

    # -- image uploads --------------------------------------------------------------------------------------------
    cases_path = f"{API}/cases"
    rng = np.random.default_rng(7)
    img = rng.random((8, 12, 12), dtype=np.float32)

    def upload(data, filename: str = "x.nrrd", case_id: str | None = "attack-upload", field_name="image"):
        """data: bytes, or a function making them when the request is sent (the bombs take a second to build)."""
        fields = {"case_id": case_id} if case_id is not None else {}
        return lambda t: post_form(t, cases_path, fields, {field_name: (filename, data() if callable(data) else data)})

    def with_value(value):
        a = img.copy()
        a[3, 4, 5] = value
        return volume_bytes(a)

    raw_img = np.zeros((8, 12, 12), np.uint8).tobytes()
    uploads = [
        ("random bytes named .nrrd", upload(os.urandom(4000))),
        ("an empty file", upload(b"")),
        ("a .png", upload(good_image, "x.png")),
        ("no file name", upload(good_image, "")),
        ("the image as a text field", lambda t: post_form(t, cases_path, {"image": "not a file", "case_id": "x1"})),
        ("no image field", lambda t: post_form(t, cases_path, {"case_id": "x2"})),
        ("a 2D image", upload(nrrd((12, 12), np.zeros(144, np.uint8).tobytes(), dimension=2))),
        ("a 4D image", upload(nrrd((4, 4, 4, 4), np.zeros(256, np.uint8).tobytes(), dimension=4))),
        ("three components per voxel", upload(vector_image_bytes)),
        ("a NaN voxel", upload(with_value(np.nan))),
        ("an infinite voxel", upload(with_value(np.inf))),
        ("a -infinite voxel", upload(with_value(-np.inf))),
        ("NaN spacing in the header", upload(nrrd((12, 12, 8), raw_img, spacings=(float("nan"), 1.0, 1.0)))),
        ("zero spacing", upload(nrrd((12, 12, 8), raw_img, spacings=(0.0, 1.0, 1.0)))),
        ("1000 mm spacing", upload(nrrd((12, 12, 8), raw_img, spacings=(1000.0, 1.0, 1.0)))),
        ("a sheared direction", upload(nrrd((12, 12, 8), raw_img, directions=[[1, 0, 0], [1, 1, 0], [0, 0, 1]]))),
        ("a NaN origin", upload(nrrd((12, 12, 8), raw_img, origin=(float("nan"), 0.0, 0.0)))),
        ("one voxel thick", upload(nrrd((12, 12, 1), np.zeros(144, np.uint8).tobytes()))),
        ("a 1 KB header claiming 1500^3 voxels", upload(nrrd((1500, 1500, 1500), b"\0" * 900))),
        ("a 1 KB header claiming 800^3 voxels (under the voxel cap)", upload(nrrd((800, 800, 800), b"\0" * 900))),
        ("gzip NRRD bomb: 260 KB expanding to 256 MB", upload(lambda: nrrd((512, 512, 256), zeros_gzip(256 * 2**20),
                                                                           kind="float", encoding="gzip"))),
        (".nii.gz bomb: expanding to 256 MB", upload(nifti_gz_bomb, "x.nii.gz")),
        ("a truncated gzip NRRD", upload(volume_bytes(img)[:-200])),
        ("an NRRD whose data file is the datastore's token",
         lambda t: post_form(t, cases_path, {"case_id": "detached"}, {"image": ("x.nrrd", nrrd(
             (2, 2, 11), b"", extra=f"data file: {t.root / '.sslsegment' / 'token'}\n"))})),
        ("an NRRD whose data file is /dev/zero", upload(nrrd((64, 64, 64), b"", extra="data file: /dev/zero\n"))),
        ("an MHA whose data file is the datastore's token", lambda t: post_form(
            t, cases_path, {"case_id": "detachedmha"}, {"image": ("x.mha", (
                "ObjectType = Image\nNDims = 3\nDimSize = 2 2 11\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"
                f"ElementDataFile = {t.root / '.sslsegment' / 'token'}\n").encode())})),
        ("a case id with a path in it", upload(good_image, case_id="../../x")),
        ("a 200-character case id", upload(good_image, case_id="c" * 200)),
        ("a case id with '@'", upload(good_image, case_id="a@2")),
        ("a taken case id with another image", upload(good_image, case_id=test_case)),
    ]
    for name, fn in uploads:
        add("upload", name)(fn)

    # -- labels and reviewed masks --------------------------------------------------------------------------------
    def label_with(array, kind="final", mask_bytes=None, fields=None, geometry_=None, filename="l.nrrd"):
        data = volume_bytes(array, geometry_ or geometry)
        files = {"label": (filename, data)}
        if mask_bytes is not None:
            files["reviewed_mask"] = ("m.nrrd", mask_bytes)
        return lambda t: post_form(t, labels, {"kind": kind, **(fields or {})}, files)

    def valued(dtype, value):
        a = np.zeros(grid.shape, dtype)
        a[2:6, 4:10, 4:10] = value
        return a

    from SSLSegmentLib.data.volume import Geometry

    g = geometry
    shifted = Geometry(g.spacing, tuple(o + 5.0 for o in g.origin), g.direction)
    respaced = Geometry(tuple(s * 2 for s in g.spacing), g.origin, g.direction)
    turned = Geometry(g.spacing, g.origin, (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    zero = np.zeros(grid.shape, np.uint8)

    def mask_with(dtype, value, where=slice(0, 4)):
        a = np.zeros(grid.shape, dtype)
        a[where] = value
        return volume_bytes(a, geometry)

    big_label = lambda: nrrd((400, 400, 400), zeros_gzip(400**3), encoding="gzip")  # noqa: E731
    label_attacks = [
        ("uint16 label value 256 (would wrap to 0)", label_with(valued(np.uint16, 256))),
        ("uint16 label value 257 (would wrap to 1)", label_with(valued(np.uint16, 257))),
        ("int16 label value -1", label_with(valued(np.int16, -1))),
        ("float64 label value 1e10", label_with(valued(np.float64, 1e10))),
        ("float32 label value 0.5", label_with(valued(np.float32, 0.5))),
        ("float32 label value NaN", label_with(valued(np.float32, np.nan))),
        ("int32 label value 65537", label_with(valued(np.int32, 2**16 + 1))),
        ("label value 2 (two classes)", label_with(valued(np.uint8, 2))),
        ("a label of another size", lambda t: post_form(t, labels, {"kind": "final"}, {"label": (
            "l.nrrd", volume_bytes(np.zeros((grid.shape[0], grid.shape[1], grid.shape[2] + 1), np.uint8), geometry))})),
        ("a label with another origin", label_with(zero, geometry_=shifted)),
        ("a label with another spacing", label_with(zero, geometry_=respaced)),
        ("a label with another direction", label_with(zero, geometry_=turned)),
        ("a 2D label", lambda t: post_form(t, labels, {"kind": "final"}, {"label": (
            "l.nrrd", nrrd(grid.shape[:0:-1], np.zeros(grid.shape[1] * grid.shape[2], np.uint8).tobytes(), dimension=2))})),
        ("a label header claiming more voxels than its case", lambda t: post_form(t, labels, {"kind": "final"}, {
            "label": ("l.nrrd", big_label())})),
        ("a label whose data file is the datastore's token", lambda t: post_form(t, labels, {"kind": "final"}, {
            "label": ("l.nrrd", nrrd(grid.shape[::-1], b"", extra=f"data file: {t.root / '.sslsegment' / 'token'}\n"))})),
        ("a label that is not an image", lambda t: post_form(t, labels, {"kind": "final"}, {"label": ("l.nrrd", b"x" * 99)})),
        ("a label named .png", label_with(zero, filename="l.png")),
        ("no label field", lambda t: post_form(t, labels, {"kind": "final"})),
        ("a correction without a reviewed mask", label_with(zero, "correction")),
        ("reviewed mask value 2", label_with(zero, "correction", mask_with(np.uint8, 2))),
        ("uint16 reviewed mask value 257 (would wrap to 1)", label_with(zero, "correction", mask_with(np.uint16, 257))),
        ("float reviewed mask value 1e10", label_with(zero, "correction", mask_with(np.float64, 1e10))),
        ("float reviewed mask value NaN", label_with(zero, "correction", mask_with(np.float32, np.nan))),
        ("an empty reviewed mask", label_with(zero, "correction", mask_with(np.uint8, 0))),
        ("a reviewed mask of another size", label_with(zero, "correction", volume_bytes(
            np.ones((grid.shape[0] + 1,) + grid.shape[1:], np.uint8), geometry))),
        ("a final label with a reviewed mask", label_with(zero, "final", good_mask)),
        ("kind 'original' (import only)", label_with(zero, "original")),
        ("kind 'bogus'", label_with(zero, "bogus")),
        ("threshold 1.0", label_with(zero, "correction", good_mask, {"threshold": "1.0"})),
        ("threshold NaN", label_with(zero, "correction", good_mask, {"threshold": "nan"})),
        ("threshold -1", label_with(zero, "correction", good_mask, {"threshold": "-1"})),
        ("threshold 'high'", label_with(zero, "correction", good_mask, {"threshold": "high"})),
        ("uncertainty_kind 'variance'", label_with(zero, "correction", good_mask, {"uncertainty_kind": "variance"})),
        ("an author name that is a path", label_with(zero, fields={"author": "../../x"})),
        ("a 300-character author name", label_with(zero, fields={"author": "a" * 300})),
        ("model_version v9999, which does not exist", label_with(zero, "correction", good_mask, {"model_version": "v9999"})),
        ("model_version that is a path", label_with(zero, fields={"model_version": "../../x"})),
        ("model_version 'latest'", label_with(zero, fields={"model_version": "latest"})),
        ("inference_id that is not one", label_with(zero, "correction", good_mask, {"inference_id": "../x"})),
        ("inference_id of another case", lambda t: label_with(zero, "correction", good_mask,
                                                              {"inference_id": t.inference_id})(t)),
        ("submission_id too short", label_with(zero, fields={"submission_id": "abc"})),
        ("submission_id with a slash", label_with(zero, fields={"submission_id": "abcdefgh/../x"})),
        ("submission_id already used for another case", lambda t: label_with(
            zero, fields={"submission_id": t.cases["other_submission"]})(t)),
        ("a label for an unknown case", lambda t: post_form(t, f"{API}/cases/no-such-case/labels", {"kind": "final"},
                                                            {"label": ("l.nrrd", good_label)})),
        ("a label for a case id with a path in it", lambda t: post_form(t, f"{API}/cases/..%2F..%2Fx/labels",
                                                                        {"kind": "final"}, {"label": ("l.nrrd", good_label)})),
    ]
    for name, fn in label_attacks:
        add("labels", name)(fn)

    # -- body framing (hand-made requests on a socket) ------------------------------------------------------------
    big = b"x" * (3 * 2**20)
    big_form, big_ctype = multipart({"case_id": "big"}, {"image": ("big.nrrd", big)})

    def head(t, path=cases_path, extra="", ctype_=None, method="POST"):
        ct = f"Content-Type: {ctype_ or ctype}\r\n" if ctype_ != "" else ""
        return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t.token}\r\n{ct}{extra}"
                "Connection: close\r\n\r\n").encode()

    def chunked(data: bytes, step=64 * 2**10) -> bytes:
        return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + step]), data[i:i + step])
                        for i in range(0, len(data), step)) + b"0\r\n\r\n"

    zipped = gzip.compress(b'{"iterations": 0}')
    framing = [
        ("3 MB body announced by Content-Length (limit 1 MB)",
         lambda t: raw(t, [head(t, extra=f"Content-Length: {len(big_form)}\r\n", ctype_=big_ctype), 0.2, big_form])),
        ("3 MB body streamed chunked", lambda t: raw(t, [head(t, extra="Transfer-Encoding: chunked\r\n", ctype_=big_ctype),
                                                         0.2, chunked(big_form)])),
        ("Expect: 100-continue with 3 MB announced", lambda t: raw(t, [
            head(t, extra=f"Expect: 100-continue\r\nContent-Length: {len(big_form)}\r\n", ctype_=big_ctype)])),
        ("a body that stops arriving (Content-Length 5000, 100 bytes sent)",
         lambda t: raw(t, [head(t, extra="Content-Length: 5000\r\n"), form[:100]], timeout=BODY_TIMEOUT_S * 10)),
        ("a chunked body that stops arriving", lambda t: raw(t, [head(t, extra="Transfer-Encoding: chunked\r\n"),
                                                                 b"64\r\n" + form[:100] + b"\r\n"],
                                                             timeout=BODY_TIMEOUT_S * 10)),
        ("a slow drip: 8 bytes half a second apart, then nothing", lambda t: raw(t, [head(t, extra="Content-Length: 5000\r\n")]
                                                         + [p for b in form[:8] for p in (bytes([b]), 0.5)],
                                                         timeout=BODY_TIMEOUT_S * 10)),
        ("Content-Length that is not a number", lambda t: raw(t, [head(t, extra="Content-Length: abc\r\n"), form])),
        ("a negative Content-Length", lambda t: raw(t, [head(t, extra="Content-Length: -5\r\n"), form])),
        ("both Content-Length and Transfer-Encoding", lambda t: raw(t, [head(
            t, extra=f"Content-Length: {len(form)}\r\nTransfer-Encoding: chunked\r\n"), chunked(form)])),
        ("a chunk size that is not hex", lambda t: raw(t, [head(t, extra="Transfer-Encoding: chunked\r\n"),
                                                           b"zz\r\n" + form + b"\r\n0\r\n\r\n"])),
        ("Content-Length shorter than the body (truncated multipart)", lambda t: raw(t, [
            head(t, extra=f"Content-Length: {len(form) // 2}\r\n"), form])),
        ("multipart without a boundary", lambda t: raw(t, [head(t, extra=f"Content-Length: {len(form)}\r\n",
                                                                ctype_="multipart/form-data"), form])),
        ("multipart with another boundary than announced", lambda t: raw(t, [head(
            t, extra=f"Content-Length: {len(form)}\r\n", ctype_="multipart/form-data; boundary=other"), form])),
        ("multipart never closed", lambda t: raw(t, [head(t, extra=f"Content-Length: {len(form) - 30}\r\n"),
                                                    form[:-30]])),
        ("1100 form fields", lambda t: (lambda b: raw(t, [head(t, extra=f"Content-Length: {len(b[0])}\r\n", ctype_=b[1]),
                                                         b[0]]))(multipart({f"f{i}": "v" for i in range(1100)}))),
        ("1100 files", lambda t: (lambda b: raw(t, [head(t, extra=f"Content-Length: {len(b[0])}\r\n", ctype_=b[1]),
                                                   b[0]]))(multipart(files={f"f{i}": (f"{i}.nrrd", b"x") for i in range(1100)}))),
        ("a 100 KB header line", lambda t: raw(t, [head(t, extra="X-Pad: " + "p" * 100_000 + "\r\nContent-Length: 0\r\n")])),
        ("a 20 KB URL", lambda t: raw(t, [head(t, path=f"{API}/cases/" + "c" * 20_000, method="GET", ctype_="")])),
        ("a request line that is not HTTP", lambda t: raw(t, [b"GARBAGE\r\n\r\n"])),
        ("an unknown method", lambda t: raw(t, [head(t, path=f"{API}/info", method="BREW", ctype_="")])),
        ("a NUL byte in the path", lambda t: raw(t, [head(t, path=f"{API}/cases/a%00b", method="GET", ctype_="")])),
        ("an encoded '..' path", lambda t: raw(t, [head(t, path=f"{API}/cases/%2e%2e%2f%2e%2e%2f.sslsegment%2ftoken/image",
                                                          method="GET", ctype_="")])),
        ("HTTP/1.0 without Host or token", lambda t: raw(t, [f"GET {API}/info HTTP/1.0\r\n\r\n".encode()])),
        ("a JSON body with Content-Encoding: gzip", lambda t: raw(t, [
            head(t, path=train, ctype_="application/json",
                 extra=f"Content-Encoding: gzip\r\nContent-Length: {len(zipped)}\r\n"), zipped])),
    ]
    for name, fn in framing:
        add("framing", name)(fn)
    return table


def classify(a: Answer) -> str:
    if a.status is None:
        return "no answer"
    if a.status == 507 or 400 <= a.status < 500:
        return "refused" if a.message else "refused without a message"
    if a.status >= 500:
        return "5xx"
    return "accepted"


def storage_state(t: Target) -> dict:
    """What a refused request must not change: the ids of cases, revisions, jobs, exclusions, models, inferences."""
    store = t.store()
    db = store.db
    state = {name: sorted(str(r[0]) for r in db.execute(q)) for name, q in (
        ("cases", "SELECT case_id FROM cases"), ("revisions", "SELECT revision FROM labels"),
        ("jobs", "SELECT job_id FROM jobs"), ("exclusions", "SELECT id FROM exclusions"),
        ("models", "SELECT version FROM models"))}
    state["current"] = store.get_meta(db, "current_model")
    state["files"] = sorted(str(p.relative_to(t.root)) for p in t.root.rglob("*")
                            if p.is_file() and ".sslsegment" not in p.parts and "inference" not in p.parts
                            and "jobs" not in p.parts)
    store.close()
    return state


def leftovers(t: Target) -> dict:
    """Files the index does not know: staging folders, unindexed label or model files, spooled uploads; and missing
    indexed files. Empty lists everywhere when the datastore is clean."""
    store = t.store()
    report = store.check()
    store.close()
    return {k: report[k] for k in ("staging", "unindexed", "uploads", "missing")} | {"integrity": report["integrity"]}


def clean(report: dict) -> bool:
    return report["integrity"] == "ok" and not any(report[k] for k in ("staging", "unindexed", "uploads", "missing"))


def run_malformed(t: Target, every_nth: int = 1, log=print) -> dict:
    table = attack_table(t)
    chosen = table[::every_nth] if every_nth > 1 else table
    if every_nth > 1:  # at least one of each category
        for cat in dict.fromkeys(a.category for a in table):
            if not any(a.category == cat for a in chosen):
                chosen.append(next(a for a in table if a.category == cat))
    before = storage_state(t)
    rows, holding_token = [], 0
    t0 = time.perf_counter()
    for a in chosen:
        started = time.perf_counter()
        ans = a.send(t)
        holding_token += t.token.encode() in ans.body
        outcome = classify(ans)
        rows.append({"category": a.category, "name": a.name, "status": ans.status, "outcome": outcome,
                     "message": scrub(ans.message or ans.error or (ans.body[:200].decode("utf-8", "replace")
                                                                   if ans.body else None), t.token),
                     "seconds": round(time.perf_counter() - started, 3)})
        if outcome != "refused":
            log(f"  {a.category}: {a.name}: {ans.status} {outcome} {rows[-1]['message']}")
    elapsed = time.perf_counter() - t0
    after = storage_state(t)
    stored = {k: sorted(set(after[k]) - set(before[k])) for k in ("cases", "revisions", "jobs", "exclusions", "models",
                                                                   "files")}
    stored["current changed"] = [after["current"]] if after["current"] != before["current"] else []
    report = leftovers(t)
    by_cat: dict = {}
    for r in rows:
        c = by_cat.setdefault(r["category"], {"tried": 0, "refused": 0, "accepted": 0, "5xx": 0, "no answer": 0,
                                              "refused without a message": 0})
        c["tried"] += 1
        c[r["outcome"]] += 1
    return {"rows": rows, "by_category": by_cat, "seconds": round(elapsed, 2),
            "tried": len(rows), "refused": sum(r["outcome"] == "refused" for r in rows),
            "accepted": sum(r["outcome"] == "accepted" for r in rows), "5xx": sum(r["outcome"] == "5xx" for r in rows),
            "no answer": sum(r["outcome"] == "no answer" for r in rows),
            "refused without a message": sum(r["outcome"] == "refused without a message" for r in rows),
            "reached storage": {k: v for k, v in stored.items() if v}, "datastore check": report,
            "answers holding the token": holding_token,
            "clean": clean(report) and not any(stored.values())}


def scrub(text, token: str):
    """No token in the results, whatever an answer held."""
    if text is None:
        return None
    return str(text).replace(token, "<the token>")


# -- races ------------------------------------------------------------------------------------------------------
def _threads(fn, n: int) -> list:
    out = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    return out


def run_races(t: Target) -> list[dict]:
    """The same thing sent from several threads at once: one of it is stored, the others are told so."""
    rows = []
    a, b = t.cases["test"], t.cases["test2"]
    grid = t.grids[a]
    label = volume_bytes(np.zeros(grid.shape, np.uint8), grid.geometry)
    mask = np.zeros(grid.shape, np.uint8)
    mask[:3] = 1
    mask = volume_bytes(mask, grid.geometry)

    sid = "race" + os.urandom(8).hex()
    answers = _threads(lambda i: post_form(t, f"{API}/cases/{a if i % 2 == 0 else b}/labels",
                                           {"kind": "correction", "submission_id": sid, "author": "racer"},
                                           {"label": ("l.nrrd", label), "reviewed_mask": ("m.nrrd", mask)}), 8)
    store = t.store()
    stored = store.db.execute("SELECT case_id FROM labels WHERE submission_id = ?", (sid,)).fetchall()
    statuses = sorted(x.status or 0 for x in answers)
    winner = stored[0][0] if len(stored) == 1 else None
    rows.append({"name": "one submission id sent 8 times at once, for two cases", "statuses": statuses,
                 "expected": "one revision; 201 once, 200 for the same case, 409 for the other",
                 "held": len(stored) == 1 and statuses.count(201) == 1 and all(
                     (x.status in (200, 201)) == ((a if i % 2 == 0 else b) == winner) and x.status in (200, 201, 409)
                     for i, x in enumerate(answers))})

    image = volume_bytes(np.random.default_rng(99).random((8, 12, 12), dtype=np.float32))
    answers = _threads(lambda i: post_form(t, f"{API}/cases", {}, {"image": ("same.nrrd", image)}), 8)
    ids = {(x.json() or {}).get("case_id") for x in answers}
    cid = next(iter(ids)) if len(ids) == 1 else None
    files = list(t.root.glob(f"{cid}.*")) if cid else []
    rows.append({"name": "one image uploaded 8 times at once (content-derived id)",
                 "statuses": sorted(x.status or 0 for x in answers),
                 "expected": "one case and one file; 201 once, 200 for the others",
                 "held": cid is not None and len(files) == 1 and sorted(x.status for x in answers) == [200] * 7 + [201]})

    images = [volume_bytes(np.random.default_rng(200 + i).random((8, 12, 12), dtype=np.float32)) for i in range(8)]
    answers = _threads(lambda i: post_form(t, f"{API}/cases", {"case_id": "race-case"},
                                           {"image": ("i.nrrd", images[i])}), 8)
    statuses = sorted(x.status or 0 for x in answers)
    rows.append({"name": "one case id with 8 different images at once", "statuses": statuses,
                 "expected": "one case and one file; 201 once, 409 for the others",
                 "held": statuses == [201] + [409] * 7 and len(list(t.root.glob("race-case.*"))) == 1})

    answers = _threads(lambda i: http(t, "GET", f"{API}/cases/next?annotator=racer{i}&split=train&strategy=random"), 4)
    leased = [(x.json() or {}).get("case_id") for x in answers if x.status == 200]
    rows.append({"name": "4 annotators ask for the next case at once", "statuses": sorted(x.status or 0 for x in answers),
                 "expected": "no case leased to two of them", "held": len(leased) == len(set(leased))
                 and all(x.status in (200, 204) for x in answers)})
    for i, x in enumerate(answers):
        if x.status == 200:
            http(t, "DELETE", f"{API}/cases/{x.json()['case_id']}/lease?annotator=racer{i}")

    versions = [r[0] for r in store.db.execute("SELECT version FROM models WHERE promoted = 1 ORDER BY version")]
    current = store.get_meta(store.db, "current_model")
    answers = _threads(lambda i: http(t, "POST", f"{API}/models/{versions[i % len(versions)]}/promote"), 6)
    s2 = t.store()
    now = s2.get_meta(s2.db, "current_model")
    last = s2.db.execute("SELECT version FROM promotions ORDER BY id DESC LIMIT 1").fetchone()[0]
    rows.append({"name": f"{len(versions)} promoted versions promoted by 6 clients at once",
                 "statuses": sorted(x.status or 0 for x in answers),
                 "expected": "every call answered 200; current is the last promotion recorded",
                 "held": all(x.status == 200 for x in answers) and now == last})
    http(t, "POST", f"{API}/models/{current}/promote")

    job = http(t, "POST", f"{API}/train", b'{"iterations": 8}', {"Content-Type": "application/json"}).json()
    answers = _threads(lambda i: http(t, "DELETE", f"{API}/train/{job['job_id']}"), 6)
    ended = _wait_job(t, job["job_id"])
    rows.append({"name": "one job cancelled by 6 clients at once", "statuses": sorted(x.status or 0 for x in answers),
                 "expected": "every call answered 200; the job ends cancelled (succeeded, had it finished first), "
                             "never failed",
                 "final_status": ended["status"],
                 "held": all(x.status == 200 for x in answers) and ended["status"] in ("cancelled", "succeeded")})
    store.close()
    return rows


# -- consistency after a fault ----------------------------------------------------------------------------------
def consistency(t: Target) -> dict:
    """What must hold after any fault: the server answers, the current model is a promoted version whose checkpoint
    matches its digest and loads, made by a job that succeeded with it (or promoted by hand), every version's file
    is intact, no job is left queued or running, and the datastore holds no file its index does not know."""
    from SSLSegmentLib.ml.checkpoint import load_checkpoint
    from training.datastore import sha256_file

    checks = {}
    checks["server answers"] = http(t, "GET", f"{API}/health", token=None).status == 200 and \
        http(t, "GET", f"{API}/info").status == 200
    store = t.store()
    db = store.db
    current = store.get_meta(db, "current_model")
    rows = {r["version"]: r for r in db.execute("SELECT * FROM models")}
    ok = current in rows and bool(rows[current]["promoted"])
    if ok:
        path = store.abs(rows[current]["path"])
        ok = path.is_file() and sha256_file(path) == rows[current]["sha256"]
        try:
            load_checkpoint(path)
        except Exception:
            ok = False
        job_id = rows[current]["job_id"]
        if job_id:
            job = store.job(job_id)
            ok = ok and job["status"] == "succeeded" and (job["result"] or {}).get("model_version") == current
    checks["current model valid"] = ok
    checks["every version intact"] = all(store.abs(r["path"]).is_file() and sha256_file(store.abs(r["path"])) == r["sha256"]
                                         for r in rows.values())
    checks["no job left queued or running"] = not db.execute(
        "SELECT 1 FROM jobs WHERE status IN ('queued', 'running')").fetchone()
    report = leftovers(t)
    checks["no leaked file"] = clean(report)
    scratch = [str(p.relative_to(t.root)) for p in (t.root / "jobs").glob("*/train")]
    checks["no job scratch left"] = not scratch
    answer = http(t, "GET", f"{API}/models").json() or {}
    checks["server reports the index's current model"] = answer.get("current") == current
    store.close()
    return {"checks": checks, "current": current, "leftovers": {k: v for k, v in report.items() if v and k != "integrity"},
            "scratch": scratch}


def _wait(predicate, limit_s: float = 300.0, poll_s: float = 0.05):
    deadline = time.monotonic() + limit_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting")
        time.sleep(poll_s)


def _wait_job(t: Target, job_id: str, limit_s: float = 300.0) -> dict:
    def done():
        store = t.store()
        job = store.job(job_id)
        store.close()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None
    return _wait(done, limit_s, 0.1)


def _job_field(t: Target, job_id: str):
    store = t.store()
    job = store.job(job_id)
    store.close()
    return job


def _start_job(t: Target, **params) -> str:
    ans = post_json(t, f"{API}/train", json.dumps(params))
    if ans.status != 202:
        raise RuntimeError(f"training request refused: {ans.status} {ans.message}")
    return ans.json()["job_id"]


def _wait_healthy(t: Target, limit_s: float = 120.0) -> None:
    _wait(lambda: http(t, "GET", f"{API}/health", token=None, timeout=2).status == 200, limit_s, 0.1)


def _restart_server(t: Target, sig=signal.SIGKILL) -> None:
    t.backend.kill_server(sig)
    t.backend.restart_server()
    _wait_healthy(t)


def _models(t: Target) -> list[str]:
    store = t.store()
    out = [r[0] for r in store.db.execute("SELECT version FROM models ORDER BY version")]
    store.close()
    return out


def _flip_bytes(path: Path) -> bytes:
    """Corrupt a file in place (bytes in its middle inverted); returns the original content."""
    data = path.read_bytes()
    mid = len(data) // 2
    path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:])
    return data


# -- the faults -------------------------------------------------------------------------------------------------
def fault_worker_killed_training(t: Target) -> dict:
    before = _models(t)
    job_id = _start_job(t, iterations=100_000, val_interval=100_000)
    _wait(lambda: (_job_field(t, job_id).get("progress") or {}).get("step", 0) >= 2)
    t.backend.kill_worker()
    t.backend.start_worker()
    _wait(lambda: (j := _job_field(t, job_id))["attempts"] == 2 and j["status"] == "running")
    http(t, "DELETE", f"{API}/train/{job_id}")
    job = _wait_job(t, job_id)
    return {"observed": f"re-queued and run again (attempt {job['attempts']}), then cancelled: {job['status']}",
            "extra": {"job ended cancelled": job["status"] == "cancelled", "no new version": _models(t) == before}}


def fault_worker_killed_publishing(t: Target) -> dict:
    before = _models(t)
    job_id = _start_job(t, tolerance=1.0)
    phase = _wait(lambda: (p := (_job_field(t, job_id).get("progress") or {}).get("phase")) in (
        "validating", "publishing", "scoring") and p, poll_s=0.005)
    t.backend.kill_worker()
    t.backend.start_worker()
    job = _wait_job(t, job_id)
    after = _models(t)
    return {"observed": f"killed while {phase}; the job then {job['status']} (attempt {job['attempts']}), "
                        f"{len(after) - len(before)} new version(s)",
            "extra": {"job succeeded": job["status"] == "succeeded",
                      "its version is current": job["status"] == "succeeded" and t.store().get_meta(
                          t.store().db, "current_model") == job["result"]["model_version"]}}


def fault_server_killed_job_running(t: Target) -> dict:
    job_id = _start_job(t, iterations=60, val_interval=60, tolerance=1.0)
    _wait(lambda: _job_field(t, job_id)["status"] == "running")
    t.backend.kill_server()
    job = _wait_job(t, job_id)
    t.backend.restart_server()
    _wait_healthy(t)
    version = job["result"]["model_version"] if job["result"] else None
    ans = post_json(t, f"{API}/cases/{t.cases['inferred']}/infer", '{"passes": 2}')
    return {"observed": f"the job went on without the server: {job['status']}; after the restart inference used "
                        f"{(ans.json() or {}).get('model_version')}",
            "extra": {"job succeeded": job["status"] == "succeeded",
                      "inference uses the new version": (ans.json() or {}).get("model_version") == version}}


def fault_server_killed_mid_upload(t: Target) -> dict:
    """Uploads and corrections in flight from three clients when the server is killed; every acknowledged one must
    be stored after the restart, and nothing half-written left."""
    grid = t.grids[t.cases["test"]]
    acked, stop = [], threading.Event()
    lock = threading.Lock()

    def client(k):
        i = 0
        while not stop.is_set():
            i += 1
            if k == 0:
                data = volume_bytes(np.random.default_rng(1000 + i).random((12, 16, 16), dtype=np.float32))
                ans = post_form(t, f"{API}/cases", {"case_id": f"crash-{k}-{i}"}, {"image": ("i.nrrd", data)}, timeout=10)
                what = ("case", f"crash-{k}-{i}")
            else:
                lab = np.random.default_rng(k * 10_000 + i).integers(0, 2, grid.shape).astype(np.uint8)
                mask = np.zeros(grid.shape, np.uint8)
                mask[: 1 + i % grid.shape[0]] = 1
                sid = f"crash{k}x{i}x{os.urandom(4).hex()}"
                ans = post_form(t, f"{API}/cases/{t.cases['test']}/labels",
                                {"kind": "correction", "submission_id": sid, "author": f"crash{k}"},
                                {"label": ("l.nrrd", volume_bytes(lab, grid.geometry)),
                                 "reviewed_mask": ("m.nrrd", volume_bytes(mask, grid.geometry))}, timeout=10)
                what = ("revision", sid)
            if ans.status in (200, 201):
                with lock:
                    acked.append(what)
            elif ans.status is None:
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    [th.start() for th in threads]
    time.sleep(0.5 + random.random())
    t.backend.kill_server()
    time.sleep(0.3)
    stop.set()
    [th.join() for th in threads]
    t.backend.restart_server()
    _wait_healthy(t)
    store = t.store()
    missing = [w for w in acked if (w[0] == "case" and not store.db.execute(
        "SELECT 1 FROM cases WHERE case_id = ?", (w[1],)).fetchone()) or (w[0] == "revision" and not store.db.execute(
            "SELECT 1 FROM labels WHERE submission_id = ?", (w[1],)).fetchone())]
    store.close()
    return {"observed": f"{len(acked)} acknowledged before the kill, {len(missing)} of them missing after it",
            "extra": {"every acknowledged write stored": not missing}}


def fault_scoring_fails(t: Target) -> dict:
    store = t.store()
    unreviewed = store.unreviewed("train")
    victim = unreviewed[0]
    image = t.root / store.case(victim)["image"]
    store.close()
    original = image.read_bytes()
    job_id = _start_job(t, iterations=60, val_interval=60, tolerance=1.0)
    try:
        _wait(lambda: (_job_field(t, job_id).get("progress") or {}).get("phase") == "training", poll_s=0.01)
        image.write_bytes(original[: len(original) // 3])  # unreadable when the scoring pass comes to it
        job = _wait_job(t, job_id)
    finally:
        image.write_bytes(original)
    r = job["result"] or {}
    errors = r.get("scoring_errors") or []
    return {"observed": f"job {job['status']}, promoted {r.get('promoted')}, scoring errors name "
                        f"{[e.split(':')[0] for e in errors]}",
            "extra": {"job succeeded and its version is current": job["status"] == "succeeded" and r.get("promoted")
                      and t.store().get_meta(t.store().db, "current_model") == r.get("model_version"),
                      "the unscorable case named": any(e.startswith(f"{victim}:") for e in errors)}}


def fault_corrupt_checkpoint_promoted(t: Target) -> dict:
    """A version's checkpoint damaged on disk (bytes flipped: it may still unpickle), then promoted by hand."""
    store = t.store()
    current = store.get_meta(store.db, "current_model")
    other = [r for r in store.db.execute("SELECT version, path FROM models WHERE version != ? ORDER BY version",
                                         (current,))]
    if not other:
        store.close()
        return {"observed": "skipped: only one version", "skipped": True, "extra": {}}
    version, rel = other[0]
    path = store.abs(rel)
    store.close()
    original = _flip_bytes(path)
    try:
        ans = http(t, "POST", f"{API}/models/{version}/promote")
        now = t.store().get_meta(t.store().db, "current_model")
    finally:
        path.write_bytes(original)
    if now != current:  # put back what the fault changed, so the next fault starts from a valid state
        http(t, "POST", f"{API}/models/{current}/promote")
    return {"observed": f"promoting the damaged {version}: {ans.status} {scrub(ans.message, t.token)}",
            "extra": {"promotion refused with a message": ans.status is not None and 400 <= ans.status < 600
                      and ans.message is not None, "current unchanged": now == current}}


def fault_corrupt_current_checkpoint(t: Target) -> dict:
    """The current version's checkpoint damaged on disk, found by a restarted server and by the next job."""
    store = t.store()
    current = store.get_meta(store.db, "current_model")
    path = store.abs(store.db.execute("SELECT path FROM models WHERE version = ?", (current,)).fetchone()[0])
    store.close()
    before = _models(t)
    original = _flip_bytes(path)
    try:
        _restart_server(t, signal.SIGTERM)  # a restart: the damaged file is what the server loads
        ans = post_json(t, f"{API}/cases/{t.cases['inferred']}/infer", '{"passes": 3}')
        train = post_json(t, f"{API}/train", "{}")  # fine-tuning from the damaged version
        job = _wait_job(t, train.json()["job_id"]) if train.status == 202 else None
    finally:
        path.write_bytes(original)
    after = post_json(t, f"{API}/cases/{t.cases['inferred']}/infer", '{"passes": 3}')
    trained = (f"the job {job['status']}: {(job['error'] or '')[:120]}" if job else
               f"training refused: {train.status} {scrub(train.message, t.token)}")
    return {"observed": f"inference: {ans.status} {scrub(ans.message, t.token)}; {trained}; restored: inference "
                        f"{after.status}",
            "extra": {"inference refused with a message": ans.status is not None and ans.status >= 400
                      and ans.message is not None,
                      "no training from it": (job is None and train.message is not None and train.status >= 400)
                      or (job is not None and job["status"] == "failed"),
                      "no new version": _models(t) == before,
                      "inference works once the file is restored": after.status == 200}}


def fault_nan_loss(t: Target) -> dict:
    before, current = _models(t), t.store().get_meta(t.store().db, "current_model")
    job = _wait_job(t, _start_job(t, iterations=20, val_interval=20, lr=1e8))
    return {"observed": f"job {job['status']}: {(job['error'] or '')[:120]}",
            "extra": {"job failed": job["status"] == "failed", "no new version": _models(t) == before,
                      "current unchanged": t.store().get_meta(t.store().db, "current_model") == current}}


def fault_cancel_running(t: Target) -> dict:
    before = _models(t)
    job_id = _start_job(t, iterations=100_000, val_interval=100_000)
    _wait(lambda: (_job_field(t, job_id).get("progress") or {}).get("step", 0) >= 1)
    http(t, "DELETE", f"{API}/train/{job_id}")
    job = _wait_job(t, job_id)
    return {"observed": f"job {job['status']}", "extra": {"job cancelled": job["status"] == "cancelled",
                                                          "no new version": _models(t) == before}}


def fault_rollback_during_job(t: Target) -> dict:
    store = t.store()
    current = store.get_meta(store.db, "current_model")
    older = [r[0] for r in store.db.execute("SELECT version FROM models WHERE promoted = 1 AND version != ? "
                                             "ORDER BY version", (current,))]
    store.close()
    if not older:
        return {"observed": "skipped: no older promoted version", "skipped": True, "extra": {}}
    job_id = _start_job(t, iterations=60, val_interval=60, tolerance=1.0)
    _wait(lambda: (_job_field(t, job_id).get("progress") or {}).get("phase") == "training", poll_s=0.01)
    manual = http(t, "POST", f"{API}/models/{older[-1]}/promote")
    job = _wait_job(t, job_id)
    now = t.store().get_meta(t.store().db, "current_model")
    http(t, "POST", f"{API}/models/{current}/promote")
    return {"observed": f"manual promotion of {older[-1]} during the job: {manual.status}; the job {job['status']}, "
                        f"promoted {(job['result'] or {}).get('promoted')}; current then {now}",
            "extra": {"the manual promotion stands": now == older[-1],
                      "the job did not promote over it": not (job["result"] or {}).get("promoted")}}


def _small_datastore(root: Path, data: Path) -> None:
    from training.datastore import Datastore, import_folder

    store = Datastore(root, create=True)
    import_folder(store, data, labels="train:1")
    store.close()


def _start_side_server(t: Target, root: Path, log_dir: Path, env: dict | None = None):
    from SSLSegmentLib.review.local_backend import LocalBackend

    side = LocalBackend(root, with_worker=False, log_dir=log_dir, env_overrides={"OMP_NUM_THREADS": "1", **(env or {})},
                        serve_args=["--log-level", "warning", "--max-upload-mb", str(UPLOAD_LIMIT_MB)])
    side.start().wait_until_ready()
    return side, Target(side, t.work, side.token)


def _side_attempts(s: Target, case: str, n: int, tag: str) -> tuple[list, list]:
    """n case uploads and n corrections against a side server; returns (answers, what each would store)."""
    store = s.store()
    grid = store.grid(case)
    store.close()
    answers, wants = [], []
    for i in range(n):
        data = volume_bytes(np.random.default_rng(zlib.crc32(f"{tag}{i}".encode())).random((12, 16, 16), dtype=np.float32))
        answers.append(post_form(s, f"{API}/cases", {"case_id": f"{tag}{i}"}, {"image": ("i.nrrd", data)}))
        wants.append(("case", f"{tag}{i}", data))
        lab = np.random.default_rng(i).integers(0, 2, grid.shape).astype(np.uint8)
        mask = np.ones(grid.shape, np.uint8)
        sid = f"{tag}sub{i}x{os.urandom(4).hex()}"
        form = ({"kind": "correction", "submission_id": sid},
                {"label": ("l.nrrd", volume_bytes(lab, grid.geometry)),
                 "reviewed_mask": ("m.nrrd", volume_bytes(mask, grid.geometry))})
        answers.append(post_form(s, f"{API}/cases/{case}/labels", *form))
        wants.append(("revision", sid, form))
    return answers, wants


def _stored(s: Target, want) -> bool:
    store = s.store()
    q = ("SELECT 1 FROM cases WHERE case_id = ?" if want[0] == "case" else "SELECT 1 FROM labels WHERE submission_id = ?")
    found = store.db.execute(q, (want[1],)).fetchone() is not None
    store.close()
    return found


def fault_disk_full(t: Target) -> dict:
    """A datastore on a small tmpfs filled to a few kilobytes of headroom: every write is stored whole (201) or
    refused with 507 and leaves nothing; with room again the same requests succeed."""
    mount = t.work / "tmpfs"
    mount.mkdir(exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"observed": f"skipped: a small tmpfs cannot be mounted here ({type(exc).__name__})", "skipped": True,
                "extra": {}}
    side = None
    try:
        root = mount / "store"
        _small_datastore(root, t.work / "phantoms")
        side, s = _start_side_server(t, root, t.work / "disk-full-logs")
        store = s.store()
        case = store.cases("test")[0]["case_id"] if store.cases("test") else store.cases()[0]["case_id"]
        store.close()
        filler = mount / "filler"
        outcome, leaks, refused_then_stored = [], [], []
        for headroom_kb in (0, 4, 16, 32, 64, 128):
            filler.unlink(missing_ok=True)
            free = shutil.disk_usage(mount).free
            with open(filler, "wb") as fh:
                fh.truncate(0)
                fh.write(b"\0" * max(0, free - headroom_kb * 1024))
            answers, wants = _side_attempts(s, case, 2, f"full{headroom_kb}k")
            report = leftovers(s)
            for ans, want in zip(answers, wants):
                stored = _stored(s, want)
                ok = (ans.status in (200, 201) and stored) or (ans.status == 507 and ans.message and not stored)
                outcome.append({"headroom_kb": headroom_kb, "status": ans.status, "stored": stored, "ok": bool(ok)})
            if not clean(report):
                leaks.append({"headroom_kb": headroom_kb, **{k: v for k, v in report.items() if v and k != "integrity"}})
            filler.unlink(missing_ok=True)
            for ans, want in zip(answers, wants):  # with room again the refused request goes through
                if ans.status == 507:
                    if want[0] == "case":
                        again = post_form(s, f"{API}/cases", {"case_id": want[1]}, {"image": ("i.nrrd", want[2])})
                    else:
                        again = post_form(s, f"{API}/cases/{case}/labels", *want[2])
                    refused_then_stored.append(again.status in (200, 201))
        statuses = [o["status"] for o in outcome]
        return {"observed": f"{statuses.count(507)} of {len(statuses)} writes refused 507, "
                            f"{sum(s_ in (200, 201) for s_ in statuses)} stored; other answers: "
                            f"{sorted(set(x for x in statuses if x not in (200, 201, 507)), key=str)}; "
                            f"leaks: {leaks or 'none'}",
                "extra": {"each write stored whole or refused 507": all(o["ok"] for o in outcome),
                          "at least one 507": 507 in statuses, "nothing left behind": not leaks,
                          "refused writes succeed with room again": all(refused_then_stored)},
                "detail": outcome}
    finally:
        if side is not None:
            side.stop()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fault_index_full(t: Target) -> dict:
    """The index capped at its size (SSLSEGMENT_INDEX_MAX_MB): writes go in until one no longer fits; that one is
    refused 507 and leaves nothing; reads still answer; with the cap lifted the same request succeeds."""
    from training.datastore import INDEX_QUOTA_ENV, Datastore

    root = t.work / "quota-store"
    _small_datastore(root, t.work / "phantoms")
    store = Datastore(root)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    quota_mb = store.db.execute("PRAGMA page_count").fetchone()[0] * store.db.execute(
        "PRAGMA page_size").fetchone()[0] / 2**20
    case = store.cases()[0]["case_id"]
    store.close()
    side, s = _start_side_server(t, root, t.work / "quota-logs", {INDEX_QUOTA_ENV: f"{quota_mb:.6f}"})
    refused, leaks, reads_ok = None, [], True
    try:
        for i in range(40):
            answers, wants = _side_attempts(s, case, 1, f"q{i}x")
            for ans, want in zip(answers, wants):
                if ans.status == 507:
                    refused = (ans, want, _stored(s, want))
                    break
                if ans.status not in (200, 201):
                    refused = (ans, want, _stored(s, want))
                    break
            if refused:
                break
        report = leftovers(s)
        if not clean(report):
            leaks.append({k: v for k, v in report.items() if v and k != "integrity"})
        reads_ok = http(s, "GET", f"{API}/cases").status == 200
    finally:
        side.stop()
    if refused is None:
        return {"observed": "the index never filled up", "extra": {"a write refused 507": False}}
    ans, want, stored = refused
    side, s = _start_side_server(t, root, t.work / "quota-logs")
    try:
        again = (post_form(s, f"{API}/cases", {"case_id": want[1]}, {"image": ("i.nrrd", want[2])}) if want[0] == "case"
                 else post_form(s, f"{API}/cases/{case}/labels", *want[2]))
    finally:
        side.stop()
    return {"observed": f"the {want[0]} that did not fit: {ans.status} {scrub(ans.message, t.token)}; "
                        f"with the cap lifted: {again.status}",
            "extra": {"a write refused 507 with a message": ans.status == 507 and ans.message is not None,
                      "nothing of it stored": not stored, "nothing left behind": not leaks, "reads still answer": reads_ok,
                      "it succeeds without the cap": again.status in (200, 201)}}


FAULTS = {
    "worker killed mid-training": ("SIGKILL to the worker while a job trains", fault_worker_killed_training),
    "worker killed while publishing": ("SIGKILL to the worker while it validates, publishes or scores",
                                       fault_worker_killed_publishing),
    "server killed while a job runs": ("SIGKILL to the server while the worker trains", fault_server_killed_job_running),
    "server killed mid-upload": ("SIGKILL to the server while three clients upload images and corrections",
                                 fault_server_killed_mid_upload),
    "scoring fails after publish": ("an unreviewed case's image made unreadable while the job trains",
                                    fault_scoring_fails),
    "corrupt checkpoint promoted": ("a version's checkpoint damaged on disk, then promoted by hand",
                                    fault_corrupt_checkpoint_promoted),
    "corrupt current checkpoint": ("the current version's checkpoint damaged on disk, the server restarted",
                                   fault_corrupt_current_checkpoint),
    "training diverges": ("a job whose loss becomes NaN (lr 1e8)", fault_nan_loss),
    "job cancelled mid-training": ("DELETE /train/{job} while it trains", fault_cancel_running),
    "manual rollback during a job": ("an older version promoted by hand while a job trains", fault_rollback_during_job),
    "disk full": ("ENOSPC: the datastore on a 6 MB tmpfs filled to 0-128 KB of headroom", fault_disk_full),
    "index full": (f"the index capped at its size ({'SSLSEGMENT_INDEX_MAX_MB'})", fault_index_full),
}


def run_faults(t: Target, names, log=print) -> list[dict]:
    rows = []
    for name, (what, fn) in FAULTS.items():
        if names != "all" and name not in names:
            continue
        t0 = time.perf_counter()
        try:
            result = fn(t)
        except Exception as exc:  # a fault whose script broke is a fault not survived, with the reason
            result = {"observed": f"the fault's script failed: {type(exc).__name__}: {exc}", "extra": {"ran": False}}
        try:
            _wait_healthy(t, 60)
        except TimeoutError:
            pass
        state = consistency(t)
        checks = {**result.get("extra", {}), **state["checks"]}
        skipped = bool(result.get("skipped"))
        row = {"name": name, "what": what, "observed": scrub(result["observed"], t.token), "skipped": skipped,
               "survived": (not skipped) and all(bool(v) for v in checks.values()), "checks": checks,
               "leftovers": state["leftovers"], "seconds": round(time.perf_counter() - t0, 2)}
        if "detail" in result:
            row["detail"] = result["detail"]
        rows.append(row)
        failed = [k for k, v in checks.items() if not v]
        log(f"  fault {name}: {'skipped' if skipped else ('survived' if row['survived'] else 'NOT survived ' + str(failed))}"
            f" ({row['seconds']} s) {row['observed'][:160]}")
        if state["leftovers"]:
            log(f"    leftovers: {state['leftovers']}")
    return rows


# -- submissions ------------------------------------------------------------------------------------------------
@dataclass
class Submission:
    case_id: str
    submission_id: str
    label: bytes
    mask: bytes
    digest: str
    reviewed: int
    status: int | None = None
    revision: int | None = None
    attempts: int = 0


def _make_submission(t: Target, case_id: str, seed: int, author: str) -> Submission:
    grid = t.grids[case_id]
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, grid.shape).astype(np.uint8)
    mask = np.zeros(grid.shape, np.uint8)
    z0 = int(rng.integers(0, grid.shape[0] - 2))
    mask[z0: z0 + int(rng.integers(1, 3))] = 1
    return Submission(case_id, f"sub{seed:05d}x{os.urandom(6).hex()}", volume_bytes(label, grid.geometry),
                      volume_bytes(mask, grid.geometry), _digest(label, mask), int(mask.sum()))


def _digest(label: np.ndarray, mask: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(label, np.uint8).tobytes() + np.ascontiguousarray(mask, np.uint8).tobytes()).hexdigest()


def _send(t: Target, s: Submission, author: str, deadline: float) -> None:
    """Send until the server acknowledges it (201 stored, or 200: stored by an earlier try whose answer was lost)."""
    while time.monotonic() < deadline:
        s.attempts += 1
        ans = post_form(t, f"{API}/cases/{s.case_id}/labels",
                        {"kind": "correction", "submission_id": s.submission_id, "author": author},
                        {"label": ("l.nrrd", s.label), "reviewed_mask": ("m.nrrd", s.mask)}, timeout=30)
        if ans.status in (200, 201):
            s.status, s.revision = ans.status, (ans.json() or {}).get("revision")
            return
        if ans.status is not None and ans.status not in (503,):
            s.status = ans.status  # an answered refusal: not acknowledged, and not retried
            return
        time.sleep(0.05 + 0.1 * random.random())


def verify_submissions(t: Target, subs: list[Submission]) -> dict:
    """Every acknowledged submission: its revision in the index, under its submission id, for its case, with its
    files on disk holding exactly the label and mask that were sent."""
    from SSLSegmentLib.data.imageio import read_label

    store = t.store()
    lost = []
    for s in subs:
        if s.status not in (200, 201):
            continue
        row = store.db.execute("SELECT * FROM labels WHERE submission_id = ?", (s.submission_id,)).fetchone()
        problem = None
        if row is None:
            problem = "not in the index"
        elif row["revision"] != s.revision or row["case_id"] != s.case_id:
            problem = f"indexed as revision {row['revision']} of {row['case_id']}"
        else:
            try:
                label = read_label(store.abs(row["path"])).array
                mask = read_label(store.abs(row["reviewed_mask"])).array
                if _digest(label, mask) != s.digest or row["reviewed_voxels"] != s.reviewed:
                    problem = "stored content differs from what was sent"
            except Exception as exc:
                problem = f"files unreadable: {type(exc).__name__}"
        if problem:
            lost.append({"submission_id": s.submission_id, "problem": problem})
    dupes = store.db.execute("SELECT submission_id, COUNT(*) FROM labels WHERE submission_id IS NOT NULL "
                             "GROUP BY submission_id HAVING COUNT(*) > 1").fetchall()
    store.close()
    return {"lost": lost, "duplicated": [r[0] for r in dupes]}


def run_concurrent(t: Target, n: int) -> dict:
    cases = [t.cases["test"], t.cases["test2"]]
    subs = [_make_submission(t, cases[i % 2], 10_000 + i, f"conc{i % 5}") for i in range(n)]
    deadline = time.monotonic() + 300
    t0 = time.perf_counter()
    _threads(lambda i: _send(t, subs[i], f"conc{i % 5}", deadline), n)
    seconds = time.perf_counter() - t0
    v = verify_submissions(t, subs)
    acked = [s for s in subs if s.status in (200, 201)]
    return {"submitted": n, "acknowledged": len(acked), "created_201": sum(s.status == 201 for s in subs),
            "lost": len(v["lost"]), "lost_detail": v["lost"], "duplicated": v["duplicated"],
            "not acknowledged": [{"submission_id": s.submission_id, "status": s.status} for s in subs if s not in acked],
            "seconds": round(seconds, 2)}


def run_through_kills(t: Target, n: int, clients: int, kills_wanted: int, log=print) -> dict:
    """n corrections from `clients` threads while the server is killed with SIGKILL and restarted `kills_wanted`
    times, spread over the run (after every n / (kills_wanted + 1) acknowledgements, give or take, so each kill
    lands while requests are in flight); every client retries until its correction is acknowledged."""
    cases = [t.cases["test"], t.cases["test2"]]
    subs = [_make_submission(t, cases[i % 2], 20_000 + i, f"kill{i % clients}") for i in range(n)]
    queues = [subs[k::clients] for k in range(clients)]
    done = threading.Event()
    deadline = time.monotonic() + 600
    kills = 0

    def client(k):
        for s in queues[k]:
            _send(t, s, f"kill{k}", deadline)

    def killer():
        nonlocal kills
        while not done.is_set() and kills < kills_wanted:
            due = (kills + 1) * n / (kills_wanted + 1) + random.uniform(-0.3, 0.3) * n / (kills_wanted + 1)
            while not done.is_set() and sum(s.status in (200, 201) for s in subs) < due:
                time.sleep(0.01)
            if done.is_set():
                break
            t.backend.kill_server()
            kills += 1
            time.sleep(0.1 + 0.3 * random.random())
            t.backend.restart_server()
            try:
                _wait_healthy(t, 60)
            except TimeoutError:
                pass

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    kill_thread = threading.Thread(target=killer)
    [th.start() for th in threads]
    kill_thread.start()
    [th.join() for th in threads]
    done.set()
    kill_thread.join()
    seconds = time.perf_counter() - t0
    _wait_healthy(t)
    v = verify_submissions(t, subs)
    report = leftovers(t)
    acked = [s for s in subs if s.status in (200, 201)]
    log(f"  {len(acked)}/{n} acknowledged across {kills} server kills, {len(v['lost'])} lost; "
        f"leftovers: {({k: val for k, val in report.items() if val and k != 'integrity'}) or 'none'}")
    return {"submitted": n, "acknowledged": len(acked), "created_201": sum(s.status == 201 for s in subs),
            "replayed_200": sum(s.status == 200 for s in subs), "attempts": sum(s.attempts for s in subs),
            "server_kills": kills, "lost": len(v["lost"]), "lost_detail": v["lost"], "duplicated": v["duplicated"],
            "not acknowledged": [{"submission_id": s.submission_id, "status": s.status} for s in subs if s not in acked],
            "leftovers": {k: val for k, val in report.items() if val and k != "integrity"},
            "seconds": round(seconds, 2)}


# -- security checks --------------------------------------------------------------------------------------------
class _PickledCode:
    """A checkpoint payload that runs code when unpickled: it would create the folder named in `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def security_checks(t: Target, malformed: dict) -> dict:
    import torch

    from training import server

    out = {}
    source = inspect.getsource(server.token_matches)
    out["token comparison"] = {"function": "training.server.token_matches",
                               "uses": "hmac.compare_digest" if "hmac.compare_digest" in source else "something else",
                               "held": "hmac.compare_digest" in source}
    from training.cli import build_parser

    serve_defaults = build_parser().parse_args(["serve", "--datastore", "x"])
    reachable = None
    try:  # the machine's own non-loopback address, if it has one: the server must not answer there
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        if not address.startswith("127."):
            try:
                with socket.create_connection((address, t.port), timeout=2):
                    reachable = True
            except OSError:
                reachable = False
    except OSError:
        address = None
    out["bind address"] = {"serve default --host": serve_defaults.host, "non-loopback address tried": address is not None,
                           "answered on it": reachable, "held": serve_defaults.host == "127.0.0.1" and not reachable}
    marker = t.work / "pickled-code-ran"
    evil = t.work / "evil.pt"
    torch.save({"format": "sslsegment-checkpoint/1", "payload": _PickledCode(str(marker))}, evil)
    before = _models(t)
    proc = subprocess.run([sys.executable, "-m", "training.cli", "import-model", str(evil), "--datastore", str(t.root)],
                          capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    out["pickled-code checkpoint"] = {
        "import-model exit status": proc.returncode, "code ran": marker.exists(), "version added": _models(t) != before,
        "message": (proc.stderr.strip().splitlines() or [""])[-1][:200],
        "held": proc.returncode != 0 and not marker.exists() and _models(t) == before}
    logs = "".join(p.read_text(errors="replace") for p in Path(t.backend.log_dir).glob("*.log"))
    out["token not in the logs"] = {"held": t.token not in logs}
    out["token in no answer to a malformed request"] = {"answers holding it": malformed["answers holding the token"],
                                                       "held": malformed["answers holding the token"] == 0}
    mode = (t.root / ".sslsegment" / "token").stat().st_mode & 0o777
    out["token file owner-only"] = {"mode": oct(mode), "held": mode == 0o600}
    return out


# -- the run ----------------------------------------------------------------------------------------------------
def _prepare(work: Path, with_worker: bool = True):
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset
    from SSLSegmentLib.review.local_backend import LocalBackend
    from training.datastore import Datastore, import_folder

    data = write_phantom_dataset(work / "phantoms", 6, 2, 3, PhantomConfig(shape=SHAPE), seed=17)
    store = Datastore(work / "store", create=True)
    import_folder(store, data, labels="train:2")
    store.update_settings({"train": TRAIN, "score_passes": 1, "infer": {"passes": 2}})
    store.close()
    backend = LocalBackend(work / "store", with_worker=with_worker, worker_args=WORKER_ARGS, log_dir=work / "logs",
                           env_overrides={"OMP_NUM_THREADS": "1"},
                           serve_args=["--log-level", "warning", "--max-upload-mb", str(UPLOAD_LIMIT_MB),
                                       "--body-timeout-s", str(BODY_TIMEOUT_S)])
    backend.start().wait_until_ready()
    return backend


def _untrained_versions(t: Target) -> None:
    """Two versions of an untrained network, published and promoted in this process: the quick run's stand-in for
    training them (a worker's first job costs seconds of imports and training, and the attacks need only versions)."""
    from SSLSegmentLib.ml.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from SSLSegmentLib.ml.networks import NetworkConfig, build_network
    from training.registry import ModelRegistry

    cfg = NetworkConfig(**NETWORK)
    path = save_checkpoint({"format": CHECKPOINT_FORMAT, "model": build_network(cfg).state_dict(),
                            "network": cfg.to_dict(), "train_config": {"patch_size": list(SHAPE)}, "method": "brl"},
                           t.work / "untrained.pt")
    store = t.store()
    registry = ModelRegistry(store)
    for parent in (None, "v0001"):
        version = registry.add_version(path, {"parent": parent, "metrics": {}, "trained_on": {}, "decision": "untrained"})
        registry.promote(version["version"], reason="the quick run's stand-in for a trained version")
    store.close()


def _aim(t: Target, quick: bool = False) -> None:
    """Train the first two versions (quick: publish two untrained ones) and pick what the attacks aim at."""
    from SSLSegmentLib.data.volume import Volume

    if quick:
        _untrained_versions(t)
    else:
        for params in ({"init": "scratch"}, {"tolerance": 1.0}):
            job = _wait_job(t, _start_job(t, **params))
            if job["status"] != "succeeded":
                raise RuntimeError(f"the first versions did not train: {job['error']}")
    store = t.store()
    t.version = store.get_meta(store.db, "current_model")
    tests = [c["case_id"] for c in store.cases("test")]
    train = [c["case_id"] for c in store.cases("train")]
    unreviewed = store.unreviewed("train")
    t.cases = {"test": tests[0], "test2": tests[1], "other": tests[2], "train": train[0], "inferred": unreviewed[-1]}
    for cid in tests:
        grid = store.grid(cid)
        t.grids[cid] = Volume(np.zeros(grid.shape, np.uint8), grid.geometry)
    store.close()
    ans = post_json(t, f"{API}/cases/{t.cases['inferred']}/infer", "{}")
    t.inference_id = ans.json()["inference_id"]
    # A revision of another case and a submission id used there, for the attacks that borrow them.
    other = _make_submission(t, t.cases["other"], 1, "setup")
    _send(t, other, "setup", time.monotonic() + 60)
    t.cases["other_revision"], t.cases["other_submission"] = other.revision, other.submission_id


def run_attack(work: Path, quick: bool = False, log=print) -> dict:
    """The whole attack in `work` (a fresh folder); returns the result (see markdown() for what it holds)."""
    from benchmarks.backend import machine

    profile = PROFILES["quick" if quick else "full"]
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    environment = machine()
    backend = _prepare(work, profile["worker"])
    phases = {}

    def phase(name):
        phases[name] = round(time.perf_counter() - t0, 1)
        log(f"{name} ({phases[name]} s)")
    try:
        t = Target(backend, work, backend.token)
        log(f"backend on {backend.base_url}; training the first versions")
        _aim(t, quick)
        phase("malformed requests")
        malformed = run_malformed(t, profile["every_nth_attack"], log)
        store = t.store()
        for job_id in malformed["reached storage"].get("jobs", []):  # a job that got through runs no further
            store.request_cancel(job_id)
            _wait_job(t, job_id)
        store.close()
        log(f"  {malformed['refused']}/{malformed['tried']} refused; {malformed['accepted']} accepted, "
            f"{malformed['5xx']} 5xx, {malformed['no answer']} unanswered; reached storage: "
            f"{malformed['reached storage'] or 'nothing'}; check: {'clean' if malformed['clean'] else malformed['datastore check']}")
        races = []
        if profile["races"]:
            phase("races")
            races = run_races(t)
            for r in races:
                log(f"  {r['name']}: {'held' if r['held'] else 'BROKEN'} {r['statuses']}")
        phase("faults")
        faults = run_faults(t, profile["faults"], log)
        phase("submissions")
        concurrent = run_concurrent(t, profile["concurrent"])
        log(f"  {concurrent['acknowledged']}/{concurrent['submitted']} concurrent acknowledged, {concurrent['lost']} lost")
        killed = run_through_kills(t, profile["killed"], profile["kill_clients"], profile["server_kills"], log)
        phase("final checks")
        final = consistency(t)
        security = security_checks(t, malformed) if not quick else {}
    finally:
        backend.stop()
    wall = time.perf_counter() - t0
    tried_faults = [f for f in faults if not f["skipped"]]
    acked = concurrent["acknowledged"] + killed["acknowledged"]
    lost = concurrent["lost"] + killed["lost"]
    result = {
        "profile": "quick" if quick else "full", "environment": environment, "wall_s": round(wall, 1),
        "phases_started_s": phases,
        "headline": {
            "refused": malformed["refused"], "tried": malformed["tried"], "accepted": malformed["accepted"],
            "5xx": malformed["5xx"], "no answer": malformed["no answer"],
            "refused without a message": malformed["refused without a message"],
            "refused requests that reached storage": sum(len(v) for v in malformed["reached storage"].values()),
            "races held": sum(r["held"] for r in races), "races tried": len(races),
            "faults survived": sum(f["survived"] for f in tried_faults), "faults tried": len(tried_faults),
            "faults skipped": [f["name"] for f in faults if f["skipped"]],
            "submissions lost": lost, "submissions acknowledged": acked,
            "submissions duplicated": len(set(concurrent["duplicated"]) | set(killed["duplicated"])),
            "server kills during submissions": killed["server_kills"],
            "security checks held": sum(v["held"] for v in security.values()), "security checks": len(security),
            "datastore clean at the end": final["checks"]["no leaked file"],
        },
        "config": {"shape": list(SHAPE), "network": NETWORK, "upload_limit_mb": UPLOAD_LIMIT_MB,
                   "body_timeout_s": BODY_TIMEOUT_S, **{k: v for k, v in profile.items()}},
        "malformed": malformed, "races": races, "faults": faults,
        "submissions": {"concurrent": concurrent, "through_server_kills": killed}, "security": security,
        "final_state": final,
    }
    return result


def markdown(r: dict) -> str:
    e, h = r["environment"], r["headline"]
    m = r["malformed"]
    lines = [
        f"# Backend under attack ({r['profile']} run)",
        "",
        f"{e['date']} · {e['cpu']} ({e['cpu_count']} cores, load average at start {e['load_average_at_start']}) · "
        f"Python {e['python']}, torch {e['torch']}, FastAPI {e['fastapi']}, uvicorn {e['uvicorn']}, SQLite {e['sqlite']} "
        f"· whole run {r['wall_s']:.0f} s",
        "",
        f"- **malformed requests refused: {h['refused']} / {h['tried']}** (4xx, 413 or 507 with a JSON message); "
        f"accepted {h['accepted']}, 5xx {h['5xx']}, unanswered {h['no answer']}, refused without a message "
        f"{h['refused without a message']}; refused requests that reached storage: "
        f"{h['refused requests that reached storage']}",
        f"- **faults survived: {h['faults survived']} / {h['faults tried']}**"
        + (f" (skipped here: {', '.join(h['faults skipped'])})" if h["faults skipped"] else ""),
        f"- **submissions lost: {h['submissions lost']} / {h['submissions acknowledged']} acknowledged** "
        f"({r['submissions']['concurrent']['acknowledged']} sent at once, "
        f"{r['submissions']['through_server_kills']['acknowledged']} across {h['server kills during submissions']} "
        f"server kills); duplicated: {h['submissions duplicated']}",
    ]
    if r["races"]:
        lines.append(f"- races held: {h['races held']} / {h['races tried']}")
    if r["security"]:
        lines.append(f"- security checks held: {h['security checks held']} / {h['security checks']}")
    lines += [
        f"- datastore clean at the end (`datastore-check`: no staging, unindexed or spooled file, nothing missing): "
        f"{'yes' if h['datastore clean at the end'] else 'no'}",
        "",
        f"A real `sslsegment serve` and `sslsegment worker` on 127.0.0.1 over a phantom datastore "
        f"({'×'.join(map(str, r['config']['shape']))} voxels, a tiny network trained for a few iterations), upload limit "
        f"{r['config']['upload_limit_mb']} MB, body timeout {r['config']['body_timeout_s']:g} s. "
        "Reproduce: `python -m benchmarks.backend_attack` (`--quick` for the reduced run the tests use).",
        "",
        "## Malformed requests",
        "",
        "| category | tried | refused | accepted | 5xx | unanswered | refused without a message |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cat, c in m["by_category"].items():
        lines.append(f"| {cat} | {c['tried']} | {c['refused']} | {c['accepted']} | {c['5xx']} | {c['no answer']} | "
                     f"{c['refused without a message']} |")
    lines.append(f"| **all** | **{m['tried']}** | **{m['refused']}** | **{m['accepted']}** | **{m['5xx']}** | "
                 f"**{m['no answer']}** | **{m['refused without a message']}** |")
    lines += ["", f"After the batch, reached storage: {m['reached storage'] or 'nothing'} (cases, label revisions, jobs, "
              "exclusions, models, files); datastore check " + ("clean." if m["clean"] else f"{m['datastore check']}."),
              "", "<details><summary>Every request and its answer</summary>", "",
              "| category | request | status | outcome | message (start) |", "|---|---|---:|---|---|"]
    for row in m["rows"]:
        msg = (row["message"] or "").replace("|", "\\|").replace("\n", " ")[:110]
        lines.append(f"| {row['category']} | {row['name'].replace('|', '/')} | {row['status']} | {row['outcome']} | {msg} |")
    lines += ["", "</details>", ""]
    if r["races"]:
        lines += ["## Races", "", "| race | answers | expected | held |", "|---|---|---|---|"]
        for row in r["races"]:
            lines.append(f"| {row['name']} | {row['statuses']} | {row['expected']} | {'yes' if row['held'] else '**no**'} |")
        lines.append("")
    lines += ["## Faults", "",
              "After each: the server answers, the current model is a promoted version whose checkpoint matches its "
              "digest and whose job succeeded with it, every version's file is intact, no job is left queued or "
              "running, no file the index does not know.", "",
              "| fault | what | observed | survived | s |", "|---|---|---|---|---:|"]
    for f in r["faults"]:
        verdict = "skipped" if f["skipped"] else ("yes" if f["survived"] else
                                                  "**no**: " + ", ".join(k for k, v in f["checks"].items() if not v))
        lines.append(f"| {f['name']} | {f['what']} | {f['observed'].replace('|', '/')[:220]} | {verdict} | {f['seconds']} |")
    c, k = r["submissions"]["concurrent"], r["submissions"]["through_server_kills"]
    lines += ["", "## Submissions", "",
              "Corrections (label + reviewed mask) to test-split cases, each with its own content and submission id. "
              "A client retries until the server acknowledges (201, or 200 for a retry of one already stored); then "
              "each acknowledged one must be in the index under its submission id with files holding exactly what was "
              "sent (sha256 of the label and mask voxels).", "",
              "| run | submitted | acknowledged | 201 | 200 (retry of a stored one) | lost | duplicated | server kills | s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| at once, {c['submitted']} threads | {c['submitted']} | {c['acknowledged']} | {c['created_201']} | "
              f"{c['acknowledged'] - c['created_201']} | {c['lost']} | {len(c['duplicated'])} | 0 | {c['seconds']} |",
              f"| {r['config']['kill_clients']} clients, server SIGKILLed and restarted | {k['submitted']} | "
              f"{k['acknowledged']} | {k['created_201']} | {k['replayed_200']} | {k['lost']} | {len(k['duplicated'])} | "
              f"{k['server_kills']} | {k['seconds']} |", ""]
    if r["security"]:
        lines += ["## Security checks", "", "| check | finding | held |", "|---|---|---|"]
        for name, v in r["security"].items():
            finding = ", ".join(f"{a}: {b}" for a, b in v.items() if a != "held")
            lines.append(f"| {name} | {finding.replace('|', '/')} | {'yes' if v['held'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backend_attack", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced run (a slice of each category, two faults)")
    p.add_argument("--out-name", default=None, help="results file stem (default backend-attack[-quick])")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--keep", action="store_true", help="keep the temporary datastore and logs")
    args = p.parse_args(argv)
    from SSLSegmentLib.data.imageio import atomic_write_bytes

    work = Path(tempfile.mkdtemp(prefix="backend-attack-"))
    try:
        result = run_attack(work, quick=args.quick)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    stem = args.out_name or ("backend-attack-quick" if args.quick else "backend-attack")
    text = json.dumps(result, indent=2, default=str) + "\n"
    atomic_write_bytes(out / f"{stem}.json", text.encode())
    atomic_write_bytes(out / f"{stem}.md", markdown(result).encode())
    h = result["headline"]
    print(f"refused {h['refused']}/{h['tried']}, faults survived {h['faults survived']}/{h['faults tried']}, "
          f"submissions lost {h['submissions lost']}/{h['submissions acknowledged']}, {result['wall_s']:.0f} s; "
          f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

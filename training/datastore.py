"""The backend's datastore: files in a MONAI-Label-like layout plus an SQLite index (WAL mode).

    DIR/<case_id>.<ext>                                   images
    DIR/labels/final/<case_id>.nrrd, <case_id>@<n>.nrrd   final label revisions (first, then later ones)
    DIR/labels/original/<case_id>.nrrd                    imported pre-labels
    DIR/labels/corrections/<author>/<case_id>/r<n>/       correction revisions (label, reviewed mask, uncertainty shown)
    DIR/models/<version>/                                 immutable model versions (model.pt, version.json)
    DIR/inference/<case_id>/<inference_id>/               cached inference outputs (and region maps per view)
    DIR/jobs/<job_id>/                                    job scratch space
    DIR/.sslsegment/index.sqlite, token                   the index and the bearer token (0600)

Invariants (see docs/backend.md): revisions and versions are never overwritten; every file is written to a temporary
name, fsynced and renamed (folders as a whole) before its index row commits; a case's split is assigned once at
registration and never redrawn; ids are validated before they become part of a path.

The Datastore class is storage and the index: cases, label revisions, the inference cache and its region maps,
leases, the job queue, settings and the token. Rules that work on the index live beside it: the model registry
(training/registry.py), the review orderings (training/strategies.py) and the training-set rule
(training/training_set.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import numpy as np

from SSLSegmentLib.data import contract
from SSLSegmentLib.data.volume import Geometry, ImageError, Volume
from SSLSegmentLib.data.imageio import (
    DEFAULT_MAX_VOXELS,
    HOST_TAG,
    IMAGE_SUFFIXES,
    TEMP_RE,
    fsync_dir,
    read_label,
    read_volume,
    strip_suffix,
    temp_prefix,
    write_volume,
    writer_tag,
)
from training.retrain import RetrainSchedule

SCHEMA_VERSION = 2
INDEX_DIR = ".sslsegment"
SPLITS = ("train", "val", "test")
LABEL_KINDS = ("final", "correction", "original")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATES = ("succeeded", "failed", "cancelled")
JOB_ID_RE = re.compile(r"^[0-9a-f]{12}$")
INFERENCE_ID_RE = re.compile(r"^[0-9a-f]{16}$")
# A region view names one rank map: uncertainty kind, threshold, min_voxels, max_regions (see `region_view`). It
# becomes a file name, so only this exact shape is ever accepted from a client.
REGION_VIEW_RE = re.compile(
    r"^(?P<kind>" + "|".join(re.escape(k) for k in contract.UNCERTAINTY_KINDS) + r")"
    r"-t(?P<threshold>0\.[0-9]{4,400})-m(?P<min_voxels>[1-9][0-9]{0,17})-r(?P<max_regions>[1-9][0-9]{0,17})\Z"
)

DEFAULT_SETTINGS = {
    # Retrain automatically after this many new corrections (0 = manual only).
    "retrain_every": 0,
    # A new version is promoted if its validation Dice is at least the parent's minus this.
    "tolerance": 0.02,
    # How long GET /cases/next holds a case for one annotator.
    "lease_s": 900.0,
    "max_upload_mb": 512.0,
    # Voxels an uploaded image may declare; its header is checked before a voxel is decoded (imageio.read_volume).
    "max_voxels": DEFAULT_MAX_VOXELS,
    # How many times its file's size an uploaded image may decode to (0 = no bound): a scan compresses a few times at
    # most, a block of zeros a thousandfold, so a few hundred kilobytes cannot make the server hold gigabytes.
    "max_expansion": 100.0,
    "num_classes": 2,
    # Defaults of POST /train; request parameters override them.
    "train": {
        "method": "brl",
        "iterations": 300,
        "lr": 0.01,
        "batch_labeled": 2,
        "batch_unlabeled": 2,
        "val_interval": 50,
        "seed": 0,
        "device": "auto",
        "nproc": 1,
    },
    # How a job that fine-tunes a published model is sized (training/retrain.py, RetrainSchedule): its iterations,
    # learning rate and published weights, where the request does not name them.
    "retrain": RetrainSchedule().to_dict(),
    # Defaults of POST /cases/{id}/infer.
    "infer": {"passes": 8, "threshold": 0.5, "min_voxels": 8, "max_regions": 50,
              "uncertainty": contract.DEFAULT_UNCERTAINTY},
    # MC-dropout passes of the scoring pass that ranks cases after each promotion (0 = no scoring pass).
    "score_passes": 4,
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY,
    split TEXT NOT NULL CHECK (split IN ('train', 'val', 'test')),
    image TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    shape TEXT NOT NULL,
    geometry TEXT NOT NULL,
    created REAL NOT NULL,
    score REAL, score_sum REAL, score_model TEXT, score_time REAL
);
CREATE TABLE IF NOT EXISTS labels (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id TEXT NOT NULL REFERENCES cases(case_id),
    kind TEXT NOT NULL CHECK (kind IN ('final', 'correction', 'original')),
    author TEXT NOT NULL,
    model_version TEXT,
    created REAL NOT NULL,
    path TEXT NOT NULL,
    reviewed_mask TEXT,
    uncertainty TEXT,
    uncertainty_kind TEXT,
    threshold REAL,
    reviewed_voxels INTEGER NOT NULL,
    foreground_voxels INTEGER NOT NULL,
    submission_id TEXT UNIQUE,
    sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_case ON labels(case_id, revision);
CREATE TABLE IF NOT EXISTS leases (case_id TEXT PRIMARY KEY, annotator TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    params TEXT NOT NULL,
    trigger TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, heartbeat REAL,
    worker TEXT, host TEXT, pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress TEXT, history TEXT, result TEXT, error TEXT,
    corrections_seen INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
CREATE TABLE IF NOT EXISTS models (
    version TEXT PRIMARY KEY,
    created REAL NOT NULL,
    job_id TEXT,
    parent TEXT,
    method TEXT,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    metrics TEXT NOT NULL,
    trained_on TEXT NOT NULL,
    promoted INTEGER NOT NULL DEFAULT 0,
    decision TEXT
);
CREATE TABLE IF NOT EXISTS promotions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL, previous TEXT, at REAL NOT NULL, reason TEXT
);
CREATE TABLE IF NOT EXISTS exclusions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id TEXT NOT NULL REFERENCES cases(case_id),
    revision INTEGER REFERENCES labels(revision),
    reason TEXT NOT NULL, author TEXT NOT NULL, created REAL NOT NULL,
    lifted REAL, lifted_by TEXT, lift_reason TEXT
);
CREATE TABLE IF NOT EXISTS inferences (
    inference_id TEXT PRIMARY KEY,
    case_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    passes INTEGER NOT NULL,
    created REAL NOT NULL,
    path TEXT NOT NULL,
    uncertainty_mean REAL, uncertainty_sum REAL
);
"""


# Columns added after schema version 1: (table, column, SQL type). Added in place to older indexes.
_ADDED_COLUMNS = (("labels", "uncertainty_kind", "TEXT"), ("labels", "threshold", "REAL"))



# Spooled uploads: the prefix names them, followed by the writer's tag (imageio.writer_tag) for those spooled since
# the tag exists; those of a writer that is gone are removed when a server or worker starts, and --clean removes any
# older than UPLOAD_STALE_S (none is in flight that long).
UPLOAD_PREFIX = "upload-"
UPLOAD_STALE_S = 3600.0
UPLOAD_RE = re.compile(r"^upload-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-")
# A folder published by StagedFolder names its writer in this file; while the folder is not indexed yet, a writer
# that is gone means a write that was cut short (a crash between the rename and the index row).
WRITER_FILE = ".writer"

# An operator's cap on the index (a quota on a shared server): past it a write fails as on a full disk, nothing of it
# is kept, and the API answers 507. Unset: the disk is the limit.
INDEX_QUOTA_ENV = "SSLSEGMENT_INDEX_MAX_MB"


def _check_setting(key: str, value) -> None:
    """A scalar setting keeps its default's kind: a finite number >= 0 (an integer where the default is one; the
    voxel cap at least 1), a string, a bool. Refused otherwise, so a typo never reaches a request that reads it."""
    default = DEFAULT_SETTINGS[key]
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise InvalidInput(f"setting {key!r} is a group of settings (an object), got {value!r}")
        return
    if isinstance(default, bool) or isinstance(default, str):
        if type(value) is not type(default):
            raise InvalidInput(f"setting {key!r} must be a {type(default).__name__}, got {value!r}")
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int) and not (number and float(value).is_integer()):
        raise InvalidInput(f"setting {key!r} must be an integer, got {value!r}")
    low, high = {"max_voxels": (1, math.inf), "tolerance": (-1, 1)}.get(key, (0, math.inf))
    if not (number and math.isfinite(value) and low <= value <= high):
        raise InvalidInput(f"setting {key!r} must be a finite number in [{low}, {high}], got {value!r}")


def _checked_reason(reason) -> str:
    """An exclusion's reason: what the audit trail says about it, so it may not be empty."""
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000 or "\x00" in reason:
        raise InvalidInput("a reason is needed: 1..1000 characters saying why")
    return reason.strip()


def index_quota_pages(conn: sqlite3.Connection) -> int | None:
    """The index's page cap from SSLSEGMENT_INDEX_MAX_MB (None when unset); a value that is not a positive number
    is refused, so a typo never silently removes the cap."""
    value = os.environ.get(INDEX_QUOTA_ENV)
    if not value:
        return None
    try:
        mb = float(value)
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"{INDEX_QUOTA_ENV} must be a positive number of MB, got {value!r}")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    return max(1, int(mb * 2**20 // page))


class DatastoreError(RuntimeError):
    """Base class of the datastore's user-facing errors."""


class NotFound(DatastoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Conflict(DatastoreError, ValueError):
    """The request conflicts with what is stored (an id taken by different content, ...)."""


class InvalidInput(DatastoreError, ValueError):
    """A value or file that cannot be stored, with a message that says why."""


class Damaged(DatastoreError):
    """A stored file no longer matches what the index recorded for it (damaged on disk): it is not used."""


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _checked(rule):
    """A contract rule whose ValueError becomes the datastore's InvalidInput (a 4xx at the server)."""
    def check(value):
        try:
            return rule(value)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    check.__name__, check.__doc__ = rule.__name__, rule.__doc__
    return check


validate_author = _checked(contract.validate_author)
validate_version = _checked(contract.validate_version)
checked_case_id = _checked(contract.validate_case_id)
validate_uncertainty_kind = _checked(contract.validate_uncertainty_kind)
validate_threshold = _checked(contract.validate_threshold)


def image_suffix(filename: str) -> str:
    """The allowed image suffix of an upload's file name, or InvalidInput."""
    name = (filename or "").lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    raise InvalidInput(f"unsupported file type {filename!r}: upload one of {', '.join(IMAGE_SUFFIXES)}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_split(case_id: str, seed: str, ratios: tuple[float, float, float]) -> str:
    """Deterministic split from sha256(seed:case_id): the same id always lands in the same split."""
    u = int(hashlib.sha256(f"{seed}:{case_id}".encode()).hexdigest()[:12], 16) / float(16**12)
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "val"
    return "test"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


class StagedFolder:
    """A folder filled under a temporary name inside `parent` and published by one rename, so neither a reader nor a
    crash ever sees it half written; an existing folder is never replaced.

        with StagedFolder(parent) as staging:
            write_volume(label, staging.path / "label.nrrd")
            dest = staging.publish(prefix="r")        # parent/r0001, r0002, ... (or publish(name="..."))

    Every file in the folder is fsynced before the rename; if the block fails or never publishes, the folder goes.
    The folder holds WRITER_FILE, naming the process that wrote it: if that process dies before the folder is
    indexed, `Datastore.clean_interrupted` knows the folder for a leftover.
    """

    def __init__(self, parent: Path):
        self.parent = Path(parent)
        self.path: Path | None = None
        self.published: Path | None = None

    def __enter__(self) -> "StagedFolder":
        self.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=self.parent))
        (self.path / WRITER_FILE).write_text(writer_tag())
        return self

    def publish(self, name: str | None = None, *, prefix: str | None = None, width: int = 4) -> Path:
        """Rename to `parent/name`, or to the next free `parent/<prefix><n>`; two writers never share a number."""
        if (name is None) == (prefix is None):
            raise ValueError("publish takes a name or a prefix")
        for f in self.path.iterdir():
            if f.is_file():
                fsync_file(f)
        fsync_dir(self.path)
        if name is not None:
            os.rename(self.path, self.parent / name)
            self.published = self.parent / name
        else:
            self.published = self._rename_numbered(prefix, width)
        fsync_dir(self.parent)
        return self.published

    def _rename_numbered(self, prefix: str, width: int) -> Path:
        taken = [int(p.name[len(prefix):]) for p in self.parent.iterdir()
                 if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
        n = max(taken, default=0) + 1
        while True:
            dest = self.parent / f"{prefix}{n:0{width}d}"
            if not dest.exists():
                try:
                    os.rename(self.path, dest)  # fails on an existing non-empty folder: nothing is replaced
                    return dest
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
            n += 1

    def __exit__(self, *exc) -> None:
        if self.published is None:
            shutil.rmtree(self.path, ignore_errors=True)


def region_view(kind: str, threshold: float, min_voxels: int, max_regions: int) -> str:
    """The token that names one rank map of an inference, e.g. "entropy-t0.5000-m8-r50".

    The threshold is written with at least four decimals and as many more as it needs to read back as the same
    float, so two different thresholds never share a token (and a cached rank map is only reused for its own view).
    """
    validate_uncertainty_kind(kind)
    threshold = validate_threshold(threshold)
    digits = format(Decimal(repr(threshold)), "f")
    whole, _, frac = digits.partition(".")
    view = f"{kind}-t{whole}.{frac.ljust(4, '0')}-m{int(min_voxels)}-r{int(max_regions)}"
    if not REGION_VIEW_RE.match(view):
        raise InvalidInput(f"no region view for threshold {threshold}, min_voxels {min_voxels}, max_regions {max_regions}")
    return view


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(frozen=True)
class Candidate:
    """An unreviewed case `next_case` may serve: its id and its scores (None when never scored)."""

    case_id: str
    score: float | None
    score_sum: float | None


@dataclass
class CaseGrid:
    """Shape (z, y, x) and geometry of a registered image, kept in the index so labels are checked without reading it."""

    shape: tuple[int, int, int]
    geometry: Geometry

    def check(self, vol: Volume, what: str) -> None:
        if vol.shape != self.shape:
            raise InvalidInput(
                f"{what}: size {vol.shape[::-1]} does not match the image size {self.shape[::-1]} (x, y, z)"
            )
        if not self.geometry.matches(vol.geometry):
            g, h = vol.geometry, self.geometry
            raise InvalidInput(
                f"{what}: geometry does not match the image (spacing {tuple(np.round(g.spacing, 4))} vs "
                f"{tuple(np.round(h.spacing, 4))}, origin {tuple(np.round(g.origin, 3))} vs {tuple(np.round(h.origin, 3))}, "
                f"direction {'same' if np.allclose(g.direction, h.direction, atol=1e-4) else 'different'})"
            )


class Datastore:
    """One datastore folder. Thread-safe: each thread gets its own SQLite connection."""

    def __init__(self, root: str | os.PathLike, create: bool = False, split_ratios=(0.8, 0.2, 0.0),
                 split_seed: str | None = None):
        self.root = Path(root).resolve()
        self.index_dir = self.root / INDEX_DIR
        self.index_path = self.index_dir / "index.sqlite"
        if not self.index_path.is_file():
            if not create:
                raise FileNotFoundError(
                    f"{self.root} is not an SSLSegment datastore (no {INDEX_DIR}/index.sqlite); "
                    f"create one with `sslsegment import-datastore` or `sslsegment serve --datastore {self.root}`"
                )
            ratios = tuple(float(r) for r in split_ratios)
            if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
                raise InvalidInput(f"split ratios must be three non-negative numbers summing to 1, got {split_ratios}")
            self.index_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.index_dir, 0o700)
        self._local = threading.local()
        self.db.executescript(_SCHEMA)
        with self.transaction() as db:
            added = False
            for table, column, kind in _ADDED_COLUMNS:
                if column not in {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    added = True
            if added and self.get_meta(db, "schema_version") is not None:
                self.set_meta(db, "schema_version", SCHEMA_VERSION)
            if self.get_meta(db, "schema_version") is None:
                self.set_meta(db, "schema_version", SCHEMA_VERSION)
                self.set_meta(db, "split_seed", split_seed or secrets.token_hex(8))
                self.set_meta(db, "split_ratios", list(split_ratios))
                self.set_meta(db, "settings", DEFAULT_SETTINGS)
                self.set_meta(db, "created", time.time())
        for sub in ("labels/final", "labels/original", "labels/corrections", "models", "inference", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- SQLite plumbing ------------------------------------------------------------------------------------
    @property
    def upload_dir(self) -> Path:
        """Where the server spools uploads while it checks them (UPLOAD_PREFIX files; removed on every path)."""
        path = self.index_dir / "uploads"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.index_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            quota = index_quota_pages(conn)
            if quota is not None:
                conn.execute(f"PRAGMA max_page_count = {quota}")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self):
        """A write transaction taken up front (BEGIN IMMEDIATE), so read-then-write sequences are atomic."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL among them); a second ROLLBACK would fail and
            # hide the error that matters.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        else:
            try:
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @staticmethod
    def get_meta(db, key: str, default=None):
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    @staticmethod
    def set_meta(db, key: str, value) -> None:
        db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (key, json.dumps(value)))

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def abs(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if self.root not in p.parents:
            raise InvalidInput(f"indexed path {rel!r} leaves the datastore")
        return p

    # -- settings and token ---------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        return _merge(DEFAULT_SETTINGS, self.get_meta(self.db, "settings", {}))

    def update_settings(self, changes: dict) -> dict:
        unknown = [k for k in changes if k not in DEFAULT_SETTINGS]
        if unknown:
            raise InvalidInput(f"unknown setting(s) {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
        for key, value in changes.items():
            _check_setting(key, value)
        with self.transaction() as db:
            merged = _merge(_merge(DEFAULT_SETTINGS, self.get_meta(db, "settings", {})), changes)
            try:  # the group as it would be stored: a field may only be wrong together with another one
                RetrainSchedule.from_settings(merged["retrain"])
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"setting 'retrain': {exc}") from None
            self.set_meta(db, "settings", merged)
        return merged

    @property
    def split_seed(self) -> str:
        return self.get_meta(self.db, "split_seed")

    @property
    def split_ratios(self) -> tuple[float, float, float]:
        return tuple(self.get_meta(self.db, "split_ratios"))

    @property
    def token_path(self) -> Path:
        return self.index_dir / "token"

    def ensure_token(self) -> tuple[str, bool]:
        """The bearer token; generated (0600) on first use. Returns (token, created_now)."""
        path = self.token_path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip(), False
        token = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return token, True

    # -- cases ----------------------------------------------------------------------------------------------
    def register_image(self, source: str | os.PathLike, case_id: str | None = None, split: str | None = None,
                       filename: str | None = None, move: bool = False) -> tuple[dict, bool]:
        """Register an image file; returns (case, created). The file is validated (readable, 3D, sane spacing).

        case_id None: derived from the content ("case-" + sha256 prefix), so re-sending the same image is a no-op.
        split None: assigned from the hash of the id (fixed forever). move: the source is a temp file we may consume.
        """
        source = Path(source)
        suffix = image_suffix(filename or source.name)
        settings = self.settings
        try:
            vol = read_volume(source, max_voxels=int(settings["max_voxels"]),
                              max_expansion=float(settings["max_expansion"]) or None)
        except ImageError as exc:
            raise InvalidInput(str(exc).replace(str(source), filename or source.name)) from None
        digest = sha256_file(source)
        case_id = checked_case_id(case_id if case_id else f"case-{digest[:12]}")
        if split is not None and split not in SPLITS:
            raise InvalidInput(f"split must be one of {SPLITS}, got {split!r}")
        existing = self.db.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        if existing is not None:
            if existing["sha256"] == digest:
                return self.case(case_id), False
            raise Conflict(f"case id {case_id!r} is already registered with a different image")
        dest = self.root / f"{case_id}{suffix}"
        other = [p for p in (self.root / f"{case_id}{s}" for s in IMAGE_SUFFIXES) if p.exists()]
        if other and other[0] != dest:
            raise Conflict(f"an image file for {case_id!r} already exists ({other[0].name})")
        twin = None
        if not dest.exists():
            try:
                twin = self._place_file(source, dest, move=move)
            except FileExistsError:
                pass  # a concurrent upload for this id placed its file first: compared below
        placed = twin is not None
        try:
            if not placed and sha256_file(dest) != digest:
                if self.db.execute("SELECT 1 FROM cases WHERE case_id = ?", (case_id,)).fetchone():
                    raise Conflict(f"case id {case_id!r} is already registered with a different image")
                raise Conflict(f"{dest.name} exists with different content but is not indexed (another upload for "
                               f"{case_id!r} in flight, or a leftover: run datastore-check)")
            split = split or hash_split(case_id, self.split_seed, self.split_ratios)
            try:
                with self.transaction() as db:
                    existing = db.execute("SELECT sha256 FROM cases WHERE case_id = ?", (case_id,)).fetchone()
                    if existing is not None:  # a concurrent upload for this id was indexed first
                        if existing["sha256"] != digest:
                            raise Conflict(f"case id {case_id!r} is already registered with a different image")
                        return self.case(case_id), False
                    db.execute(
                        "INSERT INTO cases(case_id, split, image, sha256, shape, geometry, created) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (case_id, split, dest.name, digest, json.dumps(list(vol.shape)),
                         json.dumps(vol.geometry.to_dict()), time.time()),
                    )
            except BaseException:
                # Not indexed (disk or index full, ...): take back the file this call placed, unless a concurrent
                # identical upload indexed it meanwhile.
                if placed and not self.db.execute("SELECT 1 FROM cases WHERE image = ?", (dest.name,)).fetchone():
                    dest.unlink(missing_ok=True)
                raise
        finally:
            if twin is not None:
                twin.unlink(missing_ok=True)
        return self.case(case_id), True

    def _place_file(self, source: Path, dest: Path, move: bool) -> Path:
        """Put a file at `dest` atomically and never over an existing one (FileExistsError). Returns its twin: a
        hard link to it under this writer's temporary name, which the caller removes once the index row is
        committed. A writer that dies in between leaves the twin, so `clean_interrupted` knows `dest` for a leftover."""
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=dest.name, dir=dest.parent)
        os.close(fd)
        try:
            if move:
                os.replace(source, tmp)
            else:
                shutil.copyfile(source, tmp)
            fsync_file(Path(tmp))
            os.link(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def _case_row(self, case_id: str) -> sqlite3.Row:
        checked_case_id(case_id)
        row = self.db.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown case {case_id!r}")
        return row

    def grid(self, case_id: str) -> CaseGrid:
        row = self._case_row(case_id)
        return CaseGrid(tuple(json.loads(row["shape"])), Geometry.from_dict(json.loads(row["geometry"])))

    def image_path(self, case_id: str) -> Path:
        return self.abs(self._case_row(case_id)["image"])

    def load_image(self, case_id: str) -> Volume:
        return read_volume(self.image_path(case_id))

    def _case_dict(self, row: sqlite3.Row, counts: dict, leases: dict, now: float) -> dict:
        c = counts.get(row["case_id"], {})
        lease = leases.get(row["case_id"])
        geometry = json.loads(row["geometry"])
        return {
            "case_id": row["case_id"],
            "split": row["split"],
            "image": row["image"],
            "shape": json.loads(row["shape"]),
            "spacing": geometry["spacing"],
            "created": iso(row["created"]),
            "labeled": bool(c.get("final", 0)),
            "n_corrections": c.get("correction", 0),
            "n_revisions": sum(v for k, v in c.items() if k != "original"),
            "score": row["score"],
            "score_sum": row["score_sum"],
            "score_model_version": row["score_model"],
            "lease": ({"annotator": lease[0], "expires": iso(lease[1])} if lease and lease[1] > now else None),
        }

    def _counts(self, case_id: str | None = None) -> dict:
        q = "SELECT case_id, kind, COUNT(*) AS n FROM labels"
        rows = self.db.execute(q + (" WHERE case_id = ?" if case_id else "") + " GROUP BY case_id, kind",
                               (case_id,) if case_id else ()).fetchall()
        out: dict = {}
        for r in rows:
            out.setdefault(r["case_id"], {})[r["kind"]] = r["n"]
        return out

    def _leases(self) -> dict:
        return {r["case_id"]: (r["annotator"], r["expires"]) for r in self.db.execute("SELECT * FROM leases")}

    def case(self, case_id: str) -> dict:
        row = self._case_row(case_id)
        return self._case_dict(row, self._counts(case_id), self._leases(), time.time())

    def cases(self, split: str | None = None) -> list[dict]:
        if split is not None and split not in SPLITS:
            raise InvalidInput(f"split must be one of {SPLITS}, got {split!r}")
        rows = self.db.execute(
            "SELECT * FROM cases" + (" WHERE split = ?" if split else "") + " ORDER BY case_id", (split,) if split else ()
        ).fetchall()
        counts, leases, now = self._counts(), self._leases(), time.time()
        return [self._case_dict(r, counts, leases, now) for r in rows]

    def set_score(self, case_id: str, mean: float, total: float, model_version: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE cases SET score = ?, score_sum = ?, score_model = ?, score_time = ? WHERE case_id = ?",
                       (float(mean), float(total), model_version, time.time(), case_id))

    def unreviewed(self, split: str = "train") -> list[str]:
        """Cases of a split with no final label and no correction yet (what active learning serves)."""
        rows = self.db.execute(
            "SELECT case_id FROM cases WHERE split = ? AND case_id NOT IN "
            "(SELECT case_id FROM labels WHERE kind IN ('final', 'correction')) ORDER BY case_id", (split,)
        ).fetchall()
        return [r["case_id"] for r in rows]

    def next_case(self, strategy, annotator: str = "anonymous", split: str = "train") -> dict | None:
        """Pick the next case for `annotator` with a review-ordering strategy (training.strategies) and lease it;
        None when nothing is left.

        The candidates are the split's cases with no final label and no correction, except those leased by another
        annotator (unexpired); the annotator's own leased case stays a candidate, so asking again resumes it.
        """
        validate_author(annotator)
        if split not in SPLITS:
            raise InvalidInput(f"split must be one of {SPLITS}, got {split!r}")
        lease_s = float(self.settings["lease_s"])
        with self.transaction() as db:
            now = time.time()
            rows = db.execute(
                "SELECT c.case_id, c.score, c.score_sum FROM cases c LEFT JOIN leases l ON l.case_id = c.case_id "
                "WHERE c.split = ? AND c.case_id NOT IN (SELECT case_id FROM labels WHERE kind IN ('final', 'correction')) "
                "AND (l.case_id IS NULL OR l.expires <= ? OR l.annotator = ?)",
                (split, now, annotator),
            ).fetchall()
            if not rows:
                return None
            pick = strategy.pick([Candidate(r["case_id"], r["score"], r["score_sum"]) for r in rows])
            db.execute(
                "INSERT INTO leases(case_id, annotator, expires) VALUES (?, ?, ?) ON CONFLICT(case_id) DO UPDATE SET "
                "annotator = excluded.annotator, expires = excluded.expires", (pick, annotator, now + lease_s))
        out = self.case(pick)
        out["strategy"] = strategy.name
        out["lease_expires"] = out["lease"]["expires"] if out["lease"] else None
        return out

    def release_lease(self, case_id: str, annotator: str | None = None) -> bool:
        checked_case_id(case_id)
        with self.transaction() as db:
            if annotator is None:
                cur = db.execute("DELETE FROM leases WHERE case_id = ?", (case_id,))
            else:
                cur = db.execute("DELETE FROM leases WHERE case_id = ? AND annotator = ?", (case_id, annotator))
            return cur.rowcount > 0

    # -- labels ---------------------------------------------------------------------------------------------
    def read_label_upload(self, case_id: str, path: Path, what: str) -> Volume:
        """Read an uploaded label or mask and check it against the case's grid and the class count."""
        grid = self.grid(case_id)
        try:  # a label of this case has exactly its voxels: a header that declares more is refused undecoded
            vol = read_label(path, max_voxels=int(np.prod(grid.shape)))
        except ImageError as exc:
            raise InvalidInput(str(exc).replace(str(path), what)) from None
        grid.check(vol, what)
        return vol

    def add_label(self, case_id: str, label: Volume, kind: str = "final", author: str = "anonymous",
                  reviewed_mask: Volume | None = None, model_version: str | None = None,
                  inference_id: str | None = None, submission_id: str | None = None,
                  uncertainty_kind: str | None = None, threshold: float | None = None) -> tuple[dict, bool]:
        """Store one immutable label revision; returns (revision, created). A repeated submission_id returns the
        revision stored the first time.

        A correction archives the uncertainty map the annotator was shown: the `uncertainty_kind` map (default
        contract.DEFAULT_UNCERTAINTY) of inference `inference_id`, else of the newest inference of `model_version`;
        the kind and the region `threshold` are recorded with the revision."""
        checked_case_id(case_id)
        if kind not in LABEL_KINDS:
            raise InvalidInput(f"kind must be one of {LABEL_KINDS}, got {kind!r}")
        validate_author(author)
        if kind == "correction":
            uncertainty_kind = validate_uncertainty_kind(uncertainty_kind or contract.DEFAULT_UNCERTAINTY)
            threshold = None if threshold is None else validate_threshold(threshold)
        else:  # a whole label was not made against an uncertainty map
            uncertainty_kind = threshold = None
        if model_version is not None and model_version != "":
            validate_version(model_version)
            if self.db.execute("SELECT 1 FROM models WHERE version = ?", (model_version,)).fetchone() is None:
                raise InvalidInput(f"model_version {model_version!r} is not a model version of this datastore")
        else:
            model_version = None
        if submission_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{8,64}", submission_id):
            raise InvalidInput("submission_id must be 8-64 letters, digits, '_' or '-'")
        if submission_id:
            row = self.db.execute("SELECT * FROM labels WHERE submission_id = ?", (submission_id,)).fetchone()
            if row is not None:
                return self._replayed(row, case_id, kind, label, reviewed_mask), False
        grid = self.grid(case_id)
        grid.check(label, "label")
        n_classes = int(self.settings["num_classes"])
        lab = np.asarray(label.array)
        if lab.size and int(lab.max()) >= n_classes:
            raise InvalidInput(f"label values must be 0..{n_classes - 1}; found {sorted(np.unique(lab).tolist())[:10]}")
        lab = lab.astype(np.uint8)
        if kind == "correction":
            if reviewed_mask is None:
                raise InvalidInput("a correction needs a reviewed mask (1 = voxels the annotator reviewed or edited)")
            grid.check(reviewed_mask, "reviewed mask")
            mask = np.asarray(reviewed_mask.array)
            if not np.isin(mask, (0, 1)).all():
                raise InvalidInput("the reviewed mask must hold only 0 and 1")
            mask = mask.astype(np.uint8)
            if not mask.any():
                raise InvalidInput("the reviewed mask is empty: mark the voxels that were reviewed")
        else:
            if reviewed_mask is not None:
                raise InvalidInput(f"a {kind} label covers the whole case; send a reviewed mask only with corrections")
            mask = None
        geom = grid.geometry
        uncertainty_src = self._shown_uncertainty(case_id, inference_id, model_version,
                                                  uncertainty_kind or contract.DEFAULT_UNCERTAINTY)
        twin = None
        if kind == "correction":
            shown = {"uncertainty_kind": uncertainty_kind, "threshold": threshold}
            rel_label, rel_mask, rel_unc = self._write_correction(case_id, author, Volume(lab, geom), Volume(mask, geom),
                                                                  uncertainty_src, model_version, shown)
        else:
            (rel_label, twin), rel_mask, rel_unc = self._write_whole_label(case_id, kind, Volume(lab, geom)), None, None
        # This submission's own files: a correction's published folder, or a whole label's file.
        written = self.abs(rel_label).parent if kind == "correction" else self.abs(rel_label)
        try:
            digest = sha256_file(self.abs(rel_label))
            revision = self._index_label(case_id, kind, author, model_version, rel_label, rel_mask, rel_unc,
                                         uncertainty_kind, threshold, mask, lab, submission_id, digest,
                                         replay=lambda row: self._replayed(row, case_id, kind, label, reviewed_mask))
        except BaseException:
            self._discard(written)  # nothing indexed points at this submission's own files
            raise
        finally:
            if twin is not None:
                twin.unlink(missing_ok=True)
        if not revision[1]:
            self._discard(written)  # a concurrent retry won the race: its files are the indexed ones
        return revision

    def _replayed(self, row: sqlite3.Row, case_id: str, kind: str, label: Volume, mask: Volume | None) -> dict:
        """The stored revision of a submission id sent again: the same submission (a retry) is answered with it; the
        id sent with another case, kind or content is refused, since answering it would acknowledge a label that
        was never stored."""
        sid = row["submission_id"]
        if row["case_id"] != case_id or row["kind"] != kind:
            raise Conflict(f"submission {sid} was already used for another {'case' if row['case_id'] != case_id else 'kind'}")
        same = np.array_equal(read_label(self.abs(row["path"])).array, np.asarray(label.array, np.uint8))
        if same and row["reviewed_mask"]:
            same = mask is not None and np.array_equal(read_label(self.abs(row["reviewed_mask"])).array,
                                                       np.asarray(mask.array, np.uint8))
        if not same:
            raise Conflict(f"submission {sid} was already used for a different label or reviewed mask")
        return self._revision_dict(row)

    @staticmethod
    def _discard(path: Path) -> None:
        """Remove what one submission wrote and nothing indexed points at (its folder or its file)."""
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def _index_label(self, case_id, kind, author, model_version, rel_label, rel_mask, rel_unc, uncertainty_kind,
                     threshold, mask, lab, submission_id, digest, replay) -> tuple[dict, bool]:
        with self.transaction() as db:
            if submission_id:
                row = db.execute("SELECT * FROM labels WHERE submission_id = ?", (submission_id,)).fetchone()
                if row is not None:  # a concurrent request with this id was indexed first
                    return replay(row), False
            cur = db.execute(
                "INSERT INTO labels(case_id, kind, author, model_version, created, path, reviewed_mask, uncertainty, "
                "uncertainty_kind, threshold, reviewed_voxels, foreground_voxels, submission_id, sha256) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (case_id, kind, author, model_version, time.time(), rel_label, rel_mask, rel_unc, uncertainty_kind,
                 threshold, int(mask.sum()) if mask is not None else int(lab.size), int((lab > 0).sum()),
                 submission_id, digest),
            )
            db.execute("DELETE FROM leases WHERE case_id = ?", (case_id,))
            row = db.execute("SELECT * FROM labels WHERE revision = ?", (cur.lastrowid,)).fetchone()
        return self._revision_dict(row), True

    def _shown_uncertainty(self, case_id: str, inference_id: str | None, model_version: str | None,
                           kind: str) -> Path | None:
        """The `kind` map of the inference the annotator saw; None when no inference is named or known."""
        if inference_id:
            if not INFERENCE_ID_RE.match(inference_id):
                raise InvalidInput(f"invalid inference id {inference_id!r}")
            row = self.db.execute("SELECT * FROM inferences WHERE inference_id = ? AND case_id = ?",
                                  (inference_id, case_id)).fetchone()
            if row is None:
                raise InvalidInput(f"inference {inference_id} of case {case_id} is unknown")
        elif model_version:
            row = self.db.execute("SELECT * FROM inferences WHERE case_id = ? AND model_version = ? ORDER BY created DESC",
                                  (case_id, model_version)).fetchone()
        else:
            return None
        if row is None:
            return None
        path = self.abs(row["path"]) / f"{validate_uncertainty_kind(kind)}.nrrd"
        return path if path.is_file() else None

    def _write_whole_label(self, case_id: str, kind: str, label: Volume) -> tuple[str, Path]:
        """Write a final or original label as the case's next free `<case>[@n].nrrd`, never over another; returns
        its path and its twin (see `_place_file`), which the caller removes once the revision is indexed."""
        folder = self.root / "labels" / kind
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(), suffix=".nrrd", dir=folder)
        os.close(fd)
        twin = Path(name)
        try:
            write_volume(label, twin)  # fsynced
            n = 1
            while True:
                dest = folder / (f"{case_id}.nrrd" if n == 1 else f"{case_id}@{n}.nrrd")
                try:
                    os.link(twin, dest)  # fails on an existing file: a revision is never overwritten
                    break
                except FileExistsError:
                    n += 1
            fsync_dir(folder)
        except BaseException:
            twin.unlink(missing_ok=True)
            raise
        return self.rel(dest), twin

    def _write_correction(self, case_id: str, author: str, label: Volume, mask: Volume, uncertainty_src: Path | None,
                          model_version: str | None, shown: dict) -> tuple[str, str, str | None]:
        parent = self.root / "labels" / "corrections" / author / case_id
        has_unc = uncertainty_src is not None
        with StagedFolder(parent) as staging:
            write_volume(label, staging.path / "label.nrrd")
            write_volume(mask, staging.path / "reviewed_mask.nrrd")
            if has_unc:
                shutil.copyfile(uncertainty_src, staging.path / "uncertainty.nrrd")
            meta = {"case_id": case_id, "author": author, "model_version": model_version, "created": iso(time.time()),
                    "reviewed_voxels": int(mask.array.sum()), "foreground_voxels": int((label.array > 0).sum()),
                    "uncertainty_shown": has_unc, **shown}
            (staging.path / "revision.json").write_text(json.dumps(meta, indent=2))
            dest = staging.publish(prefix="r")
        return (self.rel(dest / "label.nrrd"), self.rel(dest / "reviewed_mask.nrrd"),
                self.rel(dest / "uncertainty.nrrd") if has_unc else None)

    def _revision_dict(self, row: sqlite3.Row) -> dict:
        files = {"label": row["path"]}
        if row["reviewed_mask"]:
            files["reviewed_mask"] = row["reviewed_mask"]
        if row["uncertainty"]:
            files["uncertainty"] = row["uncertainty"]
        return {
            "revision": row["revision"], "case_id": row["case_id"], "kind": row["kind"], "author": row["author"],
            "model_version": row["model_version"], "created": iso(row["created"]), "files": files,
            "reviewed_voxels": row["reviewed_voxels"], "foreground_voxels": row["foreground_voxels"],
            "uncertainty_kind": row["uncertainty_kind"], "threshold": row["threshold"],
        }

    # -- exclusions: out of training, files kept, every change recorded -------------------------------------
    def exclude(self, case_id: str, reason: str, author: str, revision: int | None = None) -> dict:
        """Take a case (every revision of it, and the case as unlabeled or validation data) or one of its label
        revisions out of training from the next job on; nothing is deleted. Returns the exclusion record."""
        validate_author(author)
        reason = _checked_reason(reason)
        self._case_row(case_id)
        with self.transaction() as db:
            if revision is not None:
                row = db.execute("SELECT case_id FROM labels WHERE revision = ?", (int(revision),)).fetchone()
                if row is None or row["case_id"] != case_id:
                    raise NotFound(f"case {case_id!r} has no label revision {revision}")
            active = db.execute("SELECT id FROM exclusions WHERE case_id = ? AND revision IS ? AND lifted IS NULL",
                                (case_id, revision)).fetchone()
            if active is not None:
                raise Conflict(f"already excluded (exclusion {active['id']})")
            cur = db.execute("INSERT INTO exclusions(case_id, revision, reason, author, created) VALUES (?,?,?,?,?)",
                             (case_id, revision, reason, author, time.time()))
            return self._exclusion_dict(db.execute("SELECT * FROM exclusions WHERE id = ?", (cur.lastrowid,)).fetchone())

    def lift_exclusion(self, exclusion_id: int, author: str, reason: str) -> dict:
        """Put an excluded case or revision back into training; the record stays, with who lifted it and why."""
        validate_author(author)
        reason = _checked_reason(reason)
        with self.transaction() as db:
            row = db.execute("SELECT * FROM exclusions WHERE id = ?", (int(exclusion_id),)).fetchone()
            if row is None:
                raise NotFound(f"no exclusion {exclusion_id}")
            if row["lifted"] is not None:
                raise Conflict(f"exclusion {exclusion_id} was lifted already")
            db.execute("UPDATE exclusions SET lifted = ?, lifted_by = ?, lift_reason = ? WHERE id = ?",
                       (time.time(), author, reason, int(exclusion_id)))
            return self._exclusion_dict(db.execute("SELECT * FROM exclusions WHERE id = ?", (int(exclusion_id),)).fetchone())

    def exclusions(self, active_only: bool = False) -> list[dict]:
        """Every exclusion ever made, oldest first (the audit trail); active_only: those in force."""
        q = "SELECT * FROM exclusions" + (" WHERE lifted IS NULL" if active_only else "") + " ORDER BY id"
        return [self._exclusion_dict(r) for r in self.db.execute(q)]

    @staticmethod
    def _exclusion_dict(row: sqlite3.Row) -> dict:
        return {"id": row["id"], "case_id": row["case_id"], "revision": row["revision"], "reason": row["reason"],
                "author": row["author"], "created": iso(row["created"]), "active": row["lifted"] is None,
                "lifted": iso(row["lifted"]) if row["lifted"] is not None else None, "lifted_by": row["lifted_by"],
                "lift_reason": row["lift_reason"]}

    def revisions(self, case_id: str) -> list[dict]:
        self._case_row(case_id)
        rows = self.db.execute("SELECT * FROM labels WHERE case_id = ? ORDER BY revision", (case_id,)).fetchall()
        return [self._revision_dict(r) for r in rows]

    def revision_file(self, case_id: str, revision: int, name: str) -> Path:
        if name not in ("label", "reviewed_mask", "uncertainty"):
            raise InvalidInput(f"revision file must be label, reviewed_mask or uncertainty; got {name!r}")
        self._case_row(case_id)
        row = self.db.execute("SELECT * FROM labels WHERE case_id = ? AND revision = ?", (case_id, int(revision))).fetchone()
        if row is None:
            raise NotFound(f"case {case_id!r} has no revision {revision}")
        rel = {"label": row["path"], "reviewed_mask": row["reviewed_mask"], "uncertainty": row["uncertainty"]}[name]
        if not rel:
            raise NotFound(f"revision {revision} of {case_id!r} has no {name}")
        return self.abs(rel)

    def corrections_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM labels WHERE kind = 'correction'").fetchone()[0]

    # -- inference cache ------------------------------------------------------------------------------------
    def inference_dir(self, case_id: str, inference_id: str) -> Path:
        checked_case_id(case_id)
        if not INFERENCE_ID_RE.match(inference_id or ""):
            raise InvalidInput(f"invalid inference id {inference_id!r}")
        row = self.db.execute("SELECT path FROM inferences WHERE inference_id = ? AND case_id = ?",
                              (inference_id, case_id)).fetchone()
        if row is None:
            raise NotFound(f"case {case_id!r} has no inference {inference_id}")
        return self.abs(row["path"])

    def find_inference(self, case_id: str, model_version: str, passes: int) -> dict | None:
        """The newest cached inference of (case, model version, passes): its inference.json, or None. An entry holds
        every uncertainty map, so it serves any kind."""
        row = self.db.execute("SELECT * FROM inferences WHERE case_id = ? AND model_version = ? AND passes = ? "
                              "ORDER BY created DESC", (case_id, model_version, int(passes))).fetchone()
        if row is None or not (self.abs(row["path"]) / "inference.json").is_file():
            return None
        return json.loads((self.abs(row["path"]) / "inference.json").read_text())

    def add_inference(self, case_id: str, model_version: str, passes: int, volumes: dict[str, Volume], meta: dict) -> dict:
        """Cache one inference's volumes under inference/<case>/<id>/ (folder renamed into place, then indexed).

        meta: what describes every map (it must not depend on the kind a request asked for); its "score"
        {"mean", "sum"} is indexed with the entry."""
        inference_id = uuid.uuid4().hex[:16]
        with StagedFolder(self.root / "inference" / case_id) as staging:
            for name, vol in volumes.items():
                write_volume(vol, staging.path / f"{name}.nrrd")
            meta = {**meta, "inference_id": inference_id, "case_id": case_id, "model_version": model_version,
                    "passes": int(passes), "created": iso(time.time())}
            (staging.path / "inference.json").write_text(json.dumps(meta))
            dest = staging.publish(inference_id)
        try:
            with self.transaction() as db:
                db.execute("INSERT INTO inferences(inference_id, case_id, model_version, passes, created, path, "
                           "uncertainty_mean, uncertainty_sum) VALUES (?,?,?,?,?,?,?,?)",
                           (inference_id, case_id, model_version, int(passes), time.time(), self.rel(dest),
                            (meta.get("score") or {}).get("mean"), (meta.get("score") or {}).get("sum")))
        except BaseException:
            self._discard(dest)  # not indexed: nothing may point at it
            raise
        return meta

    def inference_volume(self, case_id: str, inference_id: str, name: str) -> Path:
        """One stored map of an inference: label, probability or an uncertainty kind."""
        if name not in ("label", "probability", *contract.UNCERTAINTY_KINDS):
            raise NotFound(f"an inference has no volume {name!r}")
        path = self.inference_dir(case_id, inference_id) / f"{name}.nrrd"
        if not path.is_file():
            raise NotFound(f"inference {inference_id} of {case_id!r} has no {name} volume")
        return path

    def region_map_path(self, case_id: str, inference_id: str, view: str) -> Path:
        """Where the rank map of one region view of an inference lives (it may not exist yet). The view must be
        exactly what `region_view` makes, so the name can never leave the inference folder."""
        if not isinstance(view, str) or not REGION_VIEW_RE.match(view):
            raise NotFound(f"unknown region view {view!r}")
        folder = self.inference_dir(case_id, inference_id)
        path = folder / f"regions-{view}.nrrd"
        if path.resolve().parent != folder.resolve():
            raise NotFound(f"unknown region view {view!r}")
        return path

    def put_region_map(self, case_id: str, inference_id: str, view: str, rank_map: Volume) -> Path:
        """Store a view's rank map (int32, the image's grid) atomically; an existing one is kept, since a view's map
        is a pure function of the stored uncertainty map and the view's parameters."""
        path = self.region_map_path(case_id, inference_id, view)
        if not path.is_file():
            write_volume(Volume(np.asarray(rank_map.array, np.int32), rank_map.geometry), path)
        return path

    def region_map(self, case_id: str, inference_id: str, view: str) -> Path:
        """The stored rank map of a view; NotFound when the view is ill-formed or was never computed."""
        path = self.region_map_path(case_id, inference_id, view)
        if not path.is_file():
            raise NotFound(f"inference {inference_id} of {case_id!r} has no region map {view!r}")
        return path

    # -- jobs -----------------------------------------------------------------------------------------------
    def create_job(self, params: dict, trigger: str = "manual", kind: str = "train") -> dict:
        job_id = uuid.uuid4().hex[:12]
        with self.transaction() as db:
            db.execute("INSERT INTO jobs(job_id, kind, status, params, trigger, created, corrections_seen) "
                       "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                       (job_id, kind, json.dumps(params), trigger, time.time(), self.corrections_count()))
        return self.job(job_id)

    def maybe_queue_retrain(self) -> dict | None:
        """Queue a training job when `retrain_every` corrections arrived since the last queued one (and none is
        pending); returns the new job or None."""
        n = int(self.settings["retrain_every"])
        if n <= 0:
            return None
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE kind = 'train' AND status IN ('queued', 'running')").fetchone():
                return None
            last = db.execute("SELECT MAX(corrections_seen) FROM jobs WHERE kind = 'train'").fetchone()[0] or 0
            total = db.execute("SELECT COUNT(*) FROM labels WHERE kind = 'correction'").fetchone()[0]
            if total - last < n:
                return None
            job_id = uuid.uuid4().hex[:12]
            db.execute("INSERT INTO jobs(job_id, kind, status, params, trigger, created, corrections_seen) "
                       "VALUES (?, 'train', 'queued', '{}', 'corrections', ?, ?)", (job_id, time.time(), total))
        return self.job(job_id)

    def _job_row(self, job_id: str) -> sqlite3.Row:
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise InvalidInput(f"invalid job id {job_id!r}")
        row = self.db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown job {job_id!r}")
        return row

    @staticmethod
    def _job_dict(row: sqlite3.Row) -> dict:
        load = lambda v, d=None: json.loads(v) if v else d  # noqa: E731
        return {
            "job_id": row["job_id"], "kind": row["kind"], "status": row["status"], "params": load(row["params"], {}),
            "trigger": row["trigger"], "created": iso(row["created"]), "started": iso(row["started"]),
            "finished": iso(row["finished"]), "heartbeat": iso(row["heartbeat"]), "worker": row["worker"],
            "attempts": row["attempts"], "cancel_requested": bool(row["cancel_requested"]),
            "progress": load(row["progress"]), "history": load(row["history"], []), "result": load(row["result"]),
            "error": row["error"],
        }

    def job(self, job_id: str) -> dict:
        return self._job_dict(self._job_row(job_id))

    def jobs(self, status: str | None = None) -> list[dict]:
        if status is not None and status not in JOB_STATES:
            raise InvalidInput(f"status must be one of {JOB_STATES}, got {status!r}")
        rows = self.db.execute("SELECT * FROM jobs" + (" WHERE status = ?" if status else "") + " ORDER BY created DESC",
                               (status,) if status else ()).fetchall()
        return [self._job_dict(r) for r in rows]

    def claim_job(self, worker: str) -> dict | None:
        """Atomically move the oldest queued job to running for this worker (BEGIN IMMEDIATE serialises claimers)."""
        with self.transaction() as db:
            row = db.execute("SELECT job_id FROM jobs WHERE status = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute("UPDATE jobs SET status = 'running', worker = ?, host = ?, pid = ?, started = ?, heartbeat = ?, "
                       "attempts = attempts + 1, progress = NULL, history = NULL, error = NULL WHERE job_id = ?",
                       (worker, socket.gethostname(), os.getpid(), now, now, row["job_id"]))
        return self.job(row["job_id"])

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Refresh a running job's heartbeat; returns whether cancellation was requested (or the job was taken)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET heartbeat = ? WHERE job_id = ? AND worker = ? AND status = 'running'",
                       (time.time(), job_id, worker))
            row = db.execute("SELECT status, worker, cancel_requested FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bool(row["cancel_requested"]) or row["status"] != "running" or row["worker"] != worker

    def update_progress(self, job_id: str, progress: dict, history: list | None = None) -> None:
        with self.transaction() as db:
            if history is None:
                db.execute("UPDATE jobs SET progress = ?, heartbeat = ? WHERE job_id = ?",
                           (json.dumps(progress), time.time(), job_id))
            else:
                db.execute("UPDATE jobs SET progress = ?, history = ?, heartbeat = ? WHERE job_id = ?",
                           (json.dumps(progress), json.dumps(history), time.time(), job_id))

    def finish_job(self, job_id: str, status: str, result: dict | None = None, error: str | None = None,
                   worker: str | None = None) -> bool:
        """End a running job; returns False when this worker no longer owns it (it was recovered meanwhile)."""
        if status not in FINISHED_STATES:
            raise ValueError(f"finish status must be one of {FINISHED_STATES}")
        with self.transaction() as db:
            q = "UPDATE jobs SET status = ?, finished = ?, result = ?, error = ? WHERE job_id = ? AND status = 'running'"
            args = [status, time.time(), json.dumps(result) if result is not None else None, error, job_id]
            if worker is not None:
                q += " AND worker = ?"
                args.append(worker)
            return db.execute(q, args).rowcount == 1

    def request_cancel(self, job_id: str) -> dict:
        row = self._job_row(job_id)
        with self.transaction() as db:
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, cancel_requested = 1, "
                           "error = 'cancelled before it started' WHERE job_id = ? AND status = 'queued'",
                           (time.time(), job_id))
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ? AND status IN ('queued', 'running')",
                       (job_id,))
        return self.job(job_id)

    def recover_stale_jobs(self, stale_after_s: float = 60.0, max_attempts: int = 2) -> list[dict]:
        """Running jobs whose worker is gone: re-queue them (or fail them after max_attempts).

        A worker is gone when it ran on this host and its process no longer exists, or when its heartbeat is older
        than `stale_after_s` (another host, or a hung process)."""
        host, now = socket.gethostname(), time.time()
        recovered = []
        if self.db.execute("SELECT 1 FROM jobs WHERE status = 'running' LIMIT 1").fetchone() is None:
            return recovered  # the common idle case: no write transaction, no fsync
        with self.transaction() as db:
            for row in db.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall():
                dead = row["host"] == host and row["pid"] is not None and not _pid_alive(row["pid"])
                stale = (row["heartbeat"] or 0) < now - stale_after_s
                if not (dead or stale):
                    continue
                why = "its worker process died" if dead else f"no heartbeat for {now - (row['heartbeat'] or 0):.0f} s"
                if row["cancel_requested"]:
                    db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, error = ? WHERE job_id = ?",
                               (now, f"cancelled; {why}", row["job_id"]))
                elif row["attempts"] >= max_attempts:
                    db.execute("UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE job_id = ?",
                               (now, f"worker lost ({why}) after {row['attempts']} attempt(s)", row["job_id"]))
                else:
                    db.execute("UPDATE jobs SET status = 'queued', worker = NULL, pid = NULL, heartbeat = NULL, "
                               "error = ? WHERE job_id = ?", (f"re-queued: {why}", row["job_id"]))
                recovered.append({"job_id": row["job_id"], "reason": why})
        return recovered

    def job_dir(self, job_id: str) -> Path:
        self._job_row(job_id)
        return self.root / "jobs" / job_id

    # -- consistency ----------------------------------------------------------------------------------------
    def _indexed_paths(self) -> set[str]:
        indexed = set()
        for r in self.db.execute("SELECT path, reviewed_mask, uncertainty FROM labels"):
            indexed.update(p for p in r if p)
        indexed.update(r["path"] for r in self.db.execute("SELECT path FROM models"))
        indexed.update(r["image"] for r in self.db.execute("SELECT image FROM cases"))
        indexed.update(r["path"] for r in self.db.execute("SELECT path FROM inferences"))
        return indexed

    @staticmethod
    def _coverage(indexed: set[str]):
        """A test of whether the index points at a path, at a file inside it, or at a folder holding it."""
        holders = {"/".join(p.split("/")[:i]) for p in indexed for i in range(1, p.count("/") + 1)}

        def covered(rel: str) -> bool:
            parts = rel.split("/")
            return rel in holders or any("/".join(parts[:i]) in indexed for i in range(1, len(parts) + 1))
        return covered

    @staticmethod
    def _writer_gone(host: str, pid: str) -> bool:
        """A writer is known to be gone when it ran on this host and its process no longer exists; one on another
        host (a datastore on a shared disk) is never presumed dead."""
        return host == HOST_TAG and not _pid_alive(int(pid))

    def interrupted_writes(self) -> list[tuple[Path, str]]:
        """What writers that died mid-write left, as (path, why): their staging folders and temporary files, their
        spooled uploads, and what they had published but not yet indexed (a file whose twin they still held, a
        folder naming them in WRITER_FILE). Only writers known to be gone (`_writer_gone`) count."""
        found: list[tuple[Path, str]] = []
        covered = self._coverage(self._indexed_paths())
        for p in self.upload_dir.iterdir():
            m = UPLOAD_RE.match(p.name)
            if m and self._writer_gone(m["host"], m["pid"]):
                found.append((p, "spooled upload"))
        temps = [p for p in self.root.iterdir() if p.name.startswith(".tmp-")]
        published = []
        for sub in ("labels", "models", "inference"):
            for folder, dirs, files in os.walk(self.root / sub):
                here = Path(folder)
                temps += [here / n for n in dirs + files if n.startswith(".tmp-")]
                dirs[:] = [d for d in dirs if not d.startswith(".tmp-")]
                if WRITER_FILE in files:
                    published.append(here)
        for p in temps:
            m = TEMP_RE.match(p.name)
            if not (m and self._writer_gone(m["host"], m["pid"])):
                continue
            if p.is_file() and p.stat().st_nlink > 1:  # the twin of a file placed but maybe never indexed
                ino = p.stat().st_ino
                for q in p.parent.iterdir():
                    if q != p and not q.name.startswith(".") and q.is_file() and q.stat().st_ino == ino \
                            and not covered(self.rel(q)):
                        found.append((q, "placed, never indexed"))
            found.append((p, "staging"))
        for folder in published:
            try:
                host, _, pid = (folder / WRITER_FILE).read_text().strip().partition("-")
            except OSError:
                continue
            if pid.isdigit() and self._writer_gone(host, pid) and not covered(self.rel(folder)):
                found.append((folder, "published, never indexed"))
        return found

    def clean_interrupted(self) -> list[str]:
        """Remove what `interrupted_writes` finds; returns the paths removed (relative). The server and the worker
        run it when they start, so a crash leaves nothing behind once they are back."""
        removed = []
        for path, _ in self.interrupted_writes():
            self._discard(path)
            removed.append(self.rel(path))
        return removed

    def check(self, clean: bool = False) -> dict:
        """Report (and with clean=True remove) leftovers of interrupted writes: staging folders/files, spooled
        uploads, and files that are not indexed. Indexed files that are missing are errors. Never touches an
        indexed file, nor what a live writer is writing."""
        report = {"integrity": self.db.execute("PRAGMA integrity_check").fetchone()[0], "staging": [], "unindexed": [],
                  "missing": []}
        indexed = self._indexed_paths()
        for rel in indexed:
            if not (self.root / rel).exists():
                report["missing"].append(rel)
        staging = [p for p in self.root.iterdir() if p.name.startswith(".tmp-")]
        for sub in ("labels", "models", "inference"):
            staging += [p for p in (self.root / sub).rglob(".tmp-*") if ".tmp-" not in self.rel(p.parent)]
        report["staging"] = sorted(self.rel(p) for p in staging)
        for p in (self.root / "labels").rglob("*.nrrd"):
            rel = self.rel(p)
            if ".tmp-" not in rel and rel not in indexed:
                report["unindexed"].append(rel)
        for p in (self.root / "models").glob("v*/model.pt"):
            if self.rel(p) not in indexed:
                report["unindexed"].append(self.rel(p))
        # Uploads a killed server left behind; a younger one may belong to a request in flight.
        now = time.time()
        uploads = [p for p in self.upload_dir.glob(f"{UPLOAD_PREFIX}*") if p.is_file()]
        report["uploads"] = sorted(self.rel(p) for p in uploads)
        report["interrupted"] = sorted(self.rel(p) for p, _ in self.interrupted_writes())
        if clean:
            self.clean_interrupted()
            for p in staging:
                m = TEMP_RE.match(p.name)
                if m is None or self._writer_gone(m["host"], m["pid"]):  # a live writer's is in flight: kept
                    self._discard(p)
            for p in uploads:
                if p.exists() and now - p.stat().st_mtime > UPLOAD_STALE_S:
                    p.unlink(missing_ok=True)
        report["ok"] = report["integrity"] == "ok" and not report["missing"]
        return report

    def summary(self) -> dict:
        db = self.db
        splits = {s: 0 for s in SPLITS}
        for r in db.execute("SELECT split, COUNT(*) AS n FROM cases GROUP BY split"):
            splits[r["split"]] = r["n"]
        jobs = {r["status"]: r["n"] for r in db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}
        return {
            "n_cases": sum(splits.values()),
            "splits": splits,
            "n_labeled": db.execute("SELECT COUNT(DISTINCT case_id) FROM labels WHERE kind = 'final'").fetchone()[0],
            "n_corrections": self.corrections_count(),
            "jobs": jobs,
        }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed but not yet reaped by its parent) still answers kill(0); it is dead all the same.
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def import_folder(store: Datastore, source: str | os.PathLike, labels: str = "all", author: str = "import",
                  progress: bool = False) -> dict:
    """Import a MONAI-Label-style or phantom folder (images at the root, labels/final/<id>.*, optional
    labels/original/<id>.*, optional dataset.json with splits) in one call.

    labels: which final labels to import: "all", "none", "val" (only the validation split's: the usual start for
    active learning, the train split left to annotate), "val+test", or "train:N" (the first N train cases plus val).
    Splits come from dataset.json when present (kept as they are), else from the datastore's hash rule.
    """
    src = Path(source)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    meta_path = src / "dataset.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    images = {strip_suffix(p.name): p for p in sorted(src.iterdir())
              if p.is_file() and p.name.endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")}
    if not images:
        raise FileNotFoundError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) at the top level")

    def label_files(kind: str) -> dict:
        d = src / "labels" / kind
        return {strip_suffix(p.name): p for p in sorted(d.iterdir()) if p.name.endswith(IMAGE_SUFFIXES)} if d.is_dir() else {}

    finals, originals = label_files("final"), label_files("original")
    split_of = {cid: s for s, ids in (meta.get("splits") or {}).items() if s in SPLITS for cid in ids}
    n_train_labeled = None
    if labels.startswith("train:"):
        n_train_labeled = int(labels.split(":", 1)[1])
    elif labels not in ("all", "none", "val", "val+test"):
        raise InvalidInput(f"labels must be all, none, val, val+test or train:N; got {labels!r}")
    out = {"registered": 0, "existing": 0, "labels": 0, "originals": 0}
    train_seen = 0
    items = list(images.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="import", unit="case")
    for cid, path in items:
        case, created = store.register_image(path, case_id=checked_case_id(cid), split=split_of.get(cid))
        out["registered" if created else "existing"] += 1
        split = case["split"]
        want = labels == "all" or (labels == "val" and split == "val") or (
            labels == "val+test" and split in ("val", "test"))
        if n_train_labeled is not None:
            want = split == "val" or (split == "train" and train_seen < n_train_labeled)
        if split == "train":
            train_seen += 1
        has_final = any(r["kind"] == "final" for r in store.revisions(cid))
        if want and cid in finals and not has_final:
            store.add_label(cid, store.read_label_upload(cid, finals[cid], finals[cid].name), kind="final", author=author)
            out["labels"] += 1
        if cid in originals and not any(r["kind"] == "original" for r in store.revisions(cid)):
            store.add_label(cid, store.read_label_upload(cid, originals[cid], originals[cid].name), kind="original",
                            author=author)
            out["originals"] += 1
    return out

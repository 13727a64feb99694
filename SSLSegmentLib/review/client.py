"""HTTP client for the SSLSegment backend (`sslsegment serve`), standard library only.

Slicer's bundled Python can import this module without installing anything: it uses `urllib`, `json` and `uuid`
(for multipart boundaries). Every route of the REST contract in docs/backend.md has one method here.

    client = SSLSegmentClient("http://127.0.0.1:8765", token="...")
    case = client.next_case(annotator="alice")            # None when every case is reviewed or held by others
    result = client.infer(case["case_id"], "/tmp/out")     # label, the uncertainty map and the region map (.nrrd)
    client.submit_label(case["case_id"], "/tmp/fixed.nrrd", kind="correction",
                        reviewed_mask_path="/tmp/reviewed.nrrd", model_version=result["model_version"], author="alice",
                        inference_id=result["inference_id"], uncertainty_kind=result["uncertainty_kind"],
                        threshold=result["threshold"])

Errors carry the server's message: `AuthError` (401/403), `NotFoundError` (404), `ValidationError` (400/413/415/422),
`ConflictError` (409), any other status as `BackendError`, and `BackendUnavailable` when the server cannot be
reached after `retries` attempts (only connection failures are retried, never an answered request; a request
that is not safe to repeat, like starting a training job, is retried only when the connection was refused).
Label submissions carry a submission id and uploads without a case id get a content-derived id, so their retries
are stored once.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

API_PREFIX = "/api/v1"

__all__ = [
    "SSLSegmentClient",
    "BackendError",
    "AuthError",
    "NotFoundError",
    "ValidationError",
    "ConflictError",
    "BackendUnavailable",
]


class BackendError(Exception):
    """The backend answered with an error status. `status` is the HTTP status (None if there was no answer)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.status = status
        self.message = message


class AuthError(BackendError):
    """Missing or wrong token (401/403)."""


class NotFoundError(BackendError):
    """Unknown case, revision, job or model version (404)."""


class ValidationError(BackendError):
    """The request or an uploaded file was rejected (400, 413, 415, 422); the message says what is wrong."""


class ConflictError(BackendError):
    """The request conflicts with the backend's state (409), e.g. inference before any model version exists."""


class BackendUnavailable(BackendError):
    """The server could not be reached (connection refused, reset or timed out) after all retries."""

    def __init__(self, message: str):
        super().__init__(None, message)


_STATUS_ERRORS = {401: AuthError, 403: AuthError, 404: NotFoundError, 409: ConflictError,
                  400: ValidationError, 413: ValidationError, 415: ValidationError, 422: ValidationError}


def _error_for(status: int, body: bytes) -> BackendError:
    message = ""
    try:
        payload = json.loads(body.decode("utf-8"))
        detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
        if isinstance(detail, list):  # FastAPI's request-validation errors: [{loc, msg, ...}]
            message = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []) if p != 'body')}: {d.get('msg', d)}" if isinstance(d, dict)
                else str(d) for d in detail
            )
        else:
            message = str(detail)
    except (ValueError, UnicodeDecodeError, AttributeError):
        message = body[:500].decode("utf-8", "replace").strip()
    return _STATUS_ERRORS.get(status, BackendError)(status, message or f"HTTP {status}")


class _Multipart:
    """multipart/form-data body: text fields and files (read into memory; volumes are tens of MB at most)."""

    def __init__(self):
        self.boundary = uuid.uuid4().hex
        self.parts: list[bytes] = []

    def field(self, name: str, value) -> "_Multipart":
        if value is None:
            return self
        self.parts.append(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + str(value).encode() + b"\r\n"
        )
        return self

    def file(self, name: str, path: str | os.PathLike, filename: str | None = None) -> "_Multipart":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        fname = (filename or path.name).replace('"', "_")
        head = (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{fname}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self.parts.append(head + path.read_bytes() + b"\r\n")
        return self

    def body(self) -> bytes:
        return b"".join(self.parts) + f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"


class SSLSegmentClient:
    """Client for one backend.

    base_url: e.g. "http://127.0.0.1:8765" (the /api/v1 prefix is added). token: the bearer token printed by
    `sslsegment serve` (or `sslsegment token --datastore DIR`). timeout: seconds per request (inference and
    downloads may take longer: they get max(timeout, 300) unless given their own). retries: attempts on
    connection errors, with a short back-off.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0, retries: int = 3):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if retries < 1:
            raise ValueError(f"retries must be at least 1, got {retries}")
        base = base_url.rstrip("/")
        if base.endswith(API_PREFIX):
            base = base[: -len(API_PREFIX)]
        self.base_url = base
        self.token = token
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff_s = 0.25

    # -- transport -----------------------------------------------------------------------------------------
    def _url(self, path: str, query: dict | None = None) -> str:
        url = f"{self.base_url}{API_PREFIX}{path}"
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                url += "?" + urllib.parse.urlencode(q)
        return url

    def _open(self, method: str, path: str, *, query=None, body: bytes | None = None, content_type: str | None = None,
              timeout: float | None = None, auth: bool = True, idempotent: bool = True):
        """One request with retries on connection errors. A non-idempotent request is retried only when the
        connection was refused (so it certainly never arrived), never after a timeout or a reset mid-request."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self._url(path, query)
        last: Exception | None = None
        for attempt in range(self.retries):
            req = urllib.request.Request(url, data=body, method=method, headers=headers)
            try:
                return urllib.request.urlopen(req, timeout=timeout or self.timeout)
            except urllib.error.HTTPError as exc:
                with exc:
                    raise _error_for(exc.code, exc.read()) from None
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as exc:
                last = exc
                refused = isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
                if not idempotent and not refused:
                    break
                if attempt + 1 < self.retries:
                    time.sleep(self.backoff_s * (2**attempt))
        reason = getattr(last, "reason", last)
        raise BackendUnavailable(f"cannot reach the SSLSegment backend at {self.base_url} after {attempt + 1} attempts: {reason}")

    def _json(self, method: str, path: str, *, query=None, payload=None, form: _Multipart | None = None,
              timeout: float | None = None, auth: bool = True, idempotent: bool = True):
        body, ctype = None, None
        if form is not None:
            body, ctype = form.body(), form.content_type
        elif payload is not None:
            body, ctype = json.dumps(payload).encode("utf-8"), "application/json"
        elif method in ("POST", "PUT"):
            body = b""
        with self._open(method, path, query=query, body=body, content_type=ctype, timeout=timeout, auth=auth,
                        idempotent=idempotent) as resp:
            status, raw = resp.status, resp.read()
        if status == 204 or not raw:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            raise BackendError(status, f"the backend sent a non-JSON answer to {method} {path}") from None

    def _download(self, path: str, dest_path: str | os.PathLike, timeout: float | None = None) -> Path:
        """Stream a file to a temporary name next to `dest_path`, then rename it into place."""
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._open("GET", path, timeout=timeout or max(self.timeout, 300.0)) as resp:
            fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=dest.name, dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    while True:
                        chunk = resp.read(1 << 20)
                        if not chunk:
                            break
                        fh.write(chunk)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return dest

    @staticmethod
    def _quote(value: str) -> str:
        return urllib.parse.quote(str(value), safe="")

    # -- server ---------------------------------------------------------------------------------------------
    def health(self) -> dict:
        """Liveness; needs no token. {"status": "ok", "version", "api"}."""
        return self._json("GET", "/health", auth=False)

    def info(self) -> dict:
        """Server, datastore and model summary: version, current_model, counts, settings, upload limit."""
        return self._json("GET", "/info")

    def wait_until_healthy(self, timeout: float = 60.0, poll_s: float = 0.2) -> dict:
        """Poll /health until the server answers (for freshly started servers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except BackendUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(poll_s)

    # -- cases ----------------------------------------------------------------------------------------------
    def list_cases(self, split: str | None = None) -> list[dict]:
        """Every registered case (optionally one split): case_id, split, labeled, n_corrections, score, ..."""
        return self._json("GET", "/cases", query={"split": split})["cases"]

    def get_case(self, case_id: str) -> dict:
        return self._json("GET", f"/cases/{self._quote(case_id)}")

    def next_case(self, strategy: str = "uncertainty", annotator: str = "anonymous", split: str | None = None) -> dict | None:
        """The next case to review (a lease is taken for `annotator`), or None when nothing is left to review."""
        return self._json("GET", "/cases/next", query={"strategy": strategy, "annotator": annotator, "split": split})

    def release_case(self, case_id: str, annotator: str = "anonymous") -> dict:
        """Give a leased case back without submitting (skip)."""
        return self._json("DELETE", f"/cases/{self._quote(case_id)}/lease", query={"annotator": annotator})

    def upload_case(self, image_path: str | os.PathLike, case_id: str | None = None) -> dict:
        """Register an image (.nrrd, .nii.gz, .nii, .mha). Without case_id the server derives one from the content,
        so a retried upload never registers the same image twice."""
        path = Path(image_path)
        form = _Multipart().file("image", path).field("case_id", case_id)
        return self._json("POST", "/cases", form=form, timeout=max(self.timeout, 120.0))

    def download_image(self, case_id: str, dest_path: str | os.PathLike) -> Path:
        """The case's image file (written atomically to dest_path)."""
        return self._download(f"/cases/{self._quote(case_id)}/image", dest_path)

    # -- inference ------------------------------------------------------------------------------------------
    def infer(self, case_id: str, out_dir: str | os.PathLike, passes: int | None = None, *, threshold: float | None = None,
              min_voxels: int | None = None, max_regions: int | None = None, uncertainty: str | None = None,
              download=None, timeout: float | None = None) -> dict:
        """Run the current model on a case (or reuse the backend's cached run) and download its volumes.

        The backend computes the review regions of `uncertainty` ("entropy" or "mutual_information") above
        `threshold`; options left None take the backend's settings. download: names of the answer's "volumes" to
        write into out_dir as <name>.nrrd; None downloads what a review shows: "label", the map of the answer's
        uncertainty kind and "regions" (int32, each listed region's rank, 0 elsewhere). Returns the server's answer
        (model_version, inference_id, passes, uncertainty_kind, threshold, min_voxels, max_regions, regions as
        ReviewRegion dicts rank 1 first, uncertainty_mean, uncertainty_sum, volumes, cached, created) plus
        "paths" {name: Path} of the downloaded files.
        """
        if isinstance(download, str):
            raise TypeError(f"download must be a sequence of volume names, not the string {download!r}")
        payload = {"passes": passes, "threshold": threshold, "min_voxels": min_voxels, "max_regions": max_regions,
                   "uncertainty": uncertainty}
        payload = {k: v for k, v in payload.items() if v is not None}
        t = timeout or max(self.timeout, 300.0)
        result = self._json("POST", f"/cases/{self._quote(case_id)}/infer", payload=payload, timeout=t)
        volumes = result.get("volumes") or {}
        names = ("label", result.get("uncertainty_kind"), "regions") if download is None else download
        names = list(dict.fromkeys(names))  # each once, in the order asked
        unknown = [n for n in names if n not in volumes]
        if unknown:
            raise ValueError(f"the backend serves no volume {unknown} for this inference; it serves {sorted(volumes)}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["paths"] = {name: self._download(self._api_path(volumes[name]), out / f"{name}.nrrd", timeout=t)
                           for name in names}
        return result

    @staticmethod
    def _api_path(path: str) -> str:
        """A path the backend handed out ("/api/v1/..."), without the prefix that `_url` adds."""
        if not isinstance(path, str) or not path.startswith(API_PREFIX + "/") or ".." in path.split("/"):
            raise BackendError(None, f"the backend sent an unusable volume path {path!r} (expected {API_PREFIX}/...)")
        return path[len(API_PREFIX):]

    # -- labels ---------------------------------------------------------------------------------------------
    def submit_label(self, case_id: str, label_path: str | os.PathLike, kind: str = "final",
                     reviewed_mask_path: str | os.PathLike | None = None, model_version: str | None = None,
                     author: str = "anonymous", inference_id: str | None = None, uncertainty_kind: str | None = None,
                     threshold: float | None = None, submission_id: str | None = None) -> dict:
        """Store a new immutable label revision.

        kind "final": a full label of the case. kind "correction": the label plus the reviewed mask (1 = voxels the
        annotator checked or edited; required) and the model version it was made against. inference_id,
        uncertainty_kind and threshold say what the annotator was shown: the backend archives that inference's map of
        `uncertainty_kind` with the revision and records the kind and threshold. A retried call is recognised by its
        submission id (`submission_id`, default a fresh one per call) and stored once. Returns the revision dict.
        """
        if kind not in ("final", "correction"):
            raise ValueError(f"kind must be 'final' or 'correction', got {kind!r}")
        if kind == "correction" and reviewed_mask_path is None:
            raise ValueError("a correction needs reviewed_mask_path (the voxels the annotator reviewed)")
        form = _Multipart().field("kind", kind).field("author", author).field("model_version", model_version)
        form.field("inference_id", inference_id).field("uncertainty_kind", uncertainty_kind)
        form.field("threshold", None if threshold is None else float(threshold))
        form.field("submission_id", submission_id or uuid.uuid4().hex)
        form.file("label", label_path)
        if reviewed_mask_path is not None:
            form.file("reviewed_mask", reviewed_mask_path)
        return self._json("POST", f"/cases/{self._quote(case_id)}/labels", form=form, timeout=max(self.timeout, 120.0))

    def label_history(self, case_id: str) -> list[dict]:
        """Every label revision of a case, oldest first."""
        return self._json("GET", f"/cases/{self._quote(case_id)}/labels")["revisions"]

    def download_label(self, case_id: str, revision: int, dest_path: str | os.PathLike, name: str = "label") -> Path:
        """One file of a revision: "label", "reviewed_mask" or "uncertainty" (the map the annotator was shown)."""
        return self._download(f"/cases/{self._quote(case_id)}/labels/{int(revision)}/{self._quote(name)}", dest_path)

    # -- training jobs --------------------------------------------------------------------------------------
    def start_training(self, **params) -> dict:
        """Queue a training job. Params (all optional): method, iterations, lr, batch_labeled, batch_unlabeled,
        seed, val_interval, patch_size, tolerance, init ("current", "scratch" or a version), nproc, device,
        method_options. Returns the job dict (status "queued")."""
        # Not retried after a timeout: a second POST could queue a second job.
        return self._json("POST", "/train", payload=params, idempotent=False)

    def list_jobs(self, status: str | None = None) -> list[dict]:
        return self._json("GET", "/train", query={"status": status})["jobs"]

    def job_status(self, job_id: str) -> dict:
        """status (queued/running/succeeded/failed/cancelled), progress {step, iterations, loss, eta_s, ...},
        history (validation curve), result (model_version, promoted, reason), error."""
        return self._json("GET", f"/train/{self._quote(job_id)}")

    def cancel_job(self, job_id: str) -> dict:
        """Ask a job to stop: a queued job is cancelled at once, a running one within seconds."""
        return self._json("DELETE", f"/train/{self._quote(job_id)}")

    def wait_for_job(self, job_id: str, timeout: float | None = None, poll_s: float = 0.5) -> dict:
        """Poll until the job is finished (succeeded, failed or cancelled); returns the final job dict."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job_status(job_id)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_s)

    # -- models ---------------------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """Every model version, oldest first, each with "current": bool, metrics, promotion decision."""
        return self._json("GET", "/models")["models"]

    def current_model(self) -> str | None:
        return self._json("GET", "/models")["current"]

    def promote(self, version: str) -> dict:
        """Make `version` current (also the rollback call). Returns {"current", "previous"}."""
        return self._json("POST", f"/models/{self._quote(version)}/promote")

    def exclude(self, case_id: str, reason: str, revision: int | None = None, author: str = "anonymous") -> dict:
        """Take a case, or one of its label revisions, out of training from the next job on (files kept)."""
        payload = {"case_id": case_id, "reason": reason, "author": author}
        if revision is not None:
            payload["revision"] = revision
        return self._json("POST", "/exclusions", payload=payload, idempotent=False)

    def lift_exclusion(self, exclusion_id: int, reason: str, author: str = "anonymous") -> dict:
        return self._json("POST", f"/exclusions/{int(exclusion_id)}/lift", payload={"reason": reason, "author": author},
                          idempotent=False)

    def exclusions(self, active: bool = False) -> list[dict]:
        """Every exclusion ever made, oldest first (lifted ones too, with who lifted them and why)."""
        return self._json("GET", "/exclusions", query={"active": "true" if active else None})["exclusions"]

    def download_weights(self, version: str, dest_path: str | os.PathLike) -> Path:
        """The version's checkpoint (load with SSLSegmentLib.ml.checkpoint.load_checkpoint, weights_only)."""
        return self._download(f"/models/{self._quote(version)}/weights", dest_path)

"""The backend's REST API (FastAPI): the contract in docs/backend.md, under /api/v1.

`create_app(datastore_dir)` builds the app; `sslsegment serve` runs it with uvicorn on 127.0.0.1; `start_backend`
starts server and worker as subprocesses on a free loopback port (tests, benchmarks, the demo).

Every route but /health needs the bearer token. Uploads are size-limited before they are read, validated (readable,
3D, sane spacing; labels on the image's exact grid) and stored through the datastore, which writes atomically and
never lets a client-sent string become a path unchecked. Inference uses the `current` model version and reloads it
when the pointer moves (a promotion by the worker or a rollback).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import Body, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from SSLSegmentLib.data.volume import ImageError

from training.datastore import (
    Conflict,
    Datastore,
    InvalidInput,
    NotFound,
    checked_case_id,
    image_suffix,
    validate_author,
    validate_version,
)

API = "/api/v1"
VOLUME_NAMES = ("label", "probability", "entropy", "mutual_information")
log = logging.getLogger("sslsegment.server")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sslsegment")
    except Exception:
        return "0.0.0"


class InferRequest(BaseModel):
    """Inference options; all optional (defaults from the datastore settings)."""

    model_config = ConfigDict(extra="forbid")
    passes: int | None = Field(None, ge=1, le=64, description="MC-dropout passes")
    threshold: float | None = Field(None, ge=0.0, lt=1.0, description="uncertainty threshold of review regions")
    min_voxels: int | None = Field(None, ge=1)
    max_regions: int | None = Field(None, ge=1, le=1000)
    uncertainty: Literal["entropy", "mutual_information"] | None = None


class TrainRequest(BaseModel):
    """Training job parameters; all optional (defaults from the datastore settings)."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    iterations: int | None = None
    lr: float | None = None
    batch_labeled: int | None = None
    batch_unlabeled: int | None = None
    seed: int | None = None
    val_interval: int | None = None
    patch_size: list[int] | None = None
    tolerance: float | None = None
    init: str | None = Field(None, description="'current', 'scratch' or a model version")
    network: dict | None = None
    method_options: dict | None = None
    nproc: int | None = None
    device: str | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    ema_decay: float | None = None
    augment: bool | None = None
    lr_schedule: str | None = None
    rampup_steps: int | None = None
    eval_model: str | None = None


class _ModelCache:
    """The current model version in memory; reloaded when the index's `current` pointer changes."""

    def __init__(self, store: Datastore, device: str):
        self.store, self.device = store, device
        self.version: str | None = None
        self.model = None
        self.patch_size = None
        self.lock = threading.Lock()

    def get(self):
        from SSLSegmentLib.ml.inference import pick_device
        from SSLSegmentLib.ml.trainer import model_from_checkpoint

        current = self.store.current_model
        if current is None:
            raise HTTPException(409, "no model version yet: train one (POST /train) or import one")
        with self.lock:
            if current != self.version:
                model, ckpt = model_from_checkpoint(self.store.model_path(current), device=pick_device(self.device))
                self.model, self.version = model, current
                self.patch_size = tuple(ckpt.get("train_config", {}).get("patch_size", (32, 48, 48)))
                log.info("loaded model version %s", current)
            return self.version, self.model, self.patch_size


class _BodyLimit:
    """ASGI middleware: refuse request bodies over the limit with 413 before they are read into memory."""

    def __init__(self, app, limit_bytes: int):
        self.app, self.limit = app, int(limit_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"detail": f"upload larger than the limit of {self.limit / 2**20:.1f} MB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(datastore_dir: str | os.PathLike, token: str | None = None, *, max_upload_mb: float | None = None,
               device: str = "auto", create: bool = True) -> FastAPI:
    """The FastAPI app for one datastore (created if missing when `create`). token None: the datastore's token."""
    store = Datastore(datastore_dir, create=create)
    if token is None:
        token, _ = store.ensure_token()
    limit_mb = float(max_upload_mb if max_upload_mb is not None else store.settings["max_upload_mb"])
    models = _ModelCache(store, device)
    infer_lock = threading.Lock()
    upload_dir = store.index_dir / "uploads"
    upload_dir.mkdir(parents=True, exist_ok=True)
    version = _version()

    app = FastAPI(title="SSLSegment backend", version=version,
                  description="Datastore, inference with uncertainty and review regions, corrections and retraining. "
                              "See docs/backend.md.")
    app.state.store = store
    app.state.models = models
    app.add_middleware(_BodyLimit, limit_bytes=int(limit_mb * 2**20))

    def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (see `sslsegment token --datastore DIR`)",
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)]

    @app.exception_handler(NotFound)
    async def _not_found(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Conflict)
    async def _conflict(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(InvalidInput)
    async def _invalid(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ImageError)
    async def _image_error(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(OSError)
    async def _storage_error(request, exc):
        # Disk full or permissions: nothing was indexed (rows commit only after files are in place).
        import errno

        code = 507 if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else 500
        return JSONResponse({"detail": f"storage error: {exc.strerror or type(exc).__name__}"}, status_code=code)

    def case_id_param(case_id: str) -> str:
        try:
            return checked_case_id(case_id)
        except InvalidInput as exc:
            raise HTTPException(400, str(exc)) from None

    def save_upload(upload: UploadFile, what: str) -> Path:
        """Copy an upload to a private temp file with its (checked) suffix."""
        if upload is None or not upload.filename:
            raise HTTPException(400, f"missing file field {what!r}")
        try:
            suffix = image_suffix(upload.filename)
        except InvalidInput as exc:
            raise HTTPException(415, str(exc)) from None
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=suffix, dir=upload_dir)
        with os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(upload.file, fh, 1 << 20)
        return Path(tmp)

    # -- server -----------------------------------------------------------------------------------------------
    @app.get(f"{API}/health")
    @app.get("/health", include_in_schema=False)
    def health():
        return {"status": "ok", "version": version, "api": "v1"}

    @app.get(f"{API}/info", dependencies=auth)
    def info():
        from SSLSegmentLib.ml.methods import available_methods

        settings = store.settings
        return {"name": "SSLSegment", "version": version, "api": "v1", **store.summary(),
                "settings": {**settings, "max_upload_mb": limit_mb}, "methods": sorted(available_methods()),
                "loaded_model": models.version}

    # -- cases ------------------------------------------------------------------------------------------------
    @app.post(f"{API}/cases", dependencies=auth, status_code=201)
    def upload_case(response: Response, image: UploadFile = File(...), case_id: str | None = Form(None)):
        if case_id:
            case_id_param(case_id)
        tmp = save_upload(image, "image")
        try:
            case, created = store.register_image(tmp, case_id=case_id or None, filename=image.filename, move=True)
        finally:
            tmp.unlink(missing_ok=True)
        if not created:
            response.status_code = 200
        return case

    @app.get(f"{API}/cases", dependencies=auth)
    def list_cases(split: Literal["train", "val", "test"] | None = None):
        return {"cases": store.cases(split)}

    @app.get(f"{API}/cases/next", dependencies=auth)
    def next_case(strategy: Literal["uncertainty", "uncertainty_sum", "random"] = "uncertainty",
                  annotator: str = "anonymous", split: Literal["train", "val", "test"] = "train"):
        try:
            validate_author(annotator)
        except InvalidInput as exc:
            raise HTTPException(400, str(exc)) from None
        case = store.next_case(strategy, annotator, split)
        if case is None:
            return Response(status_code=204)
        return case

    @app.get(f"{API}/cases/{{case_id}}", dependencies=auth)
    def get_case(case_id: str):
        return store.case(case_id_param(case_id))

    @app.get(f"{API}/cases/{{case_id}}/image", dependencies=auth)
    def get_image(case_id: str):
        path = store.image_path(case_id_param(case_id))
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")

    @app.delete(f"{API}/cases/{{case_id}}/lease", dependencies=auth)
    def release(case_id: str, annotator: str | None = None):
        store.case(case_id_param(case_id))
        return {"case_id": case_id, "released": store.release_lease(case_id, annotator)}

    # -- inference --------------------------------------------------------------------------------------------
    @app.post(f"{API}/cases/{{case_id}}/infer", dependencies=auth)
    def infer(case_id: str, request: InferRequest = Body(default_factory=InferRequest)):
        from SSLSegmentLib.data.imageio import read_volume
        from SSLSegmentLib.ml.inference import predict_volume
        from SSLSegmentLib.data.regions import find_review_regions

        case_id_param(case_id)
        store.case(case_id)
        opts = {**store.settings["infer"], **request.model_dump(exclude_none=True)}
        passes = int(opts["passes"])
        version, model, patch = models.get()
        cached = store.find_inference(case_id, version, passes)
        image = store.load_image(case_id)
        if cached is None:
            with infer_lock:  # one forward at a time: bounded memory, no thread oversubscription
                cached = store.find_inference(case_id, version, passes)
                if cached is None:
                    pred = predict_volume(model=model, image=image, patch_size=patch, passes=passes,
                                          device=models.device)
                    vols = pred.volumes(image)
                    meta = {"uncertainty_kind": opts["uncertainty"],
                            "uncertainty_mean": float(pred.entropy.mean()), "uncertainty_sum": float(pred.entropy.sum()),
                            "mi_mean": float(pred.mutual_information.mean()), "mi_sum": float(pred.mutual_information.sum())}
                    cached = store.add_inference(case_id, version, passes, vols, meta)
                    store.set_score(case_id, meta["uncertainty_mean"], meta["uncertainty_sum"], version)
                    was_cached = False
                else:
                    was_cached = True
        else:
            was_cached = True
        folder = store.inference_dir(case_id, cached["inference_id"])
        kind = opts["uncertainty"]
        uncertainty = read_volume(folder / f"{kind}.nrrd").array
        regions, _ = find_review_regions(uncertainty, threshold=float(opts["threshold"]), min_voxels=int(opts["min_voxels"]),
                                         max_regions=int(opts["max_regions"]), geometry=image.geometry)
        iid = cached["inference_id"]
        return {
            "case_id": case_id, "model_version": version, "inference_id": iid, "passes": passes,
            "regions": [r.to_dict() for r in regions], "uncertainty_kind": kind, "threshold": float(opts["threshold"]),
            "uncertainty_mean": float(uncertainty.mean()), "uncertainty_sum": float(uncertainty.sum()),
            "volumes": {n: f"{API}/cases/{case_id}/inference/{iid}/{n}" for n in VOLUME_NAMES},
            "cached": was_cached, "created": cached.get("created"),
        }

    @app.get(f"{API}/cases/{{case_id}}/inference/{{inference_id}}/{{name}}", dependencies=auth)
    def inference_volume(case_id: str, inference_id: str, name: Literal["label", "probability", "entropy", "mutual_information"]):
        folder = store.inference_dir(case_id_param(case_id), inference_id)
        return FileResponse(folder / f"{name}.nrrd", filename=f"{name}.nrrd", media_type="application/octet-stream")

    # -- labels -----------------------------------------------------------------------------------------------
    @app.post(f"{API}/cases/{{case_id}}/labels", dependencies=auth, status_code=201)
    def submit_label(case_id: str, response: Response, label: UploadFile = File(...),
                     reviewed_mask: UploadFile | None = File(None),
                     kind: Literal["final", "correction"] = Form("final"), author: str = Form("anonymous"),
                     model_version: str | None = Form(None), inference_id: str | None = Form(None),
                     submission_id: str | None = Form(None)):
        case_id_param(case_id)
        store.case(case_id)
        try:
            validate_author(author)
            if model_version:
                validate_version(model_version)
        except InvalidInput as exc:
            raise HTTPException(400, str(exc)) from None
        tmps = []
        try:
            tmps.append(save_upload(label, "label"))
            lab = store.read_label_upload(case_id, tmps[-1], "label")
            mask = None
            if reviewed_mask is not None and reviewed_mask.filename:
                tmps.append(save_upload(reviewed_mask, "reviewed_mask"))
                mask = store.read_label_upload(case_id, tmps[-1], "reviewed mask")
            revision, created = store.add_label(case_id, lab, kind=kind, author=author, reviewed_mask=mask,
                                                model_version=model_version or None, inference_id=inference_id or None,
                                                submission_id=submission_id or None)
        finally:
            for t in tmps:
                t.unlink(missing_ok=True)
        if created and kind == "correction":
            job = store.maybe_queue_retrain()
            if job is not None:
                revision["queued_job"] = job["job_id"]
        if not created:
            response.status_code = 200
        return revision

    @app.get(f"{API}/cases/{{case_id}}/labels", dependencies=auth)
    def label_history(case_id: str):
        return {"revisions": store.revisions(case_id_param(case_id))}

    @app.get(f"{API}/cases/{{case_id}}/labels/{{revision}}/{{name}}", dependencies=auth)
    def label_file(case_id: str, revision: int, name: Literal["label", "reviewed_mask", "uncertainty"]):
        path = store.revision_file(case_id_param(case_id), revision, name)
        return FileResponse(path, filename=f"{name}.nrrd", media_type="application/octet-stream")

    # -- training jobs ----------------------------------------------------------------------------------------
    @app.post(f"{API}/train", dependencies=auth, status_code=202)
    def start_training(request: TrainRequest = Body(default_factory=TrainRequest)):
        from training.worker import resolve_train_params

        params = request.model_dump(exclude_none=True)
        try:
            resolve_train_params(store, params)
        except InvalidInput as exc:
            raise HTTPException(400, str(exc)) from None
        return store.create_job(params, trigger="manual")

    @app.get(f"{API}/train", dependencies=auth)
    def list_jobs(status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None):
        return {"jobs": store.jobs(status)}

    @app.get(f"{API}/train/{{job_id}}", dependencies=auth)
    def job_status(job_id: str):
        return store.job(job_id)

    @app.delete(f"{API}/train/{{job_id}}", dependencies=auth)
    def cancel_job(job_id: str):
        return store.request_cancel(job_id)

    # -- models -----------------------------------------------------------------------------------------------
    @app.get(f"{API}/models", dependencies=auth)
    def list_models():
        return {"current": store.current_model, "models": store.models(), "promotions": store.promotion_history()}

    @app.get(f"{API}/models/{{version}}", dependencies=auth)
    def get_model(version: str):
        return store.model(version)

    @app.post(f"{API}/models/{{version}}/promote", dependencies=auth)
    def promote(version: str):
        return store.promote(version, reason="manual (API)")

    @app.get(f"{API}/models/{{version}}/weights", dependencies=auth)
    def weights(version: str):
        return FileResponse(store.model_path(version), filename=f"{version}.pt", media_type="application/octet-stream")

    return app


def serve(datastore_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765, *, max_upload_mb: float | None = None,
          device: str = "auto", log_level: str = "info", announce=print) -> None:
    """Run the server with uvicorn (blocking). Prints the token once, when it is first generated."""
    import uvicorn

    store = Datastore(datastore_dir, create=True)
    token, created = store.ensure_token()
    if created:
        announce(f"API token (shown once; kept in {store.token_path}, mode 0600): {token}")
    else:
        announce(f"API token: see {store.token_path} (or `sslsegment token --datastore {store.root}`)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        announce(f"warning: listening on {host}, reachable from other machines; use TLS in front of it")
    app = create_app(datastore_dir, token, max_upload_mb=max_upload_mb, device=device)
    announce(f"serving {store.root} on http://{host}:{port}{API}")
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


# -- running server + worker as subprocesses ------------------------------------------------------------------
@dataclass
class BackendProcesses:
    """A server (and optionally a worker) running as subprocesses on 127.0.0.1. Use as a context manager."""

    datastore: Path
    base_url: str
    token: str
    server: subprocess.Popen
    log_dir: Path
    worker_args: list = field(default_factory=list)
    workers: list = field(default_factory=list)
    env: dict | None = None

    def client(self, **kwargs):
        from SSLSegmentLib.review.client import SSLSegmentClient

        return SSLSegmentClient(self.base_url, token=self.token, **kwargs)

    def start_worker(self, *extra: str) -> subprocess.Popen:
        n = len(self.workers)
        log = open(self.log_dir / f"worker{n}.log", "ab")
        cmd = [sys.executable, "-m", "training.cli", "worker", "--datastore", str(self.datastore), *self.worker_args, *extra]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen | None = None, sig: int = signal.SIGKILL) -> None:
        """Kill a worker's whole process group (its torchrun children too) and reap it."""
        proc = proc or self.workers[-1]
        _signal_group(proc, sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for proc in [*self.workers, self.server]:
            if proc is self.server and proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=15)

    def log_tail(self, n: int = 3000) -> str:
        out = []
        for p in sorted(self.log_dir.glob("*.log")):
            out.append(f"== {p.name}\n{p.read_text(errors='replace')[-n:]}")
        return "\n".join(out)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_backend(datastore_dir: str | os.PathLike, *, port: int | None = None, worker: bool = True,
                  worker_args: list[str] | None = None, server_args: list[str] | None = None,
                  env: dict | None = None, log_dir: str | os.PathLike | None = None, timeout: float = 120.0) -> BackendProcesses:
    """Start `sslsegment serve` (and `sslsegment worker`) for a datastore on a free 127.0.0.1 port; wait until the
    server answers. Returns the handle with base_url, token, client(), start_worker(), kill_worker(), stop()."""
    from SSLSegmentLib.review.client import BackendUnavailable, SSLSegmentClient

    from training.worker import free_port

    store = Datastore(datastore_dir, create=True)
    token, _ = store.ensure_token()
    port = port or free_port()
    log_dir = Path(log_dir) if log_dir else store.index_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "training.cli", "serve", "--datastore", str(store.root), "--host", "127.0.0.1",
           "--port", str(port), *(server_args or [])]
    with open(log_dir / "server.log", "ab") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle = BackendProcesses(store.root, f"http://127.0.0.1:{port}", token, server, log_dir,
                              worker_args=list(worker_args or []), env=env)
    client = SSLSegmentClient(handle.base_url, token=token, timeout=5, retries=1)
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}:\n{handle.log_tail()}")
        try:
            client.health()
            break
        except BackendUnavailable:
            if time.monotonic() > deadline:
                handle.stop()
                raise RuntimeError(f"the server did not answer within {timeout} s:\n{handle.log_tail()}") from None
            time.sleep(0.2)
    if worker:
        handle.start_worker()
    return handle

"""The backend's REST API (FastAPI): the contract in docs/backend.md, under /api/v1.

`create_app(datastore_dir)` builds the app; `sslsegment serve` runs it with uvicorn on 127.0.0.1. Server and worker
as subprocesses on a free loopback port (the module's local backend, tests, benchmarks, the demo):
`SSLSegmentLib.review.local_backend.LocalBackend`.

One router per resource (server, cases, inference, labels, train, models). A route parses and checks what the client
sent and delegates: to the service layer (training/service.py) for inference and submissions, to the datastore, the
model registry or the job schema otherwise. Every route but /health needs the bearer token. Uploads are size-limited
before they are read, validated (readable, 3D, sane spacing; labels on the image's exact grid) and stored through the
datastore, which writes atomically and never lets a client-sent string become a path unchecked.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import math
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, File, Form, HTTPException, Path as PathParam, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from SSLSegmentLib.data import contract
from SSLSegmentLib.data.imageio import writer_tag
from SSLSegmentLib.data.volume import ImageError

from training.datastore import (
    INDEX_QUOTA_ENV,
    JOB_STATES,
    UPLOAD_PREFIX,
    SPLITS,
    Conflict,
    Damaged,
    Datastore,
    InvalidInput,
    NotFound,
    checked_case_id,
    image_suffix,
    validate_author,
    validate_version,
)
from training.jobs import TrainRequest, resolve_train_params
from training.registry import ModelRegistry
from training.service import API, VOLUME_NAMES, InferenceService, SubmissionService
from training.strategies import STRATEGIES, get_strategy

log = logging.getLogger("sslsegment.server")

UncertaintyKind = Literal[contract.UNCERTAINTY_KINDS]
Split = Literal[SPLITS]
StrategyName = Literal[tuple(STRATEGIES)]
VolumeName = Literal[VOLUME_NAMES]
JobStatus = Literal[JOB_STATES]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sslsegment")
    except Exception:
        return "0.0.0"


class InferRequest(BaseModel):
    """Inference options; all optional (defaults from the datastore settings)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    passes: int | None = Field(None, ge=1, le=64, description="MC-dropout passes")
    threshold: float | None = Field(None, ge=0.0, lt=1.0, description="uncertainty threshold of review regions")
    min_voxels: int | None = Field(None, ge=1)
    max_regions: int | None = Field(None, ge=1, le=1000)
    uncertainty: UncertaintyKind | None = Field(None, description="the map the regions are found in")


@dataclass
class Backend:
    """What the routes of one app delegate to."""

    store: Datastore
    registry: ModelRegistry
    inference: InferenceService
    submissions: SubmissionService
    token: str
    limit_mb: float
    version: str
    upload_dir: Path


def backend(request: Request) -> Backend:
    return request.app.state.backend


UNAUTHORISED = "missing or wrong bearer token (see `sslsegment token --datastore DIR`)"


def token_matches(authorization: str, token: str) -> bool:
    """The one token rule: `Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and bool(value) and hmac.compare_digest(value.strip().encode(), token.encode())


def require_token(request: Request) -> None:
    if not token_matches(request.headers.get("authorization", ""), backend(request).token):
        raise HTTPException(401, UNAUTHORISED, headers={"WWW-Authenticate": "Bearer"})


def _bad_request(check, value):
    try:
        return check(value)
    except InvalidInput as exc:
        raise HTTPException(400, str(exc)) from None


def valid_case_id(case_id: str) -> str:
    return _bad_request(checked_case_id, case_id)


# Row ids (revisions, exclusions) are SQLite integers: a larger number names nothing, and would not even reach the
# query (OverflowError).
MAX_ROW_ID = 2**63 - 1
RowId = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID)]

B = Annotated[Backend, Depends(backend)]
CaseId = Annotated[str, Depends(valid_case_id)]
AUTH = [Depends(require_token)]


def save_upload(b: Backend, upload: UploadFile | None, what: str) -> Path:
    """Copy an upload to a private temp file with its (checked) suffix."""
    if upload is None or not upload.filename:
        raise HTTPException(400, f"missing file field {what!r}")
    try:
        suffix = image_suffix(upload.filename)
    except InvalidInput as exc:
        raise HTTPException(415, str(exc)) from None
    # Named by this process, so what a killed server spooled is removed when it starts again.
    fd, tmp = tempfile.mkstemp(prefix=f"{UPLOAD_PREFIX}{writer_tag()}-", suffix=suffix, dir=b.upload_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(upload.file, fh, 1 << 20)
    except BaseException:  # disk full mid-copy: no half upload stays behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _file(path: Path, filename: str | None = None) -> FileResponse:
    return FileResponse(path, filename=filename or path.name, media_type="application/octet-stream")


# -- errors, as the schema documents them --------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every refused request's body: a message naming what is wrong, or, for a request that does not fit the
    schema, the list of its field errors."""

    detail: str | list[dict[str, Any]]


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "a malformed request: a bad query or a missing form field"),
    (401, "missing or wrong bearer token"),
    (404, "no such case, revision, inference, job or model version"),
    (409, "the request conflicts with the current state (e.g. a lease, a running job, a promotion)"),
    (413, "the body is larger than the upload limit"),
    (415, "a file type the backend does not read"),
    (422, "the request or the uploaded volume is invalid; the message says which field and why"),
    (503, "the datastore index is busy (try again), or a stored model checkpoint is damaged"),
    (507, "the datastore's disk or index is full; nothing was stored"),
)}


# -- server ---------------------------------------------------------------------------------------------------
server_router = APIRouter(tags=["server"], responses=ERRORS)


@server_router.get(f"{API}/health")
@server_router.get("/health", include_in_schema=False)
def health(b: B):
    return {"status": "ok", "version": b.version, "api": "v1"}


@server_router.get(f"{API}/info", dependencies=AUTH)
def info(b: B):
    from SSLSegmentLib.ml.methods import available_methods

    return {"name": "SSLSegment", "version": b.version, "api": "v1", **b.store.summary(), **b.registry.summary(),
            "settings": {**b.store.settings, "max_upload_mb": b.limit_mb}, "methods": sorted(available_methods()),
            "loaded_model": b.inference.models.version}


# -- cases ----------------------------------------------------------------------------------------------------
cases_router = APIRouter(prefix=f"{API}/cases", tags=["cases"], dependencies=AUTH, responses=ERRORS)


@cases_router.post("", status_code=201)
def upload_case(b: B, response: Response, image: UploadFile = File(...), case_id: str | None = Form(None)):
    if case_id:
        valid_case_id(case_id)
    tmp = save_upload(b, image, "image")
    try:
        case, created = b.store.register_image(tmp, case_id=case_id or None, filename=image.filename, move=True)
    finally:
        tmp.unlink(missing_ok=True)
    if not created:
        response.status_code = 200
    return case


@cases_router.get("")
def list_cases(b: B, split: Split | None = None):
    return {"cases": b.store.cases(split)}


@cases_router.get("/next", responses={204: {"description": "no unreviewed case left in the split"}})
def next_case(b: B, strategy: StrategyName = "uncertainty", annotator: str = "anonymous", split: Split = "train"):
    _bad_request(validate_author, annotator)
    case = b.store.next_case(get_strategy(strategy), annotator, split)
    return Response(status_code=204) if case is None else case


@cases_router.get("/{case_id}")
def get_case(b: B, case_id: CaseId):
    return b.store.case(case_id)


@cases_router.get("/{case_id}/image")
def get_image(b: B, case_id: CaseId):
    return _file(b.store.image_path(case_id))


@cases_router.delete("/{case_id}/lease")
def release(b: B, case_id: CaseId, annotator: str | None = None):
    if annotator is not None:
        _bad_request(validate_author, annotator)
    b.store.case(case_id)
    return {"case_id": case_id, "released": b.store.release_lease(case_id, annotator)}


# -- inference ------------------------------------------------------------------------------------------------
inference_router = APIRouter(prefix=f"{API}/cases/{{case_id}}", tags=["inference"], dependencies=AUTH,
                             responses=ERRORS)


@inference_router.post("/infer")
def infer(b: B, case_id: CaseId, request: InferRequest = Body(default_factory=InferRequest)):
    return b.inference.infer(case_id, request.model_dump(exclude_none=True))


@inference_router.get("/inference/{inference_id}/regions/{view}")
def region_map(b: B, case_id: CaseId, inference_id: str, view: str):
    return _file(b.store.region_map(case_id, inference_id, view), "regions.nrrd")


@inference_router.get("/inference/{inference_id}/{name}")
def inference_volume(b: B, case_id: CaseId, inference_id: str, name: VolumeName):
    return _file(b.store.inference_volume(case_id, inference_id, name), f"{name}.nrrd")


# -- labels ---------------------------------------------------------------------------------------------------
labels_router = APIRouter(prefix=f"{API}/cases/{{case_id}}/labels", tags=["labels"], dependencies=AUTH,
                          responses=ERRORS)


@labels_router.post("", status_code=201)
def submit_label(b: B, case_id: CaseId, response: Response, label: UploadFile = File(...),
                 reviewed_mask: UploadFile | None = File(None),
                 kind: Literal["final", "correction"] = Form("final"), author: str = Form("anonymous"),
                 model_version: str | None = Form(None), inference_id: str | None = Form(None),
                 submission_id: str | None = Form(None),
                 uncertainty_kind: UncertaintyKind = Form(contract.DEFAULT_UNCERTAINTY,
                                                          description="the map the annotator was shown"),
                 threshold: float | None = Form(None, ge=0.0, lt=1.0,
                                                description="the threshold of the regions the annotator reviewed")):
    b.store.case(case_id)
    _bad_request(validate_author, author)
    if model_version:
        _bad_request(validate_version, model_version)
    tmps = []
    try:
        tmps.append(save_upload(b, label, "label"))
        if reviewed_mask is not None and reviewed_mask.filename:
            tmps.append(save_upload(b, reviewed_mask, "reviewed_mask"))
        revision, created = b.submissions.submit(
            case_id, tmps[0], tmps[1] if len(tmps) > 1 else None, kind=kind, author=author,
            model_version=model_version, inference_id=inference_id, submission_id=submission_id,
            uncertainty_kind=uncertainty_kind, threshold=threshold)
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)
    if not created:
        response.status_code = 200
    return revision


@labels_router.get("")
def label_history(b: B, case_id: CaseId):
    return {"revisions": b.store.revisions(case_id)}


@labels_router.get("/{revision}/{name}")
def label_file(b: B, case_id: CaseId, revision: RowId, name: Literal["label", "reviewed_mask", "uncertainty"]):
    return _file(b.store.revision_file(case_id, revision, name), f"{name}.nrrd")


# -- training jobs --------------------------------------------------------------------------------------------
train_router = APIRouter(prefix=f"{API}/train", tags=["train"], dependencies=AUTH, responses=ERRORS)


@train_router.post("", status_code=202)
def start_training(b: B, request: TrainRequest = Body(default_factory=TrainRequest)):
    params = request.model_dump(exclude_none=True)
    resolve_train_params(b.store, params)  # InvalidInput: 422 naming the parameter
    return b.store.create_job(params, trigger="manual")


@train_router.get("")
def list_jobs(b: B, status: JobStatus | None = None):
    return {"jobs": b.store.jobs(status)}


@train_router.get("/{job_id}")
def job_status(b: B, job_id: str):
    return b.store.job(job_id)


@train_router.delete("/{job_id}")
def cancel_job(b: B, job_id: str):
    return b.store.request_cancel(job_id)


# -- models ---------------------------------------------------------------------------------------------------
models_router = APIRouter(prefix=f"{API}/models", tags=["models"], dependencies=AUTH, responses=ERRORS)


@models_router.get("")
def list_models(b: B):
    r = b.registry
    return {"current": r.current, "models": r.models(), "promotions": r.promotion_history()}


@models_router.get("/{version}")
def get_model(b: B, version: str):
    return b.registry.model(version)


@models_router.post("/{version}/promote")
def promote(b: B, version: str):
    return b.registry.promote(version, reason="manual (API)")


@models_router.get("/{version}/weights")
def weights(b: B, version: str):
    return _file(b.registry.checkpoint_path(version), f"{version}.pt")


# -- exclusions -----------------------------------------------------------------------------------------------
exclusions_router = APIRouter(prefix=f"{API}/exclusions", tags=["exclusions"], dependencies=AUTH, responses=ERRORS)


class ExclusionRequest(BaseModel):
    """Take a case, or one label revision of it, out of training (files kept; the record is the audit trail)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    case_id: str
    revision: int | None = Field(None, ge=1, le=MAX_ROW_ID,
                                 description="one label revision of the case; omitted: the whole case")
    reason: str = Field(..., min_length=1, max_length=1000, description="why, for the audit trail")
    author: str = "anonymous"


class LiftRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    reason: str = Field(..., min_length=1, max_length=1000)
    author: str = "anonymous"


@exclusions_router.get("")
def list_exclusions(b: B, active: bool = False):
    return {"exclusions": b.store.exclusions(active_only=active)}


@exclusions_router.post("", status_code=201)
def exclude(b: B, request: ExclusionRequest):
    valid_case_id(request.case_id)
    _bad_request(validate_author, request.author)
    return b.store.exclude(request.case_id, request.reason, request.author, request.revision)


@exclusions_router.post("/{exclusion_id}/lift")
def lift_exclusion(b: B, exclusion_id: RowId, request: LiftRequest):
    _bad_request(validate_author, request.author)
    return b.store.lift_exclusion(exclusion_id, request.author, request.reason)


ROUTERS = (server_router, cases_router, inference_router, labels_router, train_router, models_router,
           exclusions_router)


# -- the app --------------------------------------------------------------------------------------------------
class _Door:
    """ASGI middleware: what is decided before a request's body is parsed, so an unauthorised or oversized upload is
    never spooled to disk or memory.

    1. the token, for every route under the API prefix but the health check (the same `token_matches` rule as the
       routes' own dependency): 401;
    2. the size: a body over the limit, announced or streamed: 413;
    3. the pace: a body that stops arriving for `body_timeout_s` between two pieces (a slow-drip client holding a
       connection): 408.
    A refused body is read and dropped (up to DRAIN_BYTES) before the answer, so a client still sending it reads
    the answer instead of a reset connection."""

    def __init__(self, app, limit_bytes: int, token: str, body_timeout_s: float):
        self.app, self.limit, self.token, self.body_timeout_s = app, int(limit_bytes), token, float(body_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        # A client that sent `Expect: 100-continue` holds its body until asked, and asking (receive) is what would
        # make the server say "100 Continue": such a body is refused unsent, not drained.
        waiting = headers.get(b"expect", b"").lower() == b"100-continue"
        announced = _announced(headers)
        refusal = None
        if path.startswith(API) and path != f"{API}/health" and not token_matches(
                headers.get(b"authorization", b"").decode("latin-1"), self.token):
            refusal = (401, UNAUTHORISED, [(b"www-authenticate", b"Bearer")])
        elif b"content-length" in headers and b"transfer-encoding" in headers:
            # Two framings for one body: a proxy in front and this server could each take a different one and
            # disagree on where the next request starts (request smuggling). HTTP/1.1 allows refusing it.
            refusal = (400, "a request may not carry both Content-Length and Transfer-Encoding", [])
            announced = 0
        elif announced > self.limit:
            refusal = (413, self._too_large_message(), [])
        if refusal is not None:
            if not waiting:
                await self._drain(receive, announced)
            return await _answer(send, *refusal)
        received = 0
        started = body_complete = False
        why: int | None = None

        async def guarded_receive():
            nonlocal received, why, body_complete
            if body_complete:  # e.g. a file response listening for a disconnect: no body left to time out
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                why = 408
                raise _Refused() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_complete = not message.get("more_body", False)
                if received > self.limit:
                    why = 413
                    raise _Refused()
            return message

        async def refuse():
            nonlocal started
            started = True
            if why == 413:
                await self._drain(receive, received)
                await _answer(send, 413, self._too_large_message())
            else:
                await _answer(send, 408, f"the request body stopped arriving for {self.body_timeout_s:g} s")

        async def tracking_send(message):
            nonlocal started
            if why is not None:  # the app's own answer to the cut-off body (FastAPI makes any body error a 400)
                if message["type"] == "http.response.start" and not started:
                    await refuse()
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _Refused:
            if not started:
                await refuse()

    @staticmethod
    async def _drain(receive, announced: int) -> None:
        """Read and drop the rest of a refused body; a body beyond DRAIN_BYTES is not read, and that client sees
        the connection reset."""
        if announced > DRAIN_BYTES:
            return
        read = 0
        while read <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _too_large_message(self) -> str:
        return f"upload larger than the limit of {self.limit / 2**20:.1f} MB"


def _announced(headers: dict) -> int:
    length = headers.get(b"content-length")
    return int(length) if length is not None and length.isdigit() else 0


async def _answer(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# How much of a refused upload the server reads (and drops) to answer it cleanly: a few times any sane limit.
DRAIN_BYTES = 256 * 2**20
# How long a request body may pause between two pieces before the server gives up on it.
BODY_TIMEOUT_S = 60.0


class _Refused(Exception):
    pass


def _error(status: int):
    async def handler(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=status)
    return handler


def _finite(value):
    """`value` with every NaN or infinity spelled as a string: JSON has no such numbers, and a 422 that echoes one
    back must still be a valid response."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


async def _request_invalid(request, exc: RequestValidationError):
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


async def _index_error(request, exc: sqlite3.OperationalError):
    # SQLITE_FULL: the disk or the index quota; the write was rolled back and its files taken back. A busy index
    # (another process holds the write lock past the busy timeout) is worth a retry.
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_FULL":
        return JSONResponse({"detail": f"the datastore index is full (disk or {INDEX_QUOTA_ENV}); nothing was "
                                       "stored: free space and send it again"}, status_code=507)
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return JSONResponse({"detail": "the datastore index is busy; try again"}, status_code=503,
                            headers={"Retry-After": "1"})
    raise exc


async def _storage_error(request, exc):
    # Disk full or permissions: nothing was indexed (rows commit only after files are in place).
    code = 507 if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else 500
    return JSONResponse({"detail": f"storage error: {exc.strerror or type(exc).__name__}"}, status_code=code)


def create_app(datastore_dir: str | os.PathLike, token: str | None = None, *, max_upload_mb: float | None = None,
               device: str = "auto", create: bool = True, body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app for one datastore (created if missing when `create`). token None: the datastore's token."""
    store = Datastore(datastore_dir, create=create)
    if token is None:
        token, _ = store.ensure_token()
    limit_mb = float(max_upload_mb if max_upload_mb is not None else store.settings["max_upload_mb"])
    registry = ModelRegistry(store)
    upload_dir = store.upload_dir
    version = _version()
    removed = store.clean_interrupted()  # what a killed server or worker left: spooled uploads, half-made revisions
    if removed:
        log.warning("removed %d leftover(s) of interrupted writes", len(removed))

    app = FastAPI(title="SSLSegment backend", version=version,
                  description="Datastore, inference with uncertainty and review regions, corrections and retraining. "
                              "See docs/backend.md.")
    app.state.backend = Backend(store=store, registry=registry, inference=InferenceService(store, registry, device),
                                submissions=SubmissionService(store), token=token, limit_mb=limit_mb, version=version,
                                upload_dir=upload_dir)
    app.add_middleware(_Door, limit_bytes=int(limit_mb * 2**20), token=token, body_timeout_s=body_timeout_s)
    for exc_type, status in ((NotFound, 404), (Conflict, 409), (InvalidInput, 422), (ImageError, 422), (Damaged, 503)):
        app.add_exception_handler(exc_type, _error(status))
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(OSError, _storage_error)
    app.add_exception_handler(sqlite3.OperationalError, _index_error)
    for router in ROUTERS:
        app.include_router(router)
    return app


def serve(datastore_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765, *, max_upload_mb: float | None = None,
          device: str = "auto", log_level: str = "info", announce=print, body_timeout_s: float = BODY_TIMEOUT_S,
          show_token: bool = False) -> None:
    """Run the server with uvicorn (blocking). Says where the token is; prints the token itself only when asked
    (`show_token`), since this output often ends up in a log."""
    import uvicorn

    store = Datastore(datastore_dir, create=True)
    token, created = store.ensure_token()
    where = f"{'new ' if created else ''}API token in {store.token_path} (owner only; `sslsegment token --datastore {store.root}`)"
    announce(f"{where}: {token}" if show_token else where)
    if host not in ("127.0.0.1", "localhost", "::1"):
        announce(f"warning: listening on {host}, reachable from other machines; use TLS in front of it")
    app = create_app(datastore_dir, token, max_upload_mb=max_upload_mb, device=device, body_timeout_s=body_timeout_s)
    announce(f"serving {store.root} on http://{host}:{port}{API}")
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, http=json_errors_protocol())


def json_errors_protocol():
    """uvicorn's h11 protocol, answering a request it cannot parse (a bad request line, header or body framing)
    with a JSON body like every other refusal, instead of plain text. The app never sees such a request."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorsH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            import h11

            body = json.dumps({"detail": f"malformed HTTP request ({msg.rstrip('.')}): the request line, a header "
                                         "or the body's framing cannot be parsed"}).encode()
            for event in (h11.Response(status_code=400, reason=b"Bad Request", headers=[
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]), h11.Data(data=body), h11.EndOfMessage()):
                try:
                    self.transport.write(self.conn.send(event))
                except h11.LocalProtocolError:  # the connection's state allows no answer any more
                    break
            self.transport.close()

    return JsonErrorsH11Protocol

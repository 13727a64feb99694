"""The review workflow as a pure-Python state machine: what the Slicer widget drives, without Qt or MRML.

    session = ReviewSession(SSLSegmentClient(url, token), work_dir, annotator="alice")
    session.connect()                                   # health + info, model version
    case = session.fetch_next_case()                    # most uncertain unreviewed case (a lease is taken)
    result = session.infer()                            # label + uncertainty volumes + ranked review regions
    region = session.next_region()                      # the widget centres the views on region.centroid_lps
    ...                                                 # the clinician corrects the label map in Slicer
    session.submit(corrected_label)                     # label + reviewed mask (visited ∪ edited) + model version
    job = session.start_training(); session.training_status()

States: disconnected → connected → case_loaded → inferred → submitted (→ case_loaded with the next case).
A step called out of order raises `SessionError` with a message that says what to do first; a backend error
propagates as the client's `BackendError` subclass, and the session keeps the state it had before the call, so the
clinician can retry without losing the case, the visited regions or the corrections.

Beside it in this package: `tasks.BackgroundTask` (a call on a worker thread), `local_backend.LocalBackend` (a server
and worker on this machine) and `requirements` (the dependency check).
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SSLSegmentLib.review.client import BackendUnavailable, SSLSegmentClient
from SSLSegmentLib.data.contract import validate_case_id
from SSLSegmentLib.data.volume import ImageError, Volume
from SSLSegmentLib.data.imageio import read_label, read_volume, write_volume
from SSLSegmentLib.data.regions import ReviewRegion, find_review_regions, visited_mask

log = logging.getLogger(__name__)

UNCERTAINTY_KINDS = ("entropy", "mutual_information")
JOB_FINISHED = ("succeeded", "failed", "cancelled")


class SessionState(str, enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    CASE_LOADED = "case_loaded"
    INFERRED = "inferred"
    SUBMITTED = "submitted"


class SessionError(RuntimeError):
    """A step called out of order or with unusable input; the message tells the user what to do."""


def reviewed_mask(rank_map: np.ndarray, visited_ranks, predicted: np.ndarray, corrected: np.ndarray) -> np.ndarray:
    """uint8 (z, y, x): 1 where the clinician reviewed the label = visited regions ∪ voxels whose label changed.

    rank_map: int (z, y, x) region ranks (0 = no region), from `find_review_regions`.
    predicted / corrected: label maps (z, y, x) before and after the correction, on the same grid.
    """
    if not (rank_map.shape == predicted.shape == corrected.shape):
        raise ValueError(f"shapes differ: regions {rank_map.shape}, predicted {predicted.shape}, "
                         f"corrected {corrected.shape}")
    return (visited_mask(rank_map, visited_ranks).astype(bool) | (predicted != corrected)).astype(np.uint8)


@dataclass
class CaseInfo:
    """The case under review. image_path: a local copy of its image (downloaded or the user's own file)."""

    case_id: str
    image_path: Path
    split: str | None = None
    score: float | None = None
    lease_expires: str | None = None
    record: dict = field(default_factory=dict)


@dataclass
class InferenceResult:
    """One inference of the current model on the case, loaded and ready to show.

    label: predicted label map; uncertainty: {"entropy", "mutual_information"} volumes in [0, 1] (z, y, x);
    regions: ranked review regions of `uncertainty[kind] > threshold`; rank_map: their voxels (rank, 0 elsewhere).
    """

    model_version: str
    inference_id: str | None
    paths: dict[str, Path]
    label: Volume
    uncertainty: dict[str, Volume]
    kind: str
    threshold: float
    regions: list[ReviewRegion]
    rank_map: np.ndarray
    server_regions: list[ReviewRegion]

    @property
    def server_regions_match(self) -> bool:
        """True when the regions recomputed here are the server's (same ranks, sizes and bounding boxes)."""
        key = lambda r: (r.rank, r.voxel_count, tuple(r.bbox_min_ijk), tuple(r.bbox_max_ijk))  # noqa: E731
        return [key(r) for r in self.regions] == [key(r) for r in self.server_regions]


class ReviewSession:
    """One annotator's review of cases on one backend.

    client: an `SSLSegmentClient`. work_dir: a folder for downloaded images, inference outputs and submitted files
    (kept, so a failed submit can be retried and a submitted correction can be audited). region_min_voxels /
    max_regions: passed to the backend's inference and used to recompute the same regions locally.
    """

    def __init__(self, client: SSLSegmentClient, work_dir: str | os.PathLike, annotator: str = "anonymous",
                 region_min_voxels: int = 8, max_regions: int = 50):
        if region_min_voxels < 1:
            raise ValueError(f"region_min_voxels must be >= 1, got {region_min_voxels}")
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        self.client = client
        self.work_dir = Path(work_dir)
        self.annotator = validate_author(annotator)
        self.region_min_voxels = int(region_min_voxels)
        self.max_regions = int(max_regions)
        self.state = SessionState.DISCONNECTED
        self.server_info: dict = {}
        self.case: CaseInfo | None = None
        self.image: Volume | None = None
        self.result: InferenceResult | None = None
        self.current_index: int | None = None
        self.visited: set[int] = set()
        self.last_submission: dict | None = None
        self.job: dict | None = None

    # ---- connection ---------------------------------------------------------------------------------------

    def connect(self) -> dict:
        """Check the backend is up and the token is accepted; returns /info (with "current_model")."""
        self.client.health()
        info = self.client.info()  # needs the token: a wrong one fails here, not in the middle of a review
        self.server_info = info
        if self.state == SessionState.DISCONNECTED:
            self.state = SessionState.CONNECTED
        return info

    @property
    def model_version(self) -> str | None:
        if self.result is not None:
            return self.result.model_version
        return self.server_info.get("current_model")

    def _require(self, *states: SessionState, action: str) -> None:
        if self.state not in states:
            hints = {
                SessionState.DISCONNECTED: "connect to a backend first",
                SessionState.CONNECTED: "load a case first (next case, or send the current volume)",
                SessionState.CASE_LOADED: "run the model on the case first",
                SessionState.INFERRED: "the case is not submitted yet",
                SessionState.SUBMITTED: "this case is already submitted; load the next case",
            }
            raise SessionError(f"cannot {action}: {hints[self.state]}")

    # ---- cases --------------------------------------------------------------------------------------------

    def _case_dir(self, case_id: str) -> Path:
        return self.work_dir / "cases" / validate_case_id(case_id)

    def _start_case(self, case: CaseInfo) -> CaseInfo:
        self.image = read_volume(case.image_path)
        self.case = case
        self.result = None
        self.current_index = None
        self.visited = set()
        self.last_submission = None
        self.state = SessionState.CASE_LOADED
        return case

    def fetch_next_case(self, strategy: str = "uncertainty") -> CaseInfo | None:
        """Lease the next case to review and download its image; None when nothing is left to review."""
        self._require(SessionState.CONNECTED, SessionState.CASE_LOADED, SessionState.INFERRED,
                      SessionState.SUBMITTED, action="fetch a case")
        if self.state in (SessionState.CASE_LOADED, SessionState.INFERRED) and self.case is not None:
            # Moving on without submitting: give the lease back so a colleague can take the case.
            self.skip_case()
        record = self.client.next_case(strategy=strategy, annotator=self.annotator)
        if record is None:
            return None
        case_id = record["case_id"]
        folder = self._case_dir(case_id)
        image_path = self.client.download_image(case_id, folder / "image.nrrd")
        return self._start_case(CaseInfo(case_id, Path(image_path), record.get("split"), record.get("score"),
                                         record.get("lease_expires"), record))

    def open_image(self, image_path: str | os.PathLike, case_id: str | None = None) -> CaseInfo:
        """Register a local image with the backend (e.g. the volume shown in Slicer) and review it."""
        self._require(SessionState.CONNECTED, SessionState.CASE_LOADED, SessionState.INFERRED,
                      SessionState.SUBMITTED, action="open an image")
        path = Path(image_path)
        read_volume(path)  # a clear local error before anything is uploaded
        if case_id is not None:
            validate_case_id(case_id)
        if self.state in (SessionState.CASE_LOADED, SessionState.INFERRED) and self.case is not None:
            self.skip_case()
        record = self.client.upload_case(path, case_id=case_id)
        return self._start_case(CaseInfo(record["case_id"], path, record.get("split"), record.get("score"),
                                         None, record))

    def skip_case(self) -> None:
        """Give the case back without submitting (releases the lease)."""
        if self.case is None:
            return
        try:
            self.client.release_case(self.case.case_id, annotator=self.annotator)
        except BackendUnavailable:
            log.warning("could not release the lease on the current case; it expires by itself")
        self.case, self.image, self.result = None, None, None
        self.current_index, self.visited = None, set()
        self.state = SessionState.CONNECTED

    # ---- inference and regions ----------------------------------------------------------------------------

    def infer(self, passes: int | None = None, uncertainty: str = "entropy", threshold: float = 0.5) -> InferenceResult:
        """Run the current model on the case; load the outputs and rank the review regions of `uncertainty`."""
        self._require(SessionState.CASE_LOADED, SessionState.INFERRED, action="run the model")
        if uncertainty not in UNCERTAINTY_KINDS:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_KINDS}, got {uncertainty!r}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if passes is not None and passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        case = self.case
        out_dir = self._case_dir(case.case_id) / "inference"
        answer = self.client.infer(case.case_id, out_dir, passes=passes, threshold=threshold,
                                   min_voxels=self.region_min_voxels, max_regions=self.max_regions,
                                   uncertainty=uncertainty)
        paths = {k: Path(v) for k, v in answer["paths"].items()}
        label = read_label(paths["label"], self.image)  # also checks the output is on the image's grid
        maps = {}
        for kind in UNCERTAINTY_KINDS:
            vol = read_volume(paths[kind])
            if vol.shape != self.image.shape or not vol.geometry.matches(self.image.geometry):
                raise ImageError(f"{paths[kind]}: the {kind} map is not on the image's grid")
            vol.array = np.clip(np.nan_to_num(vol.array.astype(np.float32)), 0.0, 1.0)
            maps[kind] = vol
        kind = answer.get("uncertainty_kind", uncertainty)
        used_threshold = float(answer.get("threshold", threshold))
        regions, rank_map = find_review_regions(maps[kind].array, used_threshold, self.region_min_voxels,
                                                self.max_regions, self.image.geometry)
        server_regions = [ReviewRegion.from_dict(r) for r in answer.get("regions", [])]
        self.result = InferenceResult(answer["model_version"], answer.get("inference_id"), paths, label, maps, kind,
                                      used_threshold, regions, rank_map, server_regions)
        if not self.result.server_regions_match:
            log.warning("review regions recomputed locally differ from the backend's; showing the local ones, "
                        "which are the ones the reviewed mask is built from")
        self.current_index, self.visited = None, set()
        self.state = SessionState.INFERRED
        return self.result

    def recompute_regions(self, kind: str | None = None, threshold: float | None = None) -> list[ReviewRegion]:
        """Re-rank regions on the other uncertainty map or another threshold (visited marks are reset)."""
        self._require(SessionState.INFERRED, action="recompute regions")
        kind = kind or self.result.kind
        if kind not in UNCERTAINTY_KINDS:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_KINDS}, got {kind!r}")
        threshold = self.result.threshold if threshold is None else float(threshold)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        regions, rank_map = find_review_regions(self.result.uncertainty[kind].array, threshold,
                                                self.region_min_voxels, self.max_regions, self.image.geometry)
        self.result.regions, self.result.rank_map = regions, rank_map
        self.result.kind, self.result.threshold = kind, threshold
        self.current_index, self.visited = None, set()
        return regions

    @property
    def regions(self) -> list[ReviewRegion]:
        return self.result.regions if self.result is not None else []

    @property
    def current_region(self) -> ReviewRegion | None:
        return None if self.current_index is None else self.regions[self.current_index]

    def go_to_region(self, index: int) -> ReviewRegion:
        """Make region `index` (0-based, rank order) current and mark it visited."""
        self._require(SessionState.INFERRED, action="visit a region")
        if not self.regions:
            raise SessionError("there are no review regions above the threshold in this case")
        if not 0 <= index < len(self.regions):
            raise IndexError(f"region index {index} out of range (0..{len(self.regions) - 1})")
        self.current_index = index
        region = self.regions[index]
        self.visited.add(region.rank)
        return region

    def next_region(self) -> ReviewRegion:
        """The next region in rank order (the first one at the start); stays on the last one at the end."""
        index = 0 if self.current_index is None else min(self.current_index + 1, len(self.regions) - 1)
        return self.go_to_region(index)

    def previous_region(self) -> ReviewRegion:
        index = 0 if self.current_index is None else max(self.current_index - 1, 0)
        return self.go_to_region(index)

    def unvisited_ranks(self) -> list[int]:
        return [r.rank for r in self.regions if r.rank not in self.visited]

    # ---- corrections and submission -----------------------------------------------------------------------

    def _corrected_array(self, corrected) -> np.ndarray:
        array = corrected.array if isinstance(corrected, Volume) else np.asarray(corrected)
        if array.shape != self.image.shape:
            raise ImageError(f"corrected label {array.shape} is not on the image grid {self.image.shape} (z, y, x)")
        if isinstance(corrected, Volume) and not corrected.geometry.matches(self.image.geometry):
            raise ImageError("corrected label geometry does not match the image")
        if not np.issubdtype(array.dtype, np.integer):
            raise ImageError("a corrected label map must hold integer values")
        return array.astype(np.uint8)

    def edited_mask(self, corrected) -> np.ndarray:
        """uint8 (z, y, x): voxels whose label differs from the model's prediction."""
        self._require(SessionState.INFERRED, SessionState.SUBMITTED, action="compare with the prediction")
        return (self._corrected_array(corrected) != self.result.label.array).astype(np.uint8)

    def reviewed_mask(self, corrected) -> np.ndarray:
        """uint8 (z, y, x): visited regions ∪ edited voxels."""
        self._require(SessionState.INFERRED, SessionState.SUBMITTED, action="build the reviewed mask")
        return reviewed_mask(self.result.rank_map, self.visited, self.result.label.array,
                             self._corrected_array(corrected))

    def submit(self, corrected, whole_case: bool = False) -> dict:
        """Send the corrected label to the backend with the reviewed mask and the model version.

        whole_case: the clinician checked every voxel, so this is a final label (no mask). Otherwise a correction
        whose reviewed mask is the visited regions plus the edited voxels; an empty mask (nothing visited, nothing
        edited) is refused because it would teach the model nothing.
        """
        self._require(SessionState.INFERRED, action="submit")
        array = self._corrected_array(corrected)
        folder = self._case_dir(self.case.case_id) / "submitted"
        n = 1
        while (folder / f"r{n}").exists():
            n += 1
        folder = folder / f"r{n}"
        label_path = write_volume(self.image.like(array), folder / "label.nrrd", overwrite=False)
        if whole_case:
            mask_path, kind, reviewed = None, "final", int(array.size)
        else:
            mask = reviewed_mask(self.result.rank_map, self.visited, self.result.label.array, array)
            reviewed = int(mask.sum())
            if reviewed == 0:
                raise SessionError("nothing was reviewed: visit at least one region or edit the segmentation "
                                   "(or submit the whole case as a final label)")
            mask_path = write_volume(self.image.like(mask), folder / "reviewed_mask.nrrd", overwrite=False)
            kind = "correction"
        revision = self.client.submit_label(self.case.case_id, label_path, kind=kind, reviewed_mask_path=mask_path,
                                            model_version=self.result.model_version, author=self.annotator,
                                            inference_id=self.result.inference_id)
        self.last_submission = {"revision": revision, "kind": kind, "reviewed_voxels": reviewed,
                                "label_path": label_path, "reviewed_mask_path": mask_path}
        self.state = SessionState.SUBMITTED
        return revision

    # ---- training and models ------------------------------------------------------------------------------

    def start_training(self, **params) -> dict:
        self._require(SessionState.CONNECTED, SessionState.CASE_LOADED, SessionState.INFERRED,
                      SessionState.SUBMITTED, action="start training")
        if self.job is not None and self.job.get("status") not in JOB_FINISHED:
            raise SessionError(f"training job {self.job['job_id']} is still {self.job['status']}; stop it first")
        self.job = self.client.start_training(**params)
        return self.job

    def training_status(self) -> dict | None:
        if self.job is None:
            return None
        self.job = self.client.job_status(self.job["job_id"])
        if self.job["status"] == "succeeded":
            self.server_info["current_model"] = self.client.current_model()
        return self.job

    def cancel_training(self) -> dict | None:
        if self.job is None or self.job.get("status") in JOB_FINISHED:
            return self.job
        self.job = self.client.cancel_job(self.job["job_id"])
        return self.job

    def models(self) -> list[dict]:
        return self.client.models()

    def promote(self, version: str) -> dict:
        answer = self.client.promote(version)
        self.server_info["current_model"] = answer.get("current", version)
        return answer


def validate_author(name: str) -> str:
    """Annotator names become folder names on the backend: the case-id alphabet."""
    try:
        return validate_case_id(name)
    except ValueError:
        raise ValueError(f"invalid annotator name {name!r}: use letters, digits, '_', '-', '.'") from None


def describe_job(job: dict | None) -> str:
    """One line for a status label: state, step, loss, validation Dice, ETA, outcome."""
    if not job:
        return "No training job."
    status = job.get("status", "?")
    progress = job.get("progress") or {}
    parts = [f"Training {status}"]
    if progress.get("iterations"):
        parts.append(f"step {progress.get('step', 0)}/{progress['iterations']}")
    if progress.get("val_dice") is not None:
        parts.append(f"val Dice {progress['val_dice']:.3f}")
    if status == "running" and progress.get("eta_s") is not None:
        parts.append(f"about {max(0, int(progress['eta_s']))} s left")
    result = job.get("result") or {}
    if status == "succeeded" and result:
        verdict = "now current" if result.get("promoted") else f"not promoted ({result.get('reason', 'no reason')})"
        parts.append(f"→ {result.get('model_version', '?')} {verdict}")
    if status == "failed" and job.get("error"):
        parts.append(f": {job['error']}")
    return ", ".join(parts)


def job_fraction(job: dict | None) -> float:
    """Progress in [0, 1] for a progress bar."""
    if not job:
        return 0.0
    if job.get("status") == "succeeded":
        return 1.0
    progress = job.get("progress") or {}
    total = progress.get("iterations") or 0
    return float(min(1.0, max(0.0, progress.get("step", 0) / total))) if total else 0.0

"""The review workflow as a pure-Python state machine: what the Slicer widget drives, without Qt or MRML.

    session = ReviewSession(SSLSegmentClient(url, token), work_dir, annotator="alice")
    session.connect()                                   # health + info, model version
    case = session.fetch_next_case()                    # most uncertain unreviewed case (a lease is taken)
    result = session.infer()                            # label + uncertainty map + the backend's ranked regions
    region = session.next_region()                      # the widget centres the views on region.centroid_lps
    session.recompute_regions(kind="mutual_information")  # the other map: the backend re-ranks, no new forward pass
    ...                                                 # the clinician corrects the label map in Slicer
    session.submit(corrected_label)                     # label + reviewed mask (visited ∪ edited) + model version,
                                                        # + the uncertainty kind and threshold the clinician saw
    job = session.start_training(); session.training_status()

States: disconnected → connected → case_loaded → inferred → submitted (→ case_loaded with the next case).
A step called out of order raises `SessionError` with a message that says what to do first; a backend error
propagates as the client's `BackendError` subclass, and the session keeps the state it had before the call, so the
clinician can retry without losing the case, the visited regions or the corrections.

The review regions are the backend's: it computes them once, where the uncertainty map is made, and serves their
rank map beside the list; the session never recomputes them. The session owns which uncertainty map (kind) and which
threshold the clinician is shown, and sends both with the submission so the backend archives exactly that map.

Beside it in this package: `tasks.BackgroundTask` (a call on a worker thread), `local_backend.LocalBackend` (a server
and worker on this machine) and `requirements` (the dependency check).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SSLSegmentLib.data.contract import (
    DEFAULT_UNCERTAINTY,
    validate_author,
    validate_case_id,
    validate_threshold,
    validate_uncertainty_kind,
)
from SSLSegmentLib.data.imageio import read_label, read_volume, write_volume
from SSLSegmentLib.data.regions import ReviewRegion, check_rank_map, visited_mask
from SSLSegmentLib.data.volume import ImageError, Volume
from SSLSegmentLib.review.client import BackendError, BackendUnavailable, SSLSegmentClient

log = logging.getLogger(__name__)

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

    rank_map: int (z, y, x) region ranks (0 = no region), the backend's region map.
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

    label: predicted label map (z, y, x) on the image grid. uncertainty: the maps downloaded so far, by kind, values
    in [0, 1] (z, y, x); `uncertainty[kind]` (`uncertainty_map`) is the one shown and the one the regions are of.
    regions: the backend's ranked review regions of that map above `threshold`, rank 1 first; rank_map: the backend's
    int32 region map (each region's rank, 0 elsewhere), what the reviewed mask is built from. paths: the downloaded
    files by volume name; answer: the backend's latest answer for this inference.
    """

    model_version: str
    inference_id: str
    passes: int | None
    label: Volume
    uncertainty: dict[str, Volume]
    kind: str
    threshold: float
    regions: list[ReviewRegion]
    rank_map: np.ndarray
    paths: dict[str, Path] = field(default_factory=dict)
    answer: dict = field(default_factory=dict)

    @property
    def uncertainty_map(self) -> Volume:
        return self.uncertainty[self.kind]


@dataclass
class RankedRegions:
    """Regions of one inference fetched by `ReviewSession.fetch_regions`, not yet applied: the backend's regions of
    the `kind` map above `threshold`, their region map, the map itself when it was not downloaded before, the answer,
    and the staging folder holding the downloaded files until `apply_regions` keeps them."""

    inference_id: str
    kind: str
    threshold: float
    regions: list[ReviewRegion]
    rank_map: np.ndarray
    uncertainty: Volume | None
    answer: dict
    staging: Path


@dataclass
class PendingInference:
    """What `fetch_inference` read, not yet under review: `apply_inference` makes it so, on the main thread."""

    case_id: str
    kind: str
    passes: int | None
    answer: dict
    staging: Path
    label: Volume
    maps: dict
    regions: list
    rank_map: np.ndarray


@dataclass(frozen=True)
class PendingSubmission:
    """A submission written to disk and named (`submission_id`), not yet sent or not yet recorded."""

    case_id: str
    inference_id: str
    model_version: str
    kind: str
    label_path: Path
    mask_path: Path | None
    reviewed: int
    uncertainty_kind: str
    threshold: float
    submission_id: str


class ReviewSession:
    """One annotator's review of cases on one backend.

    client: an `SSLSegmentClient`. work_dir: a folder for downloaded images, inference outputs and submitted files
    (kept, so a failed submit can be retried and a submitted correction can be audited). region_min_voxels /
    max_regions: the backend's region options. uncertainty / threshold: the map shown and the threshold of its review
    regions until `infer` or `recompute_regions` is given others (the session keeps the last ones asked for).
    """

    def __init__(self, client: SSLSegmentClient, work_dir: str | os.PathLike, annotator: str = "anonymous",
                 region_min_voxels: int = 8, max_regions: int = 50, uncertainty: str = DEFAULT_UNCERTAINTY,
                 threshold: float = 0.5):
        if region_min_voxels < 1:
            raise ValueError(f"region_min_voxels must be >= 1, got {region_min_voxels}")
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        self.client = client
        self.work_dir = Path(work_dir)
        self.annotator = validate_author(annotator)
        self.region_min_voxels = int(region_min_voxels)
        self.max_regions = int(max_regions)
        self.uncertainty_kind = validate_uncertainty_kind(uncertainty)
        self.threshold = validate_threshold(threshold)
        self.state = SessionState.DISCONNECTED
        self.server_info: dict = {}
        self.case: CaseInfo | None = None
        self.image: Volume | None = None
        self.result: InferenceResult | None = None
        self.current_index: int | None = None
        self.visited: set[int] = set()
        self.last_submission: dict | None = None
        self.job: dict | None = None
        self._prepared: PendingSubmission | None = None

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
        self._prepared = None
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

    def open_case(self, case_id: str) -> CaseInfo:
        """Review a case the backend already has, picked by id (e.g. from `client.list_cases()`), and download its
        image. No lease is taken: the backend leases only the cases it hands out (`fetch_next_case`), so a colleague
        may be given a picked case meanwhile."""
        self._require(SessionState.CONNECTED, SessionState.CASE_LOADED, SessionState.INFERRED,
                      SessionState.SUBMITTED, action="open a case")
        validate_case_id(case_id)
        record = self.client.get_case(case_id)  # an unknown id fails here, before the current case is given back
        if self.state in (SessionState.CASE_LOADED, SessionState.INFERRED) and self.case is not None:
            self.skip_case()
        image_path = self.client.download_image(case_id, self._case_dir(case_id) / "image.nrrd")
        return self._start_case(CaseInfo(case_id, Path(image_path), record.get("split"), record.get("score"),
                                         None, record))

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
        self._prepared = None
        self.state = SessionState.CONNECTED

    # ---- inference and regions ----------------------------------------------------------------------------

    def infer(self, passes: int | None = None, uncertainty: str | None = None,
              threshold: float | None = None) -> InferenceResult:
        """Run the current model on the case (the backend reuses a cached run) and load what the review shows: the
        label, the `uncertainty` map and the backend's review regions above `threshold` with their region map.

        uncertainty / threshold: None keeps the session's current ones; given ones become the session's.
        `fetch_inference` (network, any thread) + `apply_inference` (the session's state, main thread).
        """
        return self.apply_inference(self.fetch_inference(passes, uncertainty, threshold))

    def fetch_inference(self, passes: int | None = None, uncertainty: str | None = None,
                        threshold: float | None = None) -> "PendingInference":
        """The network half of `infer`: asks, downloads and reads, changing nothing in the session, so a call that
        is cancelled (its result dropped) leaves the review exactly as it was."""
        self._require(SessionState.CASE_LOADED, SessionState.INFERRED, action="run the model")
        kind = self.uncertainty_kind if uncertainty is None else validate_uncertainty_kind(uncertainty)
        threshold = self.threshold if threshold is None else validate_threshold(threshold)
        if passes is not None and passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        case, image = self.case, self.image
        answer, staging = self._ask(kind, threshold, passes, download=None)
        try:
            incoming = answer["paths"]
            label = read_label(incoming["label"], image)  # also checks the output is on the image's grid
            maps = {kind: self._read_map(incoming[kind], kind)}
            regions, rank_map = self._read_regions(answer, incoming["regions"])
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return PendingInference(case.case_id, kind, passes, answer, staging, label, maps, regions, rank_map)

    def apply_inference(self, pending: "PendingInference") -> InferenceResult:
        """Make a fetched inference the one under review (main thread); refused if the case changed meanwhile."""
        try:
            self._require(SessionState.CASE_LOADED, SessionState.INFERRED, action="show the model's output")
            if self.case is None or pending.case_id != self.case.case_id:
                raise SessionError(f"this inference is of case {pending.case_id}, not of the case under review")
            # Kept only now: a failure or a cancel leaves the previous result and its files as they were.
            paths = self._keep(pending.answer["paths"])
        finally:
            shutil.rmtree(pending.staging, ignore_errors=True)
        answer = {k: v for k, v in pending.answer.items() if k != "paths"}  # the kept files are `paths`
        self.result = InferenceResult(answer["model_version"], answer["inference_id"],
                                      answer.get("passes", pending.passes), pending.label, pending.maps, pending.kind,
                                      float(answer["threshold"]), pending.regions, pending.rank_map, paths, answer)
        self.uncertainty_kind, self.threshold = pending.kind, self.result.threshold
        self.current_index, self.visited = None, set()
        self._prepared = None
        self.state = SessionState.INFERRED
        return self.result

    def recompute_regions(self, kind: str | None = None, threshold: float | None = None) -> list[ReviewRegion]:
        """Show another uncertainty map or threshold: the backend ranks the regions of the same inference again (a
        cache hit, no new forward pass); the region map (and the map, the first time a kind is shown) is downloaded.
        The visited marks are reset: the regions they referred to are gone. `fetch_regions` + `apply_regions`."""
        return self.apply_regions(self.fetch_regions(kind, threshold))

    def fetch_regions(self, kind: str | None = None, threshold: float | None = None) -> RankedRegions:
        """The network half of `recompute_regions`, changing nothing in the session (safe on a worker thread whose
        result may be abandoned). kind / threshold: None keeps the current inference's."""
        self._require(SessionState.INFERRED, action="recompute regions")
        result = self.result
        kind = result.kind if kind is None else validate_uncertainty_kind(kind)
        threshold = result.threshold if threshold is None else validate_threshold(threshold)
        download = ["regions"] if kind in result.uncertainty else [kind, "regions"]
        answer, staging = self._ask(kind, threshold, result.passes, download=download)
        try:
            if answer["inference_id"] != result.inference_id:
                # These regions would be of another prediction than the one the clinician is correcting.
                raise SessionError(f"the backend now serves model {answer['model_version']} (this case was run with "
                                   f"{result.model_version}); run the model again to review its output")
            incoming = answer["paths"]
            heat = None if kind in result.uncertainty else self._read_map(incoming[kind], kind)
            regions, rank_map = self._read_regions(answer, incoming["regions"])
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return RankedRegions(answer["inference_id"], kind, float(answer["threshold"]), regions, rank_map, heat,
                             answer, staging)

    def apply_regions(self, ranked: RankedRegions) -> list[ReviewRegion]:
        """Make fetched regions the ones under review (main thread): the map they are of is shown from now on and
        the visited marks are reset."""
        self._require(SessionState.INFERRED, action="show recomputed regions")
        result = self.result
        if ranked.inference_id != result.inference_id:
            raise SessionError("these regions belong to an earlier inference of the case; recompute them")
        try:
            result.paths.update(self._keep(ranked.answer["paths"]))
        finally:
            shutil.rmtree(ranked.staging, ignore_errors=True)
        if ranked.uncertainty is not None:
            result.uncertainty = {**result.uncertainty, ranked.kind: ranked.uncertainty}
        result.kind, result.threshold = ranked.kind, ranked.threshold
        result.regions, result.rank_map = ranked.regions, ranked.rank_map
        result.answer = {k: v for k, v in ranked.answer.items() if k != "paths"}
        self.uncertainty_kind, self.threshold = ranked.kind, ranked.threshold
        self.current_index, self.visited = None, set()
        return ranked.regions

    def _inference_dir(self) -> Path:
        return self._case_dir(self.case.case_id) / "inference"

    def _ask(self, kind: str, threshold: float, passes: int | None, download) -> tuple[dict, Path]:
        """POST /infer, downloading into a fresh staging folder (`_keep` moves the files into place once read)."""
        folder = self._inference_dir()
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=folder))
        try:
            answer = self.client.infer(self.case.case_id, staging, passes=passes, threshold=threshold,
                                       min_voxels=self.region_min_voxels, max_regions=self.max_regions,
                                       uncertainty=kind, download=download)
            if answer.get("uncertainty_kind") != kind:
                raise BackendError(None, f"the backend answered with the {answer.get('uncertainty_kind')!r} map, "
                                         f"not the {kind!r} map asked for")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        answer["paths"] = {k: Path(v) for k, v in answer["paths"].items()}
        return answer, staging

    def _keep(self, incoming: dict[str, Path]) -> dict[str, Path]:
        folder = self._inference_dir()
        kept = {}
        for name, path in incoming.items():
            kept[name] = folder / path.name
            os.replace(path, kept[name])
        return kept

    def _read_map(self, path: Path, kind: str) -> Volume:
        vol = read_volume(path)
        if vol.shape != self.image.shape or not vol.geometry.matches(self.image.geometry):
            raise ImageError(f"{path}: the {kind} map is not on the image's grid")
        vol.array = np.clip(np.nan_to_num(vol.array.astype(np.float32)), 0.0, 1.0)
        return vol

    def _read_regions(self, answer: dict, path: Path) -> tuple[list[ReviewRegion], np.ndarray]:
        """The answer's regions and the downloaded region map, checked against each other and the image grid."""
        regions = [ReviewRegion.from_dict(r) for r in answer.get("regions", [])]
        vol = read_volume(path)
        if vol.shape != self.image.shape or not vol.geometry.matches(self.image.geometry):
            raise ImageError(f"{path}: the region map is not on the image's grid")
        try:
            return regions, check_rank_map(vol.array, regions)
        except ImageError as exc:
            raise ImageError(f"{path}: {exc}") from None

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
        """Send the corrected label to the backend with the reviewed mask, the model version, the inference and the
        uncertainty kind and threshold the clinician was shown.

        whole_case: the clinician checked every voxel, so this is a final label (no mask). Otherwise a correction
        whose reviewed mask is the visited regions plus the edited voxels; an empty mask (nothing visited, nothing
        edited) is refused because it would teach the model nothing.
        `prepare_submission` (files, main thread) + `send_submission` (network, any thread) + `apply_submission`.
        """
        pending = self.prepare_submission(corrected, whole_case)
        return self.apply_submission(pending, self.send_submission(pending))

    def prepare_submission(self, corrected, whole_case: bool = False) -> "PendingSubmission":
        """Write the label (and reviewed mask) to be sent and give the submission its id.

        The id is a digest of what is submitted (case, inference, kind, label, mask, annotator): sending the same
        edits again, e.g. after a Cancel whose request had reached the backend anyway, is stored once; other edits
        are another submission."""
        self._require(SessionState.INFERRED, action="submit")
        array = self._corrected_array(corrected)
        result = self.result
        if whole_case:
            mask, kind, reviewed = None, "final", int(array.size)
        else:
            mask = reviewed_mask(result.rank_map, self.visited, result.label.array, array)
            reviewed = int(mask.sum())
            if reviewed == 0:
                raise SessionError("nothing was reviewed: visit at least one region or edit the segmentation "
                                   "(or submit the whole case as a final label)")
            kind = "correction"
        digest = hashlib.sha256()
        for part in (self.case.case_id, result.inference_id, kind, self.annotator, result.kind, repr(result.threshold)):
            digest.update(str(part).encode() + b"\0")
        digest.update(np.ascontiguousarray(array).tobytes())
        if mask is not None:
            digest.update(np.ascontiguousarray(mask).tobytes())
        submission_id = digest.hexdigest()[:32]
        if self._prepared is not None and self._prepared.submission_id == submission_id:
            return self._prepared  # the same edits: the same files and the same id
        folder = self._case_dir(self.case.case_id) / "submitted"
        n = 1
        while (folder / f"r{n}").exists():
            n += 1
        folder = folder / f"r{n}"
        label_path = write_volume(self.image.like(array), folder / "label.nrrd", overwrite=False)
        mask_path = None if mask is None else write_volume(self.image.like(mask), folder / "reviewed_mask.nrrd",
                                                           overwrite=False)
        self._prepared = PendingSubmission(self.case.case_id, result.inference_id, result.model_version, kind,
                                           label_path, mask_path, reviewed, result.kind, result.threshold,
                                           submission_id)
        return self._prepared

    def send_submission(self, pending: "PendingSubmission") -> dict:
        """The network half: store the revision (once per submission id); changes nothing in the session."""
        # The kind and threshold shown: the backend archives exactly that map of this inference with the revision.
        return self.client.submit_label(pending.case_id, pending.label_path, kind=pending.kind,
                                        reviewed_mask_path=pending.mask_path, model_version=pending.model_version,
                                        author=self.annotator, inference_id=pending.inference_id,
                                        uncertainty_kind=pending.uncertainty_kind, threshold=pending.threshold,
                                        submission_id=pending.submission_id)

    def apply_submission(self, pending: "PendingSubmission", revision: dict) -> dict:
        """Record a stored submission (main thread): the case is submitted."""
        self._require(SessionState.INFERRED, action="record the submission")
        if self.case is None or pending.case_id != self.case.case_id:
            raise SessionError(f"this submission is of case {pending.case_id}, not of the case under review")
        self.last_submission = {"revision": revision, "kind": pending.kind, "reviewed_voxels": pending.reviewed,
                                "label_path": pending.label_path, "reviewed_mask_path": pending.mask_path,
                                "uncertainty_kind": pending.uncertainty_kind, "threshold": pending.threshold,
                                "submission_id": pending.submission_id}
        self._prepared = None
        self.state = SessionState.SUBMITTED
        return revision

    def withdraw_submission(self, reason: str | None = None) -> dict:
        """Undo the last Submit: its revision is taken out of training by an audited exclusion, so the case trains as
        before it (on its earlier revision, if any); the revision's files and the label history stay as they are.

        Safe to repeat (after a Cancel, say): a revision already excluded answers with its exclusion. Returns the
        exclusion record; `last_submission["withdrawn"]` holds it from then on.
        """
        self._require(SessionState.SUBMITTED, action="withdraw a submission")
        last = self.last_submission
        number = int(last["revision"]["revision"])
        case_id = self.case.case_id
        standing = [e for e in self.client.exclusions(active=True)
                    if e["case_id"] == case_id and e.get("revision") == number]
        record = standing[0] if standing else self.client.exclude(
            case_id, reason=reason or f"withdrawn by {self.annotator} in review", revision=number,
            author=self.annotator)
        last["withdrawn"] = record
        return record

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

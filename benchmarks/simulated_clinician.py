"""A simulated clinician: reviews what the backend asks it to review, fixes it with the ground truth, submits.

    clinician = SimulatedClinician(client, truth=DataSetTruth(DataSet("phantoms/")), work_dir="runs/x/clinician")
    review = clinician.review_next()   # GET /cases/next → POST /cases/{id}/infer → plan → fix → POST /cases/{id}/labels

It stands in for a person in the loop the product exists for (docs/refinement.md): per case it has a voxel budget
B = `budget_fraction` × the case's voxels (how much a clinician can look at), reviews regions until the budget is
spent, replaces the model's segmentation by the truth inside the reviewed voxels and submits that as a correction
(reviewed mask = the reviewed voxels; label = the corrected segmentation; the model version it was made against).

Review strategies, all spending the same number of voxels on a case:

- ``uncertainty`` (the product): the backend's ranked review regions, in rank order. A region that does not fit in
  what is left of the budget is reviewed in part (its most uncertain voxels: the hot core a reader of the heatmap
  looks at first), and then the budget is spent. When the regions hold fewer voxels than B, review stops early:
  the effort E of the case is what this plan spends (E <= B).
- ``random``: regions of the same voxel counts as the uncertainty plan's, as compact blobs around uniformly random
  centres: the same effort with no information about where the errors are.
- ``boundary``: the same counts around random centres on the predicted segmentation's surface: "look along the
  edge", the obvious heuristic without an uncertainty map.
- ``oracle``: the prediction's connected error components (26-connected; needs the truth), largest first, the last
  one in part: every reviewed voxel is an error. The upper reference at effort E.
- ``none``: nothing is reviewed or submitted.
- ``whole``: whole-case labeling, the MONAI Label active-learning way: the case is labeled completely (the truth
  everywhere, submitted as a final label). Its effort is not the budget but the voxels of the target's bounding box
  (truth or prediction) grown by `WHOLE_CASE_MARGIN` voxels per side, clipped to the volume: that is where a reader
  who labels a case looks voxel by voxel, while the rest of the field of view is background seen at a glance.
  Counting every voxel of the case would charge it ~10x more on LA and make any comparison a foregone conclusion.

The planning functions are pure numpy and work on (z, y, x) arrays; `SimulatedClinician` does the backend side
through `SSLSegmentClient`, so the product path is exercised for real.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from SSLSegmentLib.data.imageio import read_volume, write_volume
from SSLSegmentLib.data.regions import ReviewRegion, check_rank_map
from SSLSegmentLib.data.volume import ImageError, Volume
from SSLSegmentLib.ml.metrics import dice
from SSLSegmentLib.review.client import SSLSegmentClient

STRATEGIES = ("uncertainty", "random", "boundary", "oracle", "none", "whole")
# Voxels added on each side of the target's bounding box when counting a whole-case label's effort.
WHOLE_CASE_MARGIN = 5
SUBMIT_KINDS = ("correction", "final")

__all__ = [
    "STRATEGIES",
    "CaseReview",
    "ClinicianError",
    "DataSetTruth",
    "PendingReview",
    "ReviewPlan",
    "SimulatedClinician",
    "correct_segmentation",
    "plan_boundary",
    "plan_none",
    "plan_oracle",
    "plan_random",
    "plan_review",
    "plan_uncertainty",
    "plan_whole_case",
    "voxel_budget",
]


class ClinicianError(RuntimeError):
    """The simulated review cannot go on (volumes that do not match the ground truth, a region map that does not
    match the server's regions, ...)."""


# -- planning ---------------------------------------------------------------------------------------------------
@dataclass
class ReviewPlan:
    """Which voxels a strategy reviews on one case.

    reviewed: uint8 (z, y, x), 1 = reviewed. pieces: one entry per visited region, in visiting order:
    {"rank" (uncertainty regions) or "index", "voxels", "partial"}. budget: B; effort: the voxel count every strategy
    spends on this case (E <= B). counted: the clinician's effort when it is not the reviewed voxel count (a
    whole-case label reviews every voxel but is charged its target's box); None = the reviewed voxels.
    """

    strategy: str
    reviewed: np.ndarray
    pieces: list[dict] = field(default_factory=list)
    budget: int = 0
    effort: int = 0
    counted: int | None = None

    @property
    def spent(self) -> int:
        """The effort charged for this plan: reviewed voxels, or `counted` where that is set."""
        return int(self.reviewed.sum()) if self.counted is None else int(self.counted)

    @property
    def sizes(self) -> list[int]:
        return [int(p["voxels"]) for p in self.pieces]


def voxel_budget(shape, fraction: float) -> int:
    """B = fraction × number of voxels (rounded down, at least 1 when fraction > 0)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"budget fraction must be in [0, 1], got {fraction}")
    n = int(np.prod(shape))
    return 0 if fraction == 0 else max(1, int(math.floor(fraction * n)))


def _distances(shape, centre_zyx, spacing_zyx) -> np.ndarray:
    """Euclidean distance (mm when spacing is given) from every voxel to `centre_zyx`; (z, y, x) float32."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    d2 = np.zeros(shape, np.float32)
    for g, c, s in zip(grids, centre_zyx, spacing_zyx):
        d2 = d2 + ((g - float(c)) * float(s)) ** 2
    return np.sqrt(d2)


def _nearest(candidates: np.ndarray, centre_zyx, n: int, spacing_zyx=(1.0, 1.0, 1.0)) -> np.ndarray:
    """bool mask of the `n` candidate voxels nearest to `centre_zyx` (ties by index order; all if fewer)."""
    idx = np.flatnonzero(candidates)
    out = np.zeros(candidates.shape, bool)
    if n <= 0 or idx.size == 0:
        return out
    if idx.size <= n:
        out.flat[idx] = True
        return out
    d = _distances(candidates.shape, centre_zyx, spacing_zyx).reshape(-1)[idx]
    keep = idx[np.argsort(d, kind="stable")[:n]]
    out.flat[keep] = True
    return out


def _most_uncertain(region: np.ndarray, uncertainty: np.ndarray, n: int) -> np.ndarray:
    """bool mask of the `n` most uncertain voxels of `region` (ties by index order)."""
    idx = np.flatnonzero(region)
    out = np.zeros(region.shape, bool)
    keep = idx[np.argsort(-uncertainty.reshape(-1)[idx], kind="stable")[:max(int(n), 0)]]
    out.flat[keep] = True
    return out


def plan_uncertainty(rank_map: np.ndarray, uncertainty: np.ndarray, budget: int, spacing_zyx=(1.0, 1.0, 1.0)) -> ReviewPlan:
    """Visit the ranked regions (rank_map: int (z, y, x), rank r > 0 = region r) in rank order until `budget` voxels
    are reviewed; the region that does not fit is reviewed in part: its most uncertain voxels (the hot core of the
    heatmap, where a reader looks first)."""
    if rank_map.shape != uncertainty.shape:
        raise ValueError(f"rank map {rank_map.shape} and uncertainty {uncertainty.shape} differ in shape")
    reviewed = np.zeros(rank_map.shape, bool)
    pieces, left = [], int(budget)
    n_ranks = int(rank_map.max()) if rank_map.size else 0
    counts = np.bincount(rank_map.reshape(-1), minlength=n_ranks + 1) if n_ranks else np.zeros(1, int)
    for rank in range(1, n_ranks + 1):
        if left <= 0:
            break
        size = int(counts[rank])
        if size == 0:
            continue
        region = rank_map == rank
        if size <= left:
            reviewed |= region
            pieces.append({"rank": rank, "voxels": size, "partial": False})
            left -= size
        else:
            part = _most_uncertain(region, uncertainty, left)
            reviewed |= part
            pieces.append({"rank": rank, "voxels": int(part.sum()), "partial": True})
            left = 0
    spent = int(reviewed.sum())
    return ReviewPlan("uncertainty", reviewed.astype(np.uint8), pieces, int(budget), spent)


def _blobs(sizes, centres_from: np.ndarray, shape, rng: np.random.Generator, spacing_zyx) -> tuple[np.ndarray, list]:
    """Compact blobs of the given sizes around random centres drawn from the voxels of `centres_from` (bool),
    without overlap: each blob takes its size in not-yet-reviewed voxels nearest its centre."""
    reviewed = np.zeros(shape, bool)
    pieces = []
    pool = np.flatnonzero(centres_from)
    if pool.size == 0:
        pool = np.arange(int(np.prod(shape)))
    for i, size in enumerate(sizes):
        free = ~reviewed
        centre = np.unravel_index(int(pool[rng.integers(pool.size)]), shape)
        blob = _nearest(free, centre, int(size), spacing_zyx)
        reviewed |= blob
        pieces.append({"index": i + 1, "voxels": int(blob.sum()), "partial": False,
                       "centre_zyx": [int(c) for c in centre]})
    return reviewed, pieces


def plan_random(sizes, shape, rng: np.random.Generator, spacing_zyx=(1.0, 1.0, 1.0), budget: int | None = None) -> ReviewPlan:
    """Regions of the given voxel counts around uniformly random centres (the same effort, no information)."""
    reviewed, pieces = _blobs(sizes, np.ones(shape, bool), shape, rng, spacing_zyx)
    return ReviewPlan("random", reviewed.astype(np.uint8), pieces, int(budget if budget is not None else sum(sizes)),
                      int(sum(sizes)))


def surface(mask: np.ndarray) -> np.ndarray:
    """bool (z, y, x): voxels on the boundary of `mask` (inside and outside, 6-neighbourhood)."""
    m = mask.astype(bool)
    if not m.any():
        return np.zeros(m.shape, bool)
    return ndimage.binary_dilation(m) & ~ndimage.binary_erosion(m)


def plan_boundary(sizes, prediction: np.ndarray, rng: np.random.Generator, spacing_zyx=(1.0, 1.0, 1.0),
                  budget: int | None = None) -> ReviewPlan:
    """Regions of the given counts around random centres on the predicted segmentation's surface."""
    reviewed, pieces = _blobs(sizes, surface(prediction > 0), prediction.shape, rng, spacing_zyx)
    return ReviewPlan("boundary", reviewed.astype(np.uint8), pieces, int(budget if budget is not None else sum(sizes)),
                      int(sum(sizes)))


def plan_oracle(prediction: np.ndarray, truth: np.ndarray, effort: int, spacing_zyx=(1.0, 1.0, 1.0),
                budget: int | None = None) -> ReviewPlan:
    """The prediction's connected error components, largest first, until `effort` voxels; the last one in part
    (its voxels nearest to its centre). Spends min(effort, number of wrong voxels)."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    errors = prediction != truth
    components, n = ndimage.label(errors, structure=np.ones((3, 3, 3), bool))
    reviewed = np.zeros(prediction.shape, bool)
    pieces, left = [], int(effort)
    if n:
        counts = np.bincount(components.reshape(-1), minlength=n + 1)[1:]
        for i in np.argsort(-counts, kind="stable"):
            if left <= 0:
                break
            comp = components == (i + 1)
            size = int(counts[i])
            if size <= left:
                reviewed |= comp
                pieces.append({"index": int(i) + 1, "voxels": size, "partial": False})
                left -= size
            else:
                centre = ndimage.center_of_mass(comp)
                part = _nearest(comp, centre, left, spacing_zyx)
                reviewed |= part
                pieces.append({"index": int(i) + 1, "voxels": int(part.sum()), "partial": True})
                left = 0
    return ReviewPlan("oracle", reviewed.astype(np.uint8), pieces, int(budget if budget is not None else effort),
                      int(effort))


def plan_whole_case(prediction: np.ndarray, truth: np.ndarray, margin: int = WHOLE_CASE_MARGIN,
                    budget: int = 0) -> ReviewPlan:
    """Every voxel reviewed (the label becomes the truth everywhere); the effort charged is the bounding box of
    truth ∪ prediction grown by `margin` voxels per side and clipped to the volume (the whole volume when both are
    empty: the reader had to look everywhere to find nothing)."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    target = np.argwhere((truth > 0) | (prediction > 0))
    if target.size == 0:
        counted = int(np.prod(prediction.shape))
    else:
        lo = np.maximum(target.min(0) - margin, 0)
        hi = np.minimum(target.max(0) + margin + 1, prediction.shape)
        counted = int(np.prod(hi - lo))
    return ReviewPlan("whole", np.ones(prediction.shape, np.uint8), [], int(budget), counted, counted)


def plan_none(shape, budget: int = 0) -> ReviewPlan:
    return ReviewPlan("none", np.zeros(shape, np.uint8), [], int(budget), 0)


def plan_review(strategy: str, *, prediction: np.ndarray, uncertainty: np.ndarray, rank_map: np.ndarray, budget: int,
                truth: np.ndarray | None = None, rng: np.random.Generator | None = None,
                spacing_zyx=(1.0, 1.0, 1.0)) -> ReviewPlan:
    """One strategy's plan on one case. The uncertainty plan is computed first in every case: its spend is the
    effort the other strategies match (so "the same budget" holds voxel for voxel)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    guided = plan_uncertainty(rank_map, uncertainty, budget, spacing_zyx)
    if strategy == "uncertainty":
        return guided
    if strategy == "none":
        return plan_none(prediction.shape, budget)
    if strategy == "whole":
        if truth is None:
            raise ValueError("whole-case labeling needs the ground truth")
        return plan_whole_case(prediction, truth, budget=budget)
    rng = rng if rng is not None else np.random.default_rng(0)
    if strategy == "random":
        return plan_random(guided.sizes, prediction.shape, rng, spacing_zyx, budget)
    if strategy == "boundary":
        return plan_boundary(guided.sizes, prediction, rng, spacing_zyx, budget)
    if truth is None:
        raise ValueError("the oracle strategy needs the ground truth")
    return plan_oracle(prediction, truth, guided.effort, spacing_zyx, budget)


def correct_segmentation(prediction: np.ndarray, truth: np.ndarray, reviewed: np.ndarray) -> np.ndarray:
    """The clinician's fix: the truth inside the reviewed voxels, the model's segmentation elsewhere. uint8 (z, y, x)."""
    if not (prediction.shape == truth.shape == reviewed.shape):
        raise ValueError(f"prediction {prediction.shape}, truth {truth.shape} and reviewed mask {reviewed.shape} differ")
    out = prediction.astype(np.uint8).copy()
    m = reviewed.astype(bool)
    out[m] = truth[m]
    return out


# -- ground truth -----------------------------------------------------------------------------------------------
class DataSetTruth:
    """truth(case_id) -> uint8 (z, y, x): the final labels of a data-set folder (SSLSegmentLib.data.dataset.DataSet)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, case_id: str) -> np.ndarray:
        if case_id not in self._cache:
            self._cache[case_id] = np.asarray(self.dataset.load_label(case_id).array, np.uint8)
        return self._cache[case_id]


# -- the backend side -------------------------------------------------------------------------------------------
@dataclass
class CaseReview:
    """What one review did. Voxel counts: budget B, spent (reviewed voxels, the clinician's effort), edited (voxels
    whose label changed = errors fixed); errors and Dice of the segmentation against the truth before and after."""

    case_id: str
    strategy: str
    submit_kind: str
    model_version: str | None
    inference_id: str | None
    budget: int
    spent: int
    edited: int
    errors_before: int
    errors_after: int
    dice_before: float
    dice_after: float
    n_regions: int
    n_visited: int
    partial: bool
    revision: int | None
    seconds: float
    pieces: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PendingReview:
    """A planned review not yet submitted: the server's inference answer, the plan, and the arrays (z, y, x):
    prediction, uncertainty, truth, corrected, rank_map."""

    case_id: str
    inference: dict
    prediction_volume: Volume
    plan: ReviewPlan
    arrays: dict
    regions: list
    started: float


class SimulatedClinician:
    """Reviews cases served by a backend and submits corrections, with one strategy.

    client: an `SSLSegmentClient`. truth: case_id -> uint8 (z, y, x) ground truth (e.g. `DataSetTruth`).
    work_dir: where downloaded inference volumes and submitted files go. budget_fraction: B per case.
    case_strategy: how cases are picked (`GET /cases/next?strategy=`). submit_kind: "correction" (reviewed mask;
    the product) or "final" (the corrected segmentation as a full label, what MONAI Label does).
    infer: options of `POST /infer` (passes, threshold, min_voxels, max_regions, uncertainty); missing ones come
    from the server's settings (GET /info). The review regions and their region map are the server's.
    on_plan: optional callback(case_id, plan, arrays) for pictures (arrays: prediction, uncertainty, truth, image).
    """

    def __init__(self, client: SSLSegmentClient, truth: Callable[[str], np.ndarray], work_dir: str | os.PathLike,
                 strategy: str = "uncertainty", budget_fraction: float = 0.02, annotator: str = "simulated-clinician",
                 case_strategy: str = "uncertainty", submit_kind: str = "correction", infer: dict | None = None,
                 seed: int = 0, on_plan: Callable | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if submit_kind not in SUBMIT_KINDS:
            raise ValueError(f"submit_kind must be one of {SUBMIT_KINDS}, got {submit_kind!r}")
        voxel_budget((1,), budget_fraction)  # validates the fraction
        self.client, self.truth, self.work_dir = client, truth, Path(work_dir)
        self.strategy, self.budget_fraction, self.annotator = strategy, float(budget_fraction), annotator
        self.case_strategy, self.submit_kind, self.seed, self.on_plan = case_strategy, submit_kind, int(seed), on_plan
        settings = dict((client.info().get("settings") or {}).get("infer") or {})
        self.infer_options = {**{k: settings[k] for k in ("passes", "threshold", "min_voxels", "max_regions", "uncertainty")
                                 if k in settings}, **(infer or {})}

    def next_case(self) -> dict | None:
        """The next case the backend serves to this annotator (a lease is taken), or None."""
        return self.client.next_case(strategy=self.case_strategy, annotator=self.annotator)

    def review_next(self) -> CaseReview | None:
        case = self.next_case()
        return None if case is None else self.review(case["case_id"])

    def _rng(self, case_id: str, model_version: str | None) -> np.random.Generator:
        key = zlib.crc32(f"{self.seed}:{case_id}:{model_version}".encode())
        return np.random.default_rng(key)

    def review(self, case_id: str) -> CaseReview:
        """Infer on the server, plan the review, correct with the truth, submit (unless nothing was reviewed)."""
        return self.submit(self.prepare(case_id))

    def prepare(self, case_id: str) -> "PendingReview":
        """Everything up to the submission: POST /infer (label, uncertainty map, the server's regions and region map),
        the plan and the corrected segmentation."""
        t0 = time.time()
        out = self.work_dir / case_id
        result = self.client.infer(case_id, out / "inference", **self.infer_options)
        prediction_vol = read_volume(result["paths"]["label"])
        uncertainty = read_volume(result["paths"][result["uncertainty_kind"]]).array.astype(np.float32)
        regions = [ReviewRegion.from_dict(r) for r in result["regions"]]
        try:
            rank_map = check_rank_map(read_volume(result["paths"]["regions"]).array, regions)
        except ImageError as exc:
            raise ClinicianError(f"{case_id}: the server's review regions: {exc}") from None
        prediction = np.asarray(prediction_vol.array).astype(np.uint8)
        truth = np.asarray(self.truth(case_id))
        if truth.shape != prediction.shape:
            raise ClinicianError(f"{case_id}: ground truth {truth.shape} and the server's segmentation "
                                 f"{prediction.shape} differ in shape")
        if rank_map.shape != prediction.shape or uncertainty.shape != prediction.shape:
            raise ClinicianError(f"{case_id}: the server's region map {rank_map.shape} or uncertainty map "
                                 f"{uncertainty.shape} is not on the segmentation's grid {prediction.shape}")
        truth = truth.astype(np.uint8)
        spacing_zyx = tuple(float(s) for s in prediction_vol.geometry.spacing[::-1])
        budget = voxel_budget(prediction.shape, self.budget_fraction)
        plan = plan_review(self.strategy, prediction=prediction, uncertainty=uncertainty, rank_map=rank_map,
                           budget=budget, truth=truth, rng=self._rng(case_id, result["model_version"]),
                           spacing_zyx=spacing_zyx)
        corrected = correct_segmentation(prediction, truth, plan.reviewed)
        arrays = {"prediction": prediction, "uncertainty": uncertainty, "truth": truth, "corrected": corrected,
                  "rank_map": rank_map}
        if self.on_plan is not None:
            self.on_plan(case_id, plan, arrays)
        return PendingReview(case_id, result, prediction_vol, plan, arrays, regions, t0)

    def submit(self, pending: "PendingReview") -> CaseReview:
        """POST /cases/{id}/labels with the corrected label (and the reviewed mask for a correction); a plan that
        reviewed nothing submits nothing and gives the case back (DELETE /cases/{id}/lease)."""
        case_id, result, plan = pending.case_id, pending.inference, pending.plan
        prediction, truth, corrected = (pending.arrays[k] for k in ("prediction", "truth", "corrected"))
        revision = None
        if plan.spent > 0:
            folder = self.work_dir / case_id / f"{result['model_version']}-{self.strategy}"
            folder.mkdir(parents=True, exist_ok=True)
            like = pending.prediction_volume
            label_path = write_volume(like.like(corrected), folder / "label.nrrd", overwrite=True)
            mask_path = None
            if self.submit_kind == "correction":
                mask_path = write_volume(like.like(plan.reviewed.astype(np.uint8)), folder / "reviewed_mask.nrrd",
                                         overwrite=True)
            rev = self.client.submit_label(case_id, label_path, kind=self.submit_kind, reviewed_mask_path=mask_path,
                                           model_version=result["model_version"], author=self.annotator,
                                           inference_id=result["inference_id"],
                                           uncertainty_kind=result["uncertainty_kind"], threshold=result["threshold"])
            revision = int(rev["revision"])
        else:
            self.client.release_case(case_id, annotator=self.annotator)
        return CaseReview(
            case_id=case_id, strategy=self.strategy, submit_kind=self.submit_kind, model_version=result["model_version"],
            inference_id=result["inference_id"], budget=plan.budget, spent=plan.spent,
            edited=int((corrected != prediction).sum()), errors_before=int((prediction != truth).sum()),
            errors_after=int((corrected != truth).sum()), dice_before=dice(prediction, truth),
            dice_after=dice(corrected, truth), n_regions=len(pending.regions), n_visited=len(plan.pieces),
            partial=any(p["partial"] for p in plan.pieces), revision=revision,
            seconds=round(time.time() - pending.started, 3),
            pieces=[{k: v for k, v in p.items() if k != "centre_zyx"} for p in plan.pieces],
        )

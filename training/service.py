"""The backend's service layer: what a request does, behind the routes in training/server.py.

`InferenceService` owns inference: the current model version in memory (a `Predictor`, reloaded when the registry's
`current` pointer moves), the one lock that lets a single forward pass run at a time, the cache lookup, the
prediction, the volume writes through the datastore, the case score and the review regions (computed once, where the
map is made). `SubmissionService` owns a submission: uploaded files -> datastore revision -> maybe a retrain job.

Nothing here speaks HTTP: errors are the datastore's (NotFound, Conflict, InvalidInput), which the server maps to
status codes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from SSLSegmentLib.data import contract
from SSLSegmentLib.data.imageio import read_volume
from SSLSegmentLib.data.regions import find_review_regions
from SSLSegmentLib.data.volume import Volume

from training.datastore import (
    Conflict,
    Datastore,
    InvalidInput,
    region_view,
    validate_threshold,
    validate_uncertainty_kind,
)
from training.registry import ModelRegistry
from training.strategies import record_score

API = "/api/v1"
# The volumes of an inference a client can download, besides the rank map of its region view.
VOLUME_NAMES = ("label", "probability", *contract.UNCERTAINTY_KINDS)
log = logging.getLogger("sslsegment.service")


class CurrentModel:
    """The registry's current model version as a Predictor; reloaded when the `current` pointer changes (a promotion
    by the worker, a rollback)."""

    def __init__(self, registry: ModelRegistry, device: str = "auto"):
        self.registry, self.device = registry, device
        self.predictor = None
        self._lock = threading.Lock()

    @property
    def version(self) -> str | None:
        return self.predictor.version if self.predictor is not None else None

    def get(self):
        from SSLSegmentLib.ml.inference import Predictor

        current = self.registry.current
        if current is None:
            raise Conflict("no model version yet: train one (POST /train) or import one")
        with self._lock:
            if self.predictor is None or self.predictor.version != current:
                self.predictor = Predictor.from_checkpoint(self.registry.checkpoint_path(current), device=self.device,
                                                           version=current)
                log.info("loaded model version %s", current)
            return self.predictor


class InferenceService:
    """POST /cases/{id}/infer: segmentation, uncertainty maps and ranked review regions of a case."""

    def __init__(self, store: Datastore, registry: ModelRegistry, device: str = "auto"):
        self.store = store
        self.models = CurrentModel(registry, device)
        self._forward = threading.Lock()  # one forward at a time: bounded memory, no thread oversubscription

    def options(self, request: dict) -> dict:
        """The request's options over the datastore's inference defaults, checked."""
        opts = {**self.store.settings["infer"], **{k: v for k, v in request.items() if v is not None}}
        passes, min_voxels, max_regions = int(opts["passes"]), int(opts["min_voxels"]), int(opts["max_regions"])
        if passes < 1 or min_voxels < 1 or max_regions < 1:
            raise InvalidInput("passes, min_voxels and max_regions must be >= 1")
        return {"passes": passes, "uncertainty": validate_uncertainty_kind(opts["uncertainty"]),
                "threshold": validate_threshold(opts["threshold"]), "min_voxels": min_voxels,
                "max_regions": max_regions}

    def infer(self, case_id: str, request: dict | None = None) -> dict:
        store = self.store
        store.case(case_id)
        opts = self.options(request or {})
        passes, kind = opts["passes"], opts["uncertainty"]
        predictor = self.models.get()
        version = predictor.version
        uncertainty, geometry, cached = None, None, True
        entry = store.find_inference(case_id, version, passes)
        if entry is None:
            with self._forward:
                entry = store.find_inference(case_id, version, passes)  # another request may have made it meanwhile
                if entry is None:
                    image = store.load_image(case_id)
                    pred = predictor(image, passes=passes)
                    maps = {k: pred.uncertainty(k) for k in contract.UNCERTAINTY_KINDS}
                    meta = {"maps": {k: {"mean": float(m.mean()), "sum": float(m.sum())} for k, m in maps.items()},
                            "score": record_score(store, case_id, pred, version)}
                    entry = store.add_inference(case_id, version, passes, pred.volumes(image), meta)
                    uncertainty, geometry, cached = maps[kind], image.geometry, False
        iid = entry["inference_id"]
        if uncertainty is None:  # a cache hit: the regions come from the stored map of the requested kind
            stored = read_volume(store.inference_volume(case_id, iid, kind))
            uncertainty, geometry = stored.array, stored.geometry
        regions, rank_map = find_review_regions(uncertainty, threshold=opts["threshold"], min_voxels=opts["min_voxels"],
                                                max_regions=opts["max_regions"], geometry=geometry)
        view = region_view(kind, opts["threshold"], opts["min_voxels"], opts["max_regions"])
        store.put_region_map(case_id, iid, view, Volume(rank_map, geometry))
        base = f"{API}/cases/{case_id}/inference/{iid}"
        volumes = {n: f"{base}/{n}" for n in VOLUME_NAMES}
        volumes["regions"] = f"{base}/regions/{view}"
        return {
            "case_id": case_id, "model_version": version, "inference_id": iid, "passes": passes,
            "uncertainty_kind": kind, "threshold": opts["threshold"], "min_voxels": opts["min_voxels"],
            "max_regions": opts["max_regions"], "regions": [r.to_dict() for r in regions],
            "uncertainty_mean": float(np.mean(uncertainty)), "uncertainty_sum": float(np.sum(uncertainty)),
            "volumes": volumes, "cached": cached, "created": entry.get("created"),
        }


class SubmissionService:
    """POST /cases/{id}/labels: uploaded files -> an immutable revision -> a retrain job when enough corrections
    have arrived."""

    def __init__(self, store: Datastore):
        self.store = store

    def submit(self, case_id: str, label_file: Path, reviewed_mask_file: Path | None = None, *, kind: str = "final",
               author: str = "anonymous", model_version: str | None = None, inference_id: str | None = None,
               submission_id: str | None = None, uncertainty_kind: str | None = None,
               threshold: float | None = None) -> tuple[dict, bool]:
        store = self.store
        store.case(case_id)
        label = store.read_label_upload(case_id, label_file, "label")
        mask = store.read_label_upload(case_id, reviewed_mask_file, "reviewed mask") if reviewed_mask_file else None
        revision, created = store.add_label(case_id, label, kind=kind, author=author, reviewed_mask=mask,
                                            model_version=model_version or None, inference_id=inference_id or None,
                                            submission_id=submission_id or None, uncertainty_kind=uncertainty_kind,
                                            threshold=threshold)
        if created and kind == "correction":
            job = store.maybe_queue_retrain()
            if job is not None:
                revision["queued_job"] = job["job_id"]
        return revision, created

"""The review page's workflow without trame: the same session, scene logic and presenter as the Slicer panel.

`WebReview` drives one `ReviewSession` (the backend calls) and one `ReviewSceneLogic` (the MRML scene the web
server renders) and turns them into what the page shows (`page()`: plain strings, numbers and lists, never the
backend token). Each button is an action of two halves, as in the Slicer panel: a network half run off the event
loop (`perform` hands it to a thread) and an apply half that changes the scene on the loop's thread. One action runs
at a time; while one is in flight the presenter's `controls` disables the others.

The review itself lives here, on the web server, not in the browser: reloading the page, or opening it again, shows
the same case, the same edits and the same visited regions. The page asks before an action that would discard
unsubmitted work (`discard_question`), with the presenter's rule.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from SSLSegmentLib.data.contract import validate_uncertainty_kind
from SSLSegmentLib.review import defaults
from SSLSegmentLib.review.presenter import PanelInputs, controls, failure_hint, failure_message, unsaved_work
from SSLSegmentLib.review.scene import ReviewSceneLogic
from SSLSegmentLib.review.session import ReviewSession, SessionError, SessionState, describe_job, job_fraction

log = logging.getLogger(__name__)

JOB_ACTIVE = ("queued", "running")


@dataclass
class HeatmapDisplay:
    """How the heat map is shown: voxels below `threshold` stay uncoloured, `opacity` over the image."""

    threshold: float = defaults.HEATMAP_THRESHOLD
    opacity: float = defaults.HEATMAP_OPACITY
    visible: bool = True

    def __post_init__(self) -> None:
        low, high = defaults.HEATMAP_THRESHOLD_RANGE
        if not low <= float(self.threshold) <= high:
            raise ValueError(f"heat map threshold must be in [{low}, {high}], got {self.threshold}")
        if not 0.0 <= float(self.opacity) <= 1.0:
            raise ValueError(f"heat map opacity must be in [0, 1], got {self.opacity}")
        self.threshold, self.opacity, self.visible = float(self.threshold), float(self.opacity), bool(self.visible)


@dataclass(frozen=True)
class RunOptions:
    """What Run asks of the backend: MC-dropout passes, the uncertainty map shown and its regions' threshold."""

    passes: int = defaults.PASSES
    kind: str = "entropy"
    threshold: float = defaults.REGION_THRESHOLD

    def __post_init__(self) -> None:
        low, high = defaults.PASSES_RANGE
        if not isinstance(self.passes, int) or not low <= self.passes <= high:
            raise ValueError(f"passes must be an integer in [{low}, {high}], got {self.passes!r}")
        validate_uncertainty_kind(self.kind)
        low, high = defaults.REGION_THRESHOLD_RANGE
        if not low <= float(self.threshold) <= high:
            raise ValueError(f"region threshold must be in [{low}, {high}], got {self.threshold}")


class WebReview:
    """One reviewer's review on the web server.

    session: a `ReviewSession` on the backend (its client holds the token; nothing here copies it).
    scene: the `ReviewSceneLogic` of the scene the page's views render.
    on_segmentation: called on the loop's thread with (segmentation node, image node) after each Run, so the page
        can put the Segment Editor on the model's segmentation; on_case: called with the image node (or None) when
        the case changes, so the page can reset its views.
    """

    def __init__(self, session: ReviewSession, scene: ReviewSceneLogic,
                 on_segmentation: Callable[[Any, Any], None] | None = None,
                 on_case: Callable[[Any], None] | None = None):
        if not isinstance(session, ReviewSession):
            raise TypeError(f"session must be a ReviewSession, got {type(session).__name__}")
        if not isinstance(scene, ReviewSceneLogic):
            raise TypeError(f"scene must be a ReviewSceneLogic, got {type(scene).__name__}")
        self.session = session
        self.scene = scene
        self.on_segmentation = on_segmentation
        self.on_case = on_case
        self.display = HeatmapDisplay()
        self.image_node = None
        self.segmentation_node = None
        self.uncertainty_node = None
        self.busy: str | None = None
        self.status = "Not connected. Press Connect."
        self.error = ""
        self.hint = ""
        self.case_text = "No case."
        self.region_text = ""
        self.submit_text = ""
        self.edited = 0
        self.reviewed = 0
        self.count_text = "No edits yet."
        self.cases: list[dict] = []

    # ---- running actions ----------------------------------------------------------------------------------------

    async def perform(self, description: str, network: Callable[[], Any], apply: Callable[[Any], None]) -> bool:
        """Run `network()` on a thread, then `apply(result)` here; any failure is shown on the page, the review is
        left as it was. Refused (False) while another action runs."""
        if self.busy is not None:
            return False
        self.busy = description
        self.error = self.hint = ""
        self.status = f"{description}..."
        try:
            result = await asyncio.to_thread(network)
            apply(result)
        except Exception as exc:  # every failure reaches the page, verbatim
            self.fail(description, exc)
            return False
        finally:
            self.busy = None
        return True

    def fail(self, what: str, exc: BaseException) -> None:
        self.error = failure_message(what, exc)
        self.hint = failure_hint(exc)
        self.status = self.error
        log.warning(self.error)

    # ---- connection and cases -----------------------------------------------------------------------------------

    def connect(self):
        return "Connecting", self.session.connect, self._connected

    def _connected(self, info: dict) -> None:
        version = info.get("current_model")
        self.status = (f"Connected to {self.session.client.base_url}; "
                       f"{'model ' + version if version else 'no model yet: train one first'}.")

    def fetch_next_case(self, strategy: str = "uncertainty"):
        return "Fetching the next case", lambda: self.session.fetch_next_case(strategy=strategy), self._case_fetched

    def list_cases(self):
        """The backend's cases for the page's picker (case id, split, reviewed or not, uncertainty score)."""
        return "Listing the cases", self.session.client.list_cases, self._cases_listed

    def _cases_listed(self, cases: list[dict]) -> None:
        self.cases = [{"value": c["case_id"], "title": _case_title(c)} for c in cases]
        self.status = f"{len(cases)} cases on the backend."

    def open_case(self, case_id: str):
        return f"Opening case {case_id}", lambda: self.session.open_case(case_id), self._case_fetched

    def _case_fetched(self, case) -> None:
        self.submit_text = ""
        if case is None:
            self.scene.removeCaseNodes()
            self.image_node = self.segmentation_node = self.uncertainty_node = None
            self.case_text = "Nothing left to review: every case is reviewed or held by a colleague."
            self.status = self.case_text
            self._case_changed()
            return
        self.image_node = self.scene.showCase(case.image_path, name=case.case_id)
        self.segmentation_node = self.uncertainty_node = None
        score = f", uncertainty score {case.score:.3f}" if case.score is not None else ""
        self.case_text = f"{case.case_id} ({case.split or '?'} split{score})"
        self.region_text = "Press Run to segment the case."
        self.status = f"Case {case.case_id} loaded."
        self._case_changed()

    def _case_changed(self) -> None:
        self.edited = self.reviewed = 0
        self.count_text = "No edits yet."
        if self.on_case is not None:
            self.on_case(self.image_node)

    def skip_case(self):
        return "Giving the case back", self.session.skip_case, self._skipped

    def _skipped(self, _result) -> None:
        self.scene.removeCaseNodes()
        self.image_node = self.segmentation_node = self.uncertainty_node = None
        self.case_text = "Skipped. Fetch the next case."
        self.region_text = self.submit_text = ""
        self.status = self.case_text
        self._case_changed()

    # ---- inference and the heat map -----------------------------------------------------------------------------

    def run(self, options: RunOptions):
        if not isinstance(options, RunOptions):
            raise TypeError("options must be RunOptions")
        # The network half only: a failure leaves the segmentation on screen as it was.
        return ("Running the model",
                lambda: self.session.fetch_inference(options.passes, options.kind, options.threshold),
                self._inferred)

    def _inferred(self, pending) -> None:
        result = self.session.apply_inference(pending)
        nodes = self.scene.showInference(result, self.image_node, threshold=self.display.threshold,
                                         opacity=self.display.opacity, visible=self.display.visible)
        self.segmentation_node, self.uncertainty_node = nodes["segmentation"], nodes["uncertainty"]
        if self.on_segmentation is not None:
            self.on_segmentation(self.segmentation_node, self.image_node)
        n = len(result.regions)
        self.region_text = (f"{n} regions above {result.threshold:.2f}. Visit the most uncertain first." if n else
                            f"No region is above {result.threshold:.2f}: the model is fairly sure everywhere. "
                            "Check the whole structure anyway.")
        self.submit_text = ""
        self.status = f"Model {result.model_version} ran on {self.session.case.case_id}."
        self.recount()

    def set_heatmap(self, threshold: float | None = None, opacity: float | None = None,
                    visible: bool | None = None) -> None:
        """Change how the heat map is shown (the same display calls as the Slicer panel's sliders)."""
        current = self.display
        self.display = HeatmapDisplay(current.threshold if threshold is None else threshold,
                                      current.opacity if opacity is None else opacity,
                                      current.visible if visible is None else visible)
        node = self.uncertainty_node
        if node is None:
            return
        self.scene.setUncertaintyThreshold(node, self.display.threshold)
        self.scene.setSliceLayers(foreground=node, foregroundOpacity=self.display.opacity)
        self.scene.setUncertaintyVisible(node, self.display.visible)

    # ---- regions ------------------------------------------------------------------------------------------------

    def visit(self, index: int):
        """Centre and zoom the views on region `index` (0-based, rank order) and mark it visited."""
        return self._visit(lambda: self.session.go_to_region(index))

    def next_region(self):
        return self._visit(self.session.next_region)

    def previous_region(self):
        return self._visit(self.session.previous_region)

    def _visit(self, step):
        if self.busy is not None:
            raise SessionError(f"wait until {self.busy.lower()} has finished")
        region = step()
        self.scene.jumpToRegion(region, self.image_node)
        self.scene.markRegionVisited(region.rank)
        self.recount()  # the reviewed-voxel count grows with each visited region
        return region

    def region_rows(self) -> list[dict]:
        voxel_ml = self.scene.voxelVolumeMl(self.image_node)
        current = self.session.current_index
        return [{"index": i, "rank": r.rank, "ml": f"{r.voxel_count * voxel_ml:.2f}",
                 "uncertainty": f"{r.uncertainty_mean:.2f}", "visited": r.rank in self.session.visited,
                 "current": i == current} for i, r in enumerate(self.session.regions)]

    # ---- corrections and submission -----------------------------------------------------------------------------

    def corrected_label(self):
        return self.scene.labelArrayFromSegmentation(self.segmentation_node, self.image_node)

    def recount(self) -> None:
        """Edited voxels (differing from the model's output) and reviewed voxels (visited regions + edits)."""
        if self.session.state != SessionState.INFERRED or self.segmentation_node is None:
            return
        try:
            corrected = self.corrected_label()
            self.edited = int(self.session.edited_mask(corrected).sum())
            self.reviewed = int(self.session.reviewed_mask(corrected).sum())
        except Exception as exc:  # e.g. a segment the reviewer added that is not a model class
            self.count_text = str(exc)
            return
        ml = self.edited * self.scene.voxelVolumeMl(self.image_node)
        self.count_text = f"{self.edited} voxels edited ({ml:.2f} mL); {self.reviewed} voxels count as reviewed."

    def discard_question(self) -> str | None:
        """The question to put before an action that replaces the case or its segmentation, or None."""
        self.recount()
        return unsaved_work(self.session, self.edited)

    def submit(self, whole_case: bool = False):
        """Prepare on this thread (the label from the scene, a local copy, the named submission), send off it."""
        corrected = self.corrected_label()
        # A local copy first: if the backend is down, nothing the reviewer did is lost.
        case_dir = self.session.work_dir / "cases" / self.session.case.case_id
        self.scene.saveSegmentation(self.segmentation_node, case_dir / "corrected.seg.nrrd")
        pending = self.session.prepare_submission(corrected, whole_case=whole_case)
        return "Submitting", lambda: self.session.send_submission(pending), lambda rev: self._submitted(pending, rev)

    def _submitted(self, pending, revision: dict) -> None:
        self.session.apply_submission(pending, revision)
        last = self.session.last_submission
        self.submit_text = (f"Saved as revision {revision.get('revision', '?')} ({last['kind']}, "
                            f"{last['reviewed_voxels']} reviewed voxels, model {pending.model_version}). "
                            "Fetch the next case.")
        self.status = self.submit_text

    # ---- training -----------------------------------------------------------------------------------------------

    def start_training(self, iterations: int = defaults.TRAIN_ITERATIONS):
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        return "Queueing a training job", lambda: self.session.start_training(iterations=iterations), self._queued

    def _queued(self, job: dict) -> None:
        self.status = f"Training job {job.get('job_id', '?')} queued."

    def training_active(self) -> bool:
        job = self.session.job
        return job is not None and job.get("status") in JOB_ACTIVE

    def poll_training(self) -> dict | None:
        """The job's status from the backend (network; any thread: it changes only the session's job record)."""
        return self.session.training_status()

    # ---- what the page shows ------------------------------------------------------------------------------------

    def page(self) -> dict:
        """Everything the page shows, as plain values (no node, no token)."""
        session = self.session
        enabled = controls(session, PanelInputs(busy=self.busy is not None))
        return {
            "state": session.state.value,
            "busy": self.busy or "",
            "status": self.status,
            "error": self.error,
            "hint": self.hint,
            "backend_url": session.client.base_url,
            "annotator": session.annotator,
            "model_version": session.server_info.get("current_model") or "",
            "reviewed_model": session.result.model_version if session.result is not None else "",
            "case": self.case_text,
            "cases": self.cases,
            "regions": self.region_rows(),
            "region_text": self.region_text,
            "edited_voxels": self.edited,
            "reviewed_voxels": self.reviewed,
            "count_text": self.count_text,
            "submit_text": self.submit_text,
            "job_text": describe_job(session.job),
            "job_fraction": round(100 * job_fraction(session.job)),
            "controls": enabled,
        }


def _case_title(case: dict) -> str:
    reviewed = case.get("labeled") or case.get("n_corrections")
    score = case.get("score")
    return (f"{case['case_id']} ({case.get('split') or '?'}"
            f"{', reviewed' if reviewed else ''}{f', score {score:.3f}' if score is not None else ''})")


__all__ = ["HeatmapDisplay", "RunOptions", "WebReview"]

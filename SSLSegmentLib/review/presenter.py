"""The review panel's decisions, without Qt: what is enabled when, and when a click would discard a clinician's work.

The Slicer widget (SSLSegment/SSLSegment.py) only binds these to its buttons and dialogs, so the rules are tested on
a real session against a real backend (Testing/test_review_presenter.py) rather than only inside Slicer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from SSLSegmentLib.review.session import ReviewSession, SessionState


@dataclass(frozen=True)
class PanelInputs:
    """What the panel knows besides the session: a call in flight, a local backend it started, a volume selected to
    send, a row selected in the models table."""

    busy: bool = False
    local_backend: bool = False
    input_volume: bool = False
    model_selected: bool = False


def controls(session: ReviewSession | None, inputs: PanelInputs) -> dict[str, bool]:
    """Which of the panel's buttons are enabled (button name -> enabled).

    One call at a time: while one is in flight only Cancel (and stopping a training job) is offered. Run stays
    available after an inference (another kind, threshold or model version), guarded by `unsaved_work`.
    """
    state = None if session is None else session.state
    connected = state not in (None, SessionState.DISCONNECTED)
    idle = not inputs.busy
    reviewing = state in (SessionState.CASE_LOADED, SessionState.INFERRED)
    inferred = state == SessionState.INFERRED
    job = None if session is None else session.job
    job_active = job is not None and job.get("status") in ("queued", "running")
    return {
        "connect": idle,
        "stop_local": inputs.local_backend and idle,
        "next_case": connected and idle,
        "send_volume": connected and idle and inputs.input_volume,
        "run": reviewing and idle,
        "cancel": inputs.busy,
        "next_region": inferred and idle and bool(session.regions),
        "previous_region": inferred and idle and bool(session.regions),
        "submit": inferred and idle,
        "skip_case": reviewing and idle,
        "undo_submit": (state == SessionState.SUBMITTED and idle and session.last_submission is not None
                        and not session.last_submission.get("withdrawn")),
        "start_training": connected and idle and not job_active,
        "stop_training": job_active,
        "refresh_models": connected and idle,
        "update_model": connected and idle and inputs.model_selected,
    }


def unsaved_work(session: ReviewSession | None, edited_voxels: int) -> str | None:
    """What a click that replaces the case or its segmentation (fetch next, skip, send another volume, run again)
    would throw away: None when nothing, else a sentence to put to the clinician before going on.

    edited_voxels: voxels where the segmentation on screen differs from the model's output (the widget counts them
    when asked, not on every stroke). Visited regions count too: they are part of what a correction says was
    reviewed. A submitted case has nothing left to lose; its files are kept in the work folder either way.
    """
    if session is None or session.state != SessionState.INFERRED:
        return None
    visited = len(session.visited)
    if edited_voxels <= 0 and visited == 0:
        return None
    parts = []
    if edited_voxels > 0:
        parts.append(f"{edited_voxels} edited voxel{'s' if edited_voxels != 1 else ''}")
    if visited:
        parts.append(f"{visited} visited region{'s' if visited != 1 else ''}")
    return (f"Case {session.case.case_id} has {' and '.join(parts)} that are not submitted. "
            "Discard them? (No keeps the case as it is; Submit sends them.)")


def regions_to_fetch(session: ReviewSession | None, kind: str, threshold: float) -> tuple[str, float] | None:
    """The (kind, threshold) whose regions the panel must ask the backend for, or None when the regions under review
    are already of the map and threshold the panel is set to.

    The regions table, the markups and the reviewed mask are the session's, of one map at one threshold: a kind or
    threshold changed after Run would otherwise leave a table of the old one next to the new settings.
    """
    if session is None or session.state != SessionState.INFERRED or session.result is None:
        return None
    result = session.result
    if kind == result.kind and math.isclose(float(threshold), result.threshold, rel_tol=0.0, abs_tol=1e-6):
        return None
    return kind, float(threshold)


def failure_message(what: str, exc: BaseException) -> str:
    """The line to show when `what` failed: the backend's own message verbatim (a 4xx says what to fix), else the
    exception's text."""
    return f"{what} failed: {getattr(exc, 'message', None) or exc}"


def failure_hint(exc: BaseException) -> str:
    """What the reviewer can do about a failure, or "" when the message says it all."""
    from SSLSegmentLib.review.client import AuthError, BackendUnavailable, ConflictError

    if isinstance(exc, AuthError):
        return "The backend refused the token: use the datastore's token (`sslsegment token --datastore DIR`)."
    if isinstance(exc, BackendUnavailable):
        return "The backend cannot be reached. Is it running, and is the address right?"
    if isinstance(exc, ConflictError) and "model" in str(exc).lower():
        return "The backend has no model yet: start a training job first."
    return ""


__all__ = ["PanelInputs", "controls", "failure_hint", "failure_message", "regions_to_fetch", "unsaved_work"]

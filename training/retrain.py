"""The retrain after corrections: a fine-tune from a published model, sized to what changed since that model.

A job that starts from a model (init "current" or a version) takes its length and learning rate from a
`RetrainSchedule` unless the request names them: a few new corrections get a short warm restart, many new labels a
longer one, all earlier labeled data replayed in the same run (the training snapshot holds every labeled case). The
schedule's constants are the datastore's "retrain" settings; docs/refinement.md, "The retrain", says how they were
chosen and what they do to retention and Dice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from SSLSegmentLib.ml.train_options import EVAL_MODELS, LR_SCHEDULES

# The job parameters a schedule decides; one the request names keeps the request's value.
SCHEDULED = ("iterations", "lr", "lr_schedule", "eval_model", "ema_decay", "val_interval")


@dataclass(frozen=True)
class RetrainSchedule:
    """iterations = base_iterations + per_new_case × (cases with a revision the parent did not train on), at most
    max_iterations; the learning rate restarts at `lr` and follows `lr_schedule` down over those iterations;
    `eval_model` names the weights validated and published (the student by default: over a retrain this short an EMA
    teacher at 0.99 still holds much of the parent, and the corrections with it; docs/refinement.md, "The retrain").
    val_checks: validations per run."""

    base_iterations: int = 60
    per_new_case: int = 120
    max_iterations: int = 600
    lr: float = 0.01
    lr_schedule: str = "poly"
    eval_model: str = "student"
    ema_decay: float = 0.99
    val_checks: int = 2

    def __post_init__(self) -> None:
        for name in ("base_iterations", "per_new_case", "max_iterations", "val_checks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name != "per_new_case" else 0):
                raise ValueError(f"retrain {name} must be an integer >= {1 if name != 'per_new_case' else 0}, "
                                 f"got {v!r}")
        if self.max_iterations < self.base_iterations:
            raise ValueError(f"retrain max_iterations ({self.max_iterations}) is below base_iterations "
                             f"({self.base_iterations})")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and math.isfinite(self.lr)
                and self.lr > 0):
            raise ValueError(f"retrain lr must be a finite number > 0, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"retrain lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.eval_model not in EVAL_MODELS:
            raise ValueError(f"retrain eval_model must be one of {', '.join(EVAL_MODELS)}, got {self.eval_model!r}")
        if not (isinstance(self.ema_decay, (int, float)) and not isinstance(self.ema_decay, bool)
                and 0 <= self.ema_decay < 1):
            raise ValueError(f"retrain ema_decay must be in [0, 1), got {self.ema_decay!r}")

    @classmethod
    def from_settings(cls, value: dict | None) -> "RetrainSchedule":
        """The schedule of a datastore's "retrain" settings (missing fields at their defaults); ValueError names
        an unknown field or a bad value."""
        value = dict(value or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown retrain setting(s) {unknown}; known: {sorted(known)}")
        return cls(**value)

    def to_dict(self) -> dict:
        return asdict(self)

    def plan(self, new_cases: int) -> dict:
        """Job parameters for a fine-tune after `new_cases` cases got a revision the parent did not train on."""
        if not isinstance(new_cases, int) or new_cases < 0:
            raise ValueError(f"new_cases must be an integer >= 0, got {new_cases!r}")
        iterations = min(self.max_iterations, self.base_iterations + self.per_new_case * new_cases)
        return {"iterations": iterations, "lr": float(self.lr), "lr_schedule": self.lr_schedule,
                "eval_model": self.eval_model, "ema_decay": float(self.ema_decay),
                "val_interval": max(1, iterations // self.val_checks)}


def new_cases(snapshot_train: dict, parent_revisions) -> list[str]:
    """Train cases with a label revision (a final label or a correction) that the parent model was not trained on,
    sorted. snapshot_train: {case_id: [revision ids]} (training_snapshot's "train"); parent_revisions: the parent's
    `trained_on["revisions"]`."""
    seen = {int(r) for r in parent_revisions or ()}
    return sorted(c for c, revs in snapshot_train.items() if any(int(r) not in seen for r in revs))


def scheduled_params(schedule: RetrainSchedule, params: dict, given: set, snapshot_train: dict,
                     parent_revisions) -> tuple[dict, dict]:
    """(the job's params, the record of the decision for the registry). A request that sizes the run itself (names
    `iterations` or `lr`) runs as asked, with the datastore's "train" settings for the rest, as before the schedule
    existed; otherwise every SCHEDULED parameter the request leaves open comes from the schedule. `given`: the
    parameter names the request set."""
    changed = new_cases(snapshot_train, parent_revisions)
    if given & {"iterations", "lr"}:
        return dict(params), {"new_cases": len(changed), "schedule": None, "applied": {},
                              "kept_from_request": sorted(k for k in SCHEDULED if k in given)}
    plan = schedule.plan(len(changed))
    applied = {k: plan[k] for k in SCHEDULED if k not in given}
    # A val_interval the request gave beyond the scheduled iterations is clamped by build_train_config.
    return {**params, **applied}, {"new_cases": len(changed), "schedule": schedule.to_dict(), "applied": applied,
                 "kept_from_request": sorted(k for k in SCHEDULED if k in given)}


__all__ = ["RetrainSchedule", "SCHEDULED", "new_cases", "scheduled_params"]

"""The model registry: immutable model versions, the `current` pointer, the promotion rule, promotion history.

    DIR/models/<version>/model.pt, version.json     one version (checkpoint + what it was trained on and why)

It works on a Datastore's files and SQLite index by composition (the `models` and `promotions` tables and the
`current_model` key of `meta`); the datastore itself knows nothing of checkpoints. A version is published by renaming
a complete staging folder to the next free vNNNN, then indexed, so a killed job never leaves half a version. The
`current` pointer moves only through `promote` (after validation, or by hand) and `rollback`.
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np


from training.datastore import (Conflict, Damaged, Datastore, InvalidInput, NotFound, StagedFolder, iso, sha256_file,
                                validate_version)

CURRENT_KEY = "current_model"


# The interval of the mean paired difference: a percentile bootstrap over the validation cases, seeded so that the
# same per-case numbers always give the same decision.
CONFIDENCE = 0.95
RESAMPLES = 4000
BOOTSTRAP_SEED = 0


def paired_difference(new: dict[str, float], parent: dict[str, float], confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Per-case Dice of a new version and its parent on the same validation cases → the mean paired difference
    (new − parent) and its `confidence` percentile-bootstrap interval (cases resampled with replacement), with every
    number the decision used. Cases scored by only one of the two are refused."""
    if set(new) != set(parent):
        raise ValueError(f"the two versions were validated on different cases: {sorted(set(new) ^ set(parent))}")
    if not new:
        raise ValueError("no validation case to compare on")
    if not 0.0 < confidence < 1.0 or resamples < 1:
        raise ValueError(f"confidence must be in (0, 1) and resamples >= 1, got {confidence}, {resamples}")
    cases = sorted(new)
    d = np.array([new[c] - parent[c] for c in cases], np.float64)
    means = d[np.random.default_rng(seed).integers(0, d.size, (resamples, d.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return {"cases": cases, "new": [float(new[c]) for c in cases], "parent": [float(parent[c]) for c in cases],
            "mean_new": float(np.mean([new[c] for c in cases])), "mean_parent": float(np.mean([parent[c] for c in cases])),
            "mean_difference": float(d.mean()), "interval": [float(lo), float(hi)], "confidence": confidence,
            "resamples": int(resamples), "seed": int(seed), "n_cases": len(cases)}


def promotion_decision(new: dict[str, float] | None, parent_scores: dict[str, float] | None, parent: str | None,
                       tolerance: float) -> tuple[bool, str, dict | None]:
    """(promote?, reason, the comparison's numbers or None) from per-case validation Dice (case -> Dice).

    No validation -> never automatic; no parent -> promote; a parent that could not be validated -> promote; else a
    non-inferiority rule on the paired per-case differences: promote when the lower end of the bootstrap interval
    of the mean difference (new − parent) is at least −tolerance, i.e. the new version is, with that confidence,
    not worse than its parent by more than the tolerance (docs/backend.md, "Promotion"). One mean against a
    tolerance on a handful of cases is a coin toss; the interval widens when the cases disagree.
    """
    if not new or not all(math.isfinite(v) for v in new.values()):
        return (False, "no validation case has a final label, so the version was not promoted automatically; "
                "promote it by hand", None)
    mean_new = float(np.mean(list(new.values())))
    if parent is None:
        return True, f"first model version (validation Dice {mean_new:.4f})", None
    if not parent_scores or not all(math.isfinite(v) for v in parent_scores.values()):
        return True, f"validation Dice {mean_new:.4f}; the parent {parent} could not be validated", None
    c = paired_difference(new, parent_scores)
    c["tolerance"] = float(tolerance)
    c["rule"] = "promote when the interval's lower end >= -tolerance"
    lo, hi = c["interval"]
    numbers = (f"validation Dice {c['mean_new']:.4f} vs {c['mean_parent']:.4f} for {parent} on {c['n_cases']} cases, "
               f"paired change {c['mean_difference']:+.4f} ({c['confidence']:.0%} interval {lo:+.4f} to {hi:+.4f}), "
               f"tolerance {tolerance}")
    if lo >= -tolerance:
        return True, numbers, c
    return False, f"not promoted: possibly worse than the parent: {numbers}", c


class ModelRegistry:
    """The model versions of one datastore."""

    def __init__(self, store: Datastore):
        self.store = store

    # -- reading --------------------------------------------------------------------------------------------
    @property
    def current(self) -> str | None:
        return self.store.get_meta(self.store.db, CURRENT_KEY)

    def _row(self, version: str) -> sqlite3.Row:
        validate_version(version)
        row = self.store.db.execute("SELECT * FROM models WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise NotFound(f"unknown model version {version!r}")
        return row

    @staticmethod
    def _dict(row: sqlite3.Row, current: str | None) -> dict:
        return {
            "version": row["version"], "created": iso(row["created"]), "job_id": row["job_id"], "parent": row["parent"],
            "method": row["method"], "metrics": json.loads(row["metrics"]), "trained_on": json.loads(row["trained_on"]),
            "promoted": bool(row["promoted"]), "current": row["version"] == current, "decision": row["decision"],
            "sha256": row["sha256"],
        }

    def model(self, version: str) -> dict:
        return self._dict(self._row(version), self.current)

    def models(self) -> list[dict]:
        cur = self.current
        return [self._dict(r, cur) for r in self.store.db.execute("SELECT * FROM models ORDER BY version")]

    def model_path(self, version: str) -> Path:
        return self.store.abs(self._row(version)["path"])

    def checkpoint_path(self, version: str) -> Path:
        """The version's checkpoint, after checking it against the digest recorded when it was published: a
        damaged file (a bad disk, a bit flip, a copy cut short) is refused rather than trained from, served or made
        current, since it may still load and give wrong answers. Raises Damaged."""
        row = self._row(version)
        path = self.store.abs(row["path"])
        if not path.is_file() or sha256_file(path) != row["sha256"]:
            raise Damaged(f"the checkpoint of model version {version} does not match the digest recorded when it was "
                          f"published ({'missing' if not path.is_file() else 'damaged on disk'}); make another "
                          f"version current, or restore {row['path']} from a backup")
        return path

    def promotion_history(self) -> list[dict]:
        return [{"version": r["version"], "previous": r["previous"], "at": iso(r["at"]), "reason": r["reason"]}
                for r in self.store.db.execute("SELECT * FROM promotions ORDER BY id")]

    def summary(self) -> dict:
        return {"current_model": self.current,
                "n_models": self.store.db.execute("SELECT COUNT(*) FROM models").fetchone()[0]}

    # -- writing --------------------------------------------------------------------------------------------
    def add_version(self, checkpoint_file: str | Path, meta: dict, job_id: str | None = None) -> dict:
        """Publish a checkpoint as a new immutable version: copy into a staging folder, fsync, rename the folder to the
        next free vNNNN, then index it. `meta`: parent, method, metrics, trained_on, decision (not yet promoted)."""
        from SSLSegmentLib.ml.checkpoint import load_checkpoint

        checkpoint_file = Path(checkpoint_file)
        ckpt = load_checkpoint(checkpoint_file)  # refuses anything that is not a readable SSLSegment checkpoint
        store = self.store
        with StagedFolder(store.root / "models") as staging:
            shutil.copyfile(checkpoint_file, staging.path / "model.pt")
            digest = sha256_file(staging.path / "model.pt")
            info = {"job_id": job_id, "sha256": digest, "created": iso(time.time()),
                    "network": ckpt.get("network"), "train_config": ckpt.get("train_config"), **meta}
            (staging.path / "version.json").write_text(json.dumps(info, indent=2, default=str))
            dest = staging.publish(prefix="v")
        version = dest.name
        try:
            with store.transaction() as db:
                db.execute("INSERT INTO models(version, created, job_id, parent, method, path, sha256, metrics, "
                           "trained_on, promoted, decision) VALUES (?,?,?,?,?,?,?,?,?,0,?)",
                           (version, time.time(), job_id, meta.get("parent"), meta.get("method") or ckpt.get("method"),
                            store.rel(dest / "model.pt"), digest, json.dumps(meta.get("metrics", {}), default=float),
                            json.dumps(meta.get("trained_on", {})), meta.get("decision")))
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)  # not indexed: no half-registered version stays behind
            raise
        return self.model(version)

    def set_decision(self, version: str, decision: str) -> None:
        self._row(version)
        with self.store.transaction() as db:
            db.execute("UPDATE models SET decision = ? WHERE version = ?", (decision, version))

    def promote(self, version: str, reason: str = "manual", expected_current: str | None = "*") -> dict:
        """Make `version` current. expected_current (not "*"): only if current is still that (compare-and-set, so a
        job never overrides a manual promotion that happened while it trained). A version whose checkpoint no
        longer matches its digest is refused (Damaged): the current model stays what it was."""
        self.checkpoint_path(version)
        with self.store.transaction() as db:
            previous = self.store.get_meta(db, CURRENT_KEY)
            if expected_current != "*" and previous != expected_current:
                raise Conflict(f"current model changed from {expected_current} to {previous} while the job ran")
            self.store.set_meta(db, CURRENT_KEY, version)
            db.execute("UPDATE models SET promoted = 1 WHERE version = ?", (version,))
            db.execute("INSERT INTO promotions(version, previous, at, reason) VALUES (?,?,?,?)",
                       (version, previous, time.time(), reason))
        return {"current": version, "previous": previous}

    def rollback(self, reason: str = "rollback") -> dict:
        """Make current again the version that was current before the latest promotion (one call undoes one move)."""
        row = self.store.db.execute("SELECT * FROM promotions ORDER BY id DESC LIMIT 1").fetchone()
        if row is None or row["previous"] is None:
            raise InvalidInput("nothing to roll back to: no version was current before the latest promotion")
        return self.promote(row["previous"], reason=reason, expected_current=row["version"])

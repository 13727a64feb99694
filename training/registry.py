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


from training.datastore import Conflict, Datastore, InvalidInput, NotFound, StagedFolder, iso, sha256_file, validate_version

CURRENT_KEY = "current_model"


def promotion_decision(new_dice: float | None, parent_dice: float | None, parent: str | None,
                       tolerance: float) -> tuple[bool, str]:
    """(promote?, reason). No validation -> never automatic; no parent -> promote; a parent that could not be
    validated -> promote; else promote when new >= parent - tolerance (docs/backend.md, "Promotion")."""
    if new_dice is None or not math.isfinite(new_dice):
        return False, "no validation case has a final label, so the version was not promoted automatically; promote it by hand"
    if parent is None:
        return True, f"first model version (validation Dice {new_dice:.4f})"
    if parent_dice is None or not math.isfinite(parent_dice):
        return True, f"validation Dice {new_dice:.4f}; the parent {parent} could not be validated"
    if new_dice >= parent_dice - tolerance:
        return True, (f"validation Dice {new_dice:.4f} vs {parent_dice:.4f} for {parent} "
                      f"(change {new_dice - parent_dice:+.4f}, tolerance {tolerance})")
    return False, (f"not promoted: validation Dice dropped from {parent_dice:.4f} ({parent}) to {new_dice:.4f} "
                   f"({new_dice - parent_dice:+.4f}, more than the tolerance {tolerance})")


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
        with store.transaction() as db:
            db.execute("INSERT INTO models(version, created, job_id, parent, method, path, sha256, metrics, trained_on, "
                       "promoted, decision) VALUES (?,?,?,?,?,?,?,?,?,0,?)",
                       (version, time.time(), job_id, meta.get("parent"), meta.get("method") or ckpt.get("method"),
                        store.rel(dest / "model.pt"), digest, json.dumps(meta.get("metrics", {}), default=float),
                        json.dumps(meta.get("trained_on", {})), meta.get("decision")))
        return self.model(version)

    def set_decision(self, version: str, decision: str) -> None:
        self._row(version)
        with self.store.transaction() as db:
            db.execute("UPDATE models SET decision = ? WHERE version = ?", (decision, version))

    def promote(self, version: str, reason: str = "manual", expected_current: str | None = "*") -> dict:
        """Make `version` current. expected_current (not "*"): only if current is still that (compare-and-set, so a
        job never overrides a manual promotion that happened while it trained)."""
        self._row(version)
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

"""From label revisions to training samples: the rule that turns corrections into known voxels.

For each case of the train split (docs/backend.md, "How training data is built from label revisions"):
  1. the latest final revision, if any: its label everywhere, every voxel known;
  2. then every correction newer than it, oldest first, from every author: inside its reviewed mask the correction's
     label replaces what was there and those voxels become known (a later revision wins where masks overlap);
  3. nothing at all: an unlabeled case (no voxel known), which feeds the methods' unsupervised terms.
Validation samples are the val split's latest final labels, fully known. Corrections of val/test cases are never
used, so the validation set stays clean.

A snapshot fixes which revisions a job uses when it starts, so labels submitted while it trains don't leak in and
every DDP rank builds the same samples.
"""

from __future__ import annotations

import numpy as np

from SSLSegmentLib.data.dataset import Sample
from SSLSegmentLib.data.imageio import read_label

from training.datastore import Datastore


def training_snapshot(store: Datastore) -> dict:
    """Which revisions a training run uses, fixed at the job's start. Active exclusions are left out: an excluded
    case entirely (not even as unlabeled or validation data), an excluded revision as if it had not been submitted.

    train: {case_id: [revision ids to apply, oldest first]} for every train-split case ([] = unlabeled).
    val: {case_id: final revision id} for val-split cases with a final label.
    """
    excluded = store.exclusions(active_only=True)
    out_cases = {e["case_id"] for e in excluded if e["revision"] is None}
    out_revisions = {e["revision"] for e in excluded if e["revision"] is not None}
    cases = [c for c in store.db.execute("SELECT case_id, split FROM cases ORDER BY case_id").fetchall()
             if c["case_id"] not in out_cases]
    revs = store.db.execute("SELECT revision, case_id, kind FROM labels WHERE kind IN ('final', 'correction') "
                            "ORDER BY revision").fetchall()
    by_case: dict[str, list] = {}
    for r in revs:
        if r["revision"] not in out_revisions:
            by_case.setdefault(r["case_id"], []).append((r["revision"], r["kind"]))
    train, val = {}, {}
    for c in cases:
        rs = by_case.get(c["case_id"], [])
        if c["split"] == "train":
            last_final = max((i for i, (_, k) in enumerate(rs) if k == "final"), default=None)
            use = rs if last_final is None else rs[last_final:]
            train[c["case_id"]] = [rev for rev, _ in use]
        elif c["split"] == "val":
            finals = [rev for rev, k in rs if k == "final"]
            if finals:
                val[c["case_id"]] = finals[-1]
    return {"train": train, "val": val}


def _revision(store: Datastore, revision: int):
    return store.db.execute("SELECT * FROM labels WHERE revision = ?", (int(revision),)).fetchone()


def load_training_set(store: Datastore, snapshot: dict) -> tuple[list[Sample], list[Sample]]:
    """(train samples, validation samples) of a snapshot, each with its label and `labeled_mask` (1 = known)."""
    samples = []
    for case_id, rev_ids in snapshot["train"].items():
        image = store.load_image(case_id)
        label = np.zeros(image.shape, np.uint8)
        known = np.zeros(image.shape, np.uint8)
        for rev in rev_ids:
            row = _revision(store, rev)
            lab = read_label(store.abs(row["path"])).array
            if row["kind"] == "final":
                label[...] = lab
                known[...] = 1
            else:
                m = read_label(store.abs(row["reviewed_mask"])).array > 0
                label[m] = lab[m]
                known[m] = 1
        samples.append(Sample(case_id, image.array.astype(np.float32), label, known))
    val = []
    for case_id, rev in snapshot["val"].items():
        image = store.load_image(case_id)
        lab = read_label(store.abs(_revision(store, rev)["path"])).array
        val.append(Sample(case_id, image.array.astype(np.float32), lab, np.ones(image.shape, np.uint8)))
    return samples, val


def corrected_samples(store: Datastore, snapshot: dict) -> list[Sample]:
    """The train samples of a snapshot that a correction made known only in part (the reviewed voxels), as
    load_training_set builds them; the cases whose revisions include no correction are not read."""
    revs = [r for rs in snapshot["train"].values() for r in rs]
    corrected = {row["case_id"] for row in store.db.execute(
        f"SELECT case_id FROM labels WHERE kind = 'correction' AND revision IN ({','.join('?' * len(revs))})",
        [int(r) for r in revs])} if revs else set()
    sub = {"train": {c: rs for c, rs in snapshot["train"].items() if c in corrected}, "val": {}}
    samples, _ = load_training_set(store, sub)
    return [s for s in samples if 0 < int(s.labeled_mask.sum()) < s.labeled_mask.size]

"""Evaluate a model on a split of a data set: per-case metrics and their summary."""

from __future__ import annotations

import numpy as np

from SSLSegmentLib.data.dataset import DataSet
from SSLSegmentLib.ml.inference import Predictor
from SSLSegmentLib.ml.metrics import binary_metrics, summarize

# Test evaluation's sliding-window overlap: denser than the trainer's validation (TrainConfig.val_overlap), because
# these are the numbers reported, and it runs once per model rather than every few hundred steps.
EVAL_OVERLAP = 0.5


def largest_component(label: np.ndarray) -> np.ndarray:
    """A predicted label map with each foreground class cut to its largest 26-connected component (the post-processing
    the copy-paste papers apply at test): (Z, Y, X) integer labels → the same shape and dtype."""
    import torch

    from SSLSegmentLib.ml.methods.losses import keep_largest_component

    cut = keep_largest_component(torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))[None, None])
    return cut[0, 0].numpy().astype(label.dtype)


def evaluate_model(predictor: Predictor, dataset: DataSet, case_ids: list[str], progress: bool = False,
                   largest: bool = False) -> dict:
    """Dice, Jaccard, HD95 and ASD (voxels and mm) for each case, foreground = every non-zero class.

    predictor: the model with its window, overlap and device (e.g. `Predictor.from_checkpoint(path,
    overlap=EVAL_OVERLAP)`); the segmentation is scored, so it runs one deterministic pass whatever its `passes`.
    largest: also score each prediction cut to its largest connected component (`largest_component`), under
    "largest_component" ({"cases", "summary"}), from the same forward pass.
    """
    rows, cut_rows = [], []
    iterator = case_ids
    if progress:
        from tqdm import tqdm

        iterator = tqdm(case_ids, desc="evaluate", unit="case")
    for cid in iterator:
        image, label = dataset.load_pair(cid)
        pred = predictor(image.array, passes=1)
        spacing_zyx = tuple(image.geometry.spacing[::-1])
        rows.append({"case": cid, **binary_metrics(pred.label > 0, label.array > 0, spacing_zyx).to_dict()})
        if largest:
            cut = largest_component(pred.label)
            cut_rows.append({"case": cid, **binary_metrics(cut > 0, label.array > 0, spacing_zyx).to_dict()})
    out = {"cases": rows, "summary": summarize(rows)}
    if largest:
        out["largest_component"] = {"cases": cut_rows, "summary": summarize(cut_rows)}
    return out

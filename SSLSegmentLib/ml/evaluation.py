"""Evaluate a model on a split of a data set: per-case metrics and their summary."""

from __future__ import annotations

from SSLSegmentLib.data.dataset import DataSet
from SSLSegmentLib.ml.inference import Predictor
from SSLSegmentLib.ml.metrics import binary_metrics, summarize

# Test evaluation's sliding-window overlap: denser than the trainer's validation (TrainConfig.val_overlap), because
# these are the numbers reported, and it runs once per model rather than every few hundred steps.
EVAL_OVERLAP = 0.5


def evaluate_model(predictor: Predictor, dataset: DataSet, case_ids: list[str], progress: bool = False) -> dict:
    """Dice, Jaccard, HD95 and ASD (voxels and mm) for each case, foreground = every non-zero class.

    predictor: the model with its window, overlap and device (e.g. `Predictor.from_checkpoint(path,
    overlap=EVAL_OVERLAP)`); the segmentation is scored, so it runs one deterministic pass whatever its `passes`.
    """
    rows = []
    iterator = case_ids
    if progress:
        from tqdm import tqdm

        iterator = tqdm(case_ids, desc="evaluate", unit="case")
    for cid in iterator:
        image, label = dataset.load_pair(cid)
        pred = predictor(image.array, passes=1)
        spacing_zyx = tuple(image.geometry.spacing[::-1])
        rows.append({"case": cid, **binary_metrics(pred.label > 0, label.array > 0, spacing_zyx).to_dict()})
    return {"cases": rows, "summary": summarize(rows)}

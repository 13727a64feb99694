"""Evaluate a model on a split of a data set: per-case metrics and their summary."""

from __future__ import annotations

from SSLSegmentLib.data.dataset import DataSet
from SSLSegmentLib.ml.inference import predict_volume
from SSLSegmentLib.ml.metrics import binary_metrics, summarize


def evaluate_model(model, dataset: DataSet, case_ids: list[str], patch_size, overlap: float = 0.5, device="auto",
                   progress: bool = False) -> dict:
    """Dice, Jaccard, HD95 and ASD (voxels and mm) for each case, foreground = every non-zero class."""
    rows = []
    iterator = case_ids
    if progress:
        from tqdm import tqdm

        iterator = tqdm(case_ids, desc="evaluate", unit="case")
    for cid in iterator:
        image, label = dataset.load_pair(cid)
        pred = predict_volume(model, image.array, patch_size, passes=1, overlap=overlap, device=device)
        spacing_zyx = tuple(image.geometry.spacing[::-1])
        rows.append({"case": cid, **binary_metrics(pred.label > 0, label.array > 0, spacing_zyx).to_dict()})
    return {"cases": rows, "summary": summarize(rows)}

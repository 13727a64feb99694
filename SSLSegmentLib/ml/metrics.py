"""Per-case overlap and surface metrics on binary masks, in voxels and in mm (MONAI's implementations).

Definitions (MONAI's): HD95 is the larger of the two directed 95th-percentile surface distances (prediction → truth,
truth → prediction); ASD is the mean over both sets of surface distances (symmetric). medpy, used by the LA papers,
pools both directions before the percentile for HD95 and reports the directed prediction → truth mean as ASD, so
published surface numbers can differ from these by a fraction of a voxel; Dice and Jaccard are identical. An empty prediction or ground truth has undefined surface
distances; they are reported as NaN (and counted, not hidden, in summaries).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class CaseMetrics:
    dice: float
    jaccard: float
    hd95_vox: float
    asd_vox: float
    hd95_mm: float
    asd_mm: float

    def to_dict(self) -> dict:
        return asdict(self)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks (any shape, nonzero = foreground); 1.0 when both are empty."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    p, t = pred.astype(bool), truth.astype(bool)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(p, t).sum()) / total


def _onehot(mask: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(np.ascontiguousarray(mask.astype(bool)))
    return torch.stack([~m, m])[None].float()


def binary_metrics(pred: np.ndarray, truth: np.ndarray, spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> CaseMetrics:
    """Metrics of a binary prediction against binary truth; arrays (z, y, x), spacing in the same axis order."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    p, t = pred.astype(bool), truth.astype(bool)
    inter, union = np.logical_and(p, t).sum(), np.logical_or(p, t).sum()
    dsc = dice(p, t)
    jac = 1.0 if union == 0 else inter / union
    if not p.any() or not t.any():
        nan = math.nan
        return CaseMetrics(dsc, float(jac), nan, nan, nan, nan)
    yp, yt = _onehot(p), _onehot(t)
    out = {}
    for unit, sp in (("vox", (1.0, 1.0, 1.0)), ("mm", tuple(float(s) for s in spacing_zyx))):
        out[f"hd95_{unit}"] = float(compute_hausdorff_distance(yp, yt, percentile=95, spacing=sp)[0, 0])
        out[f"asd_{unit}"] = float(compute_average_surface_distance(yp, yt, symmetric=True, spacing=sp)[0, 0])
    return CaseMetrics(dsc, float(jac), **out)


def summarize(rows: list[dict], keys=("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm")) -> dict:
    """Mean and sd over cases for each metric (NaN cases skipped and counted in `n_undefined`)."""
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows], dtype=float)
        ok = vals[np.isfinite(vals)]
        out[k] = {
            "mean": float(ok.mean()) if ok.size else math.nan,
            "sd": float(ok.std(ddof=1)) if ok.size > 1 else 0.0,
            "n": int(ok.size),
            "n_undefined": int(vals.size - ok.size),
        }
    return out

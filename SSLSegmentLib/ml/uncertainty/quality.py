"""How well an uncertainty map points at the segmentation's errors.

error_detection_auroc: probability that a random wrong voxel is more uncertain than a random right one (0.5 = no
better than chance, 1 = every wrong voxel ranks above every right one); ties count one half.
error_share_in_top: the share of all wrong voxels that fall in the `fraction` most uncertain voxels (what a reviewer
who looks at the top 5% would see of the errors); ties at the cut are shared out in proportion.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _pool(arrays) -> np.ndarray:
    if isinstance(arrays, np.ndarray):
        return arrays.reshape(-1)
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays])


def _check(scores: np.ndarray, errors: np.ndarray) -> None:
    if scores.shape != errors.shape:
        raise ValueError(f"uncertainty ({scores.size} voxels) and errors ({errors.size} voxels) differ in size")
    if scores.size == 0:
        raise ValueError("no voxels")
    if not np.isfinite(scores).all():
        raise ValueError("uncertainty contains NaN or infinite values")


def error_detection_auroc(uncertainty, errors) -> float:
    """AUROC of `uncertainty` as a detector of `errors` (bool). NaN when every voxel is right (or every one wrong).

    Arrays or lists of arrays (pooled)."""
    from scipy.stats import rankdata

    s, e = _pool(uncertainty).astype(np.float64), _pool(errors).astype(bool)
    _check(s, e)
    n_pos = int(e.sum())
    n_neg = e.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks: ties count one half
    return float((ranks[e].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def error_share_in_top(uncertainty, errors, fraction: float = 0.05) -> dict:
    """{'recall': share of wrong voxels among the top `fraction` most uncertain, 'precision': share of those top voxels
    that are wrong, 'error_rate': share of all voxels that are wrong}. Expected values when ties straddle the cut."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    s, e = _pool(uncertainty).astype(np.float64), _pool(errors).astype(bool)
    _check(s, e)
    k = max(1, int(math.ceil(fraction * s.size)))
    cut = np.partition(s, s.size - k)[s.size - k]  # the k-th largest score
    above, tied = s > cut, s == cut
    n_above, n_tied = int(above.sum()), int(tied.sum())
    share_tied = (k - n_above) / n_tied  # each tied voxel is in the top with this probability
    wrong_in_top = float(e[above].sum()) + share_tied * float(e[tied].sum())
    n_err = int(e.sum())
    return {
        "recall": wrong_in_top / n_err if n_err else math.nan,
        "precision": wrong_in_top / k,
        "error_rate": n_err / s.size,
    }


def error_detection(uncertainty, errors, fraction: float = 0.05) -> dict:
    """AUROC and top-`fraction` shares in one dict (see the module docstring)."""
    top = error_share_in_top(uncertainty, errors, fraction)
    return {
        "auroc": error_detection_auroc(uncertainty, errors),
        f"top{round(fraction * 100):g}_recall": top["recall"],
        f"top{round(fraction * 100):g}_precision": top["precision"],
        "error_rate": top["error_rate"],
        "n_voxels": int(_pool(errors).size),
    }


__all__: Sequence[str] = ["error_detection_auroc", "error_share_in_top", "error_detection"]

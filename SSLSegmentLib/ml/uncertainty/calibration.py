"""Calibration of the predictive distribution: one temperature fitted on the validation split, and the expected
calibration error (ECE) before and after.

The temperature acts on the estimator's final distribution, p_cal = softmax(log p̄ / τ), so one mechanism serves every
estimator (MC dropout, head MC, flips, ensembles) and costs one inference per validation case. τ > 1 softens an
over-confident model, τ < 1 sharpens an under-confident one; the argmax label never changes.

Shapes: probabilities (C, z, y, x) or (C, N); labels (z, y, x) or (N,) integer class maps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from SSLSegmentLib.data.volume import Volume

DEFAULT_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass
class Calibration:
    """A fitted temperature with the evidence for it (ECE and NLL on the voxels it was fitted on)."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n_voxels: int
    estimator: str = ""
    passes: int = 0
    bins: int = DEFAULT_BINS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _flatten(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    """Lists of (C, ...) / (...) arrays → (C, N) float64, (N,) int64."""
    if isinstance(probabilities, np.ndarray):
        probabilities, labels = [probabilities], [labels]
    probs, labs = [], []
    for p, y in zip(probabilities, labels, strict=True):
        p, y = np.asarray(p), np.asarray(y)
        if p.ndim < 2 or p.shape[1:] != y.shape:
            raise ValueError(f"probabilities (C, ...) {p.shape} do not match labels {y.shape}")
        probs.append(p.reshape(p.shape[0], -1))
        labs.append(y.reshape(-1))
    p = np.concatenate(probs, axis=1).astype(np.float64)
    y = np.concatenate(labs).astype(np.int64)
    if y.size == 0:
        raise ValueError("no voxels to calibrate on")
    if y.min() < 0 or y.max() >= p.shape[0]:
        raise ValueError(f"labels must be class indices in [0, {p.shape[0] - 1}], got range [{y.min()}, {y.max()}]")
    return p, y


def apply_temperature(probabilities: np.ndarray, temperature: float, axis: int = 0) -> np.ndarray:
    """softmax(log p / τ) along the class axis."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.log(np.clip(probabilities, 1e-12, 1.0)) / float(temperature)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(probabilities.dtype, copy=False)


def expected_calibration_error(probabilities, labels, bins: int = DEFAULT_BINS) -> float:
    """ECE = Σ_b (n_b / N)·|accuracy_b − confidence_b| over `bins` equal-width confidence bins, confidence = max_c p_c.

    Voxelwise over every voxel given (pass lists to pool cases). 0 = perfectly calibrated.
    """
    p, y = _flatten(probabilities, labels)
    return _ece(p, y, bins)


def _ece(p: np.ndarray, y: np.ndarray, bins: int) -> float:
    conf = p.max(0)
    correct = (p.argmax(0) == y).astype(np.float64)
    idx = np.clip((conf * bins).astype(np.int64), 0, bins - 1)
    acc = np.bincount(idx, weights=correct, minlength=bins)
    cnf = np.bincount(idx, weights=conf, minlength=bins)
    return float(np.abs(acc - cnf).sum() / conf.size)


def _nll(p: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    logp = np.log(np.clip(p, 1e-12, 1.0)) / temperature
    logp = logp - logp.max(0, keepdims=True)
    lse = np.log(np.exp(logp).sum(0))
    return float(np.mean(lse - logp[y, np.arange(y.size)]))


def negative_log_likelihood(probabilities, labels) -> float:
    """Mean −log p_y over voxels."""
    p, y = _flatten(probabilities, labels)
    return _nll(p, y)


def fit_temperature(probabilities, labels, max_voxels: int = 2_000_000, seed: int = 0) -> float:
    """The τ in TEMPERATURE_RANGE that minimises the NLL of softmax(log p / τ) (a random subsample of at most
    `max_voxels` voxels, fixed by `seed`)."""
    from scipy.optimize import minimize_scalar

    p, y = _flatten(probabilities, labels)
    p, y = _subsample(p, y, max_voxels, seed)
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    res = minimize_scalar(lambda lt: _nll(p, y, math.exp(lt)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-4})
    return float(math.exp(res.x))


def _subsample(p: np.ndarray, y: np.ndarray, max_voxels: int, seed: int):
    if y.size <= max_voxels:
        return p, y
    idx = np.random.default_rng(seed).choice(y.size, size=max_voxels, replace=False)
    return p[:, idx], y[idx]


def calibration_from_predictions(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray], bins: int = DEFAULT_BINS,
                                 estimator: str = "", passes: int = 0, max_voxels: int = 2_000_000) -> Calibration:
    """Fit τ on (validation) predictions and report ECE and NLL before and after on the same voxels."""
    p, y = _flatten(list(probabilities), list(labels))
    tau = fit_temperature(p, y, max_voxels=max_voxels)
    pc = apply_temperature(p, tau)
    return Calibration(
        temperature=tau,
        ece_before=_ece(p, y, bins),
        ece_after=_ece(pc, y, bins),
        nll_before=_nll(p, y),
        nll_after=_nll(pc, y),
        n_voxels=int(y.size),
        estimator=estimator,
        passes=passes,
        bins=bins,
    )


def calibrate(predict: Callable, images: Sequence, labels: Sequence, bins: int = DEFAULT_BINS) -> Calibration:
    """Predict each validation image and fit the temperature on the predictions.

    predict: image → Prediction, normally a `SSLSegmentLib.ml.inference.Predictor` built with the estimator and passes
        the temperature is for (calibration knows predictions, not models, so inference can depend on it alone).
    images: arrays (z, y, x) or Volumes; labels: class maps (or Volumes) on the same grids.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images, and at least one ({len(images)} images, {len(labels)} labels)")
    probs, labs, pred = [], [], None
    for image, label in zip(images, labels):
        lab = label.array if isinstance(label, Volume) else np.asarray(label)
        pred = predict(image)
        if pred.label.shape != lab.shape:
            raise ValueError(f"label shape {lab.shape} does not match the image {pred.label.shape}")
        probs.append(pred.probabilities)
        labs.append(lab)
    return calibration_from_predictions(probs, labs, bins=bins, estimator=pred.estimator, passes=pred.passes)

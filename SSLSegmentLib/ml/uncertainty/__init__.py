"""Voxelwise uncertainty: estimators behind one call, calibration, and how well a map finds errors.

The one call is `SSLSegmentLib.ml.inference.predict_volume(model, image, patch_size, estimator=...)`; this package holds
the pieces (see docs/uncertainty.md for what each map means and how the default was chosen):

- estimators: plain, full MC dropout, head MC dropout, test-time flips, ensembles of model versions
  (`ESTIMATORS`, `DEFAULT_ESTIMATOR`, `resolve_estimator`, `make_estimator`);
- calibration: a temperature fitted on the validation split with ECE before/after (`calibrate`, `Calibration`);
  it knows predictions only (`calibrate` takes a `Predictor`), so inference depends on it and not the reverse;
- quality: error-detection AUROC and the share of errors among the most uncertain voxels (`error_detection`).
"""

from SSLSegmentLib.ml.uncertainty.calibration import (
    Calibration,
    apply_temperature,
    calibrate,
    calibration_from_predictions,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from SSLSegmentLib.ml.uncertainty.estimators import (
    DEFAULT_ESTIMATOR,
    DEFAULT_PASS_BATCH,
    ESTIMATORS,
    EnsembleEstimator,
    FlipEstimator,
    HeadDropoutMasks,
    HeadMCDropoutEstimator,
    MCDropoutEstimator,
    PassStatistics,
    PlainEstimator,
    UncertaintyEstimator,
    make_estimator,
    maps_from_statistics,
    resolve_estimator,
)
from SSLSegmentLib.ml.uncertainty.quality import error_detection, error_detection_auroc, error_share_in_top

__all__ = [
    "Calibration",
    "DEFAULT_ESTIMATOR",
    "DEFAULT_PASS_BATCH",
    "ESTIMATORS",
    "EnsembleEstimator",
    "FlipEstimator",
    "HeadDropoutMasks",
    "HeadMCDropoutEstimator",
    "MCDropoutEstimator",
    "PassStatistics",
    "PlainEstimator",
    "UncertaintyEstimator",
    "apply_temperature",
    "calibrate",
    "calibration_from_predictions",
    "error_detection",
    "error_detection_auroc",
    "error_share_in_top",
    "expected_calibration_error",
    "fit_temperature",
    "make_estimator",
    "maps_from_statistics",
    "negative_log_likelihood",
    "resolve_estimator",
]

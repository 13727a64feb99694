"""Calibration (temperature, ECE) and error-detection measures, on synthetic data with known answers and on a
briefly trained network."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import TINY_PATCH
from SSLSegmentLib.ml.inference import Predictor, predict_volume
from SSLSegmentLib.ml.metrics import dice as dice_of
from SSLSegmentLib.ml.uncertainty import (
    Calibration,
    apply_temperature,
    calibrate,
    calibration_from_predictions,
    error_detection,
    error_detection_auroc,
    error_share_in_top,
    expected_calibration_error,
    fit_temperature,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _overconfident(n: int = 60_000, true_temperature: float = 2.0, seed: int = 0):
    """Labels drawn from q; the 'model' reports q sharpened by 1/τ, i.e. softmax(log q · τ)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(3, n))
    q = np.exp(logits - logits.max(0))
    q /= q.sum(0)
    labels = (rng.random(n)[None] > np.cumsum(q, axis=0)).sum(0)
    reported = apply_temperature(q, 1.0 / true_temperature)
    return q, reported, labels


def test_temperature_recovers_the_known_overconfidence():
    q, reported, labels = _overconfident()
    tau = fit_temperature(reported, labels)
    assert tau == pytest.approx(2.0, rel=0.08)
    fixed = apply_temperature(reported, tau)
    np.testing.assert_array_equal(fixed.argmax(0), reported.argmax(0))  # the label never changes
    before = expected_calibration_error(reported, labels)
    after = expected_calibration_error(fixed, labels)
    assert after < before / 2
    assert after == pytest.approx(expected_calibration_error(q, labels), abs=0.02)


def test_calibration_report_round_trips_and_prefers_lower_nll():
    _, reported, labels = _overconfident(seed=1)
    cal = calibration_from_predictions([reported[:, :30_000], reported[:, 30_000:]], [labels[:30_000], labels[30_000:]],
                                       estimator="head_mc", passes=8)
    assert cal.temperature > 1.5 and cal.nll_after < cal.nll_before and cal.ece_after < cal.ece_before
    assert cal.n_voxels == 60_000
    assert Calibration.from_dict(cal.to_dict()) == cal
    with pytest.raises(ValueError, match="positive"):
        Calibration(temperature=0.0, ece_before=0, ece_after=0, nll_before=0, nll_after=0, n_voxels=1)


def test_ece_of_a_perfectly_calibrated_and_a_wrong_predictor():
    rng = np.random.default_rng(2)
    p1 = rng.random(200_000)
    labels = (rng.random(p1.size) < p1).astype(np.int64)
    calibrated = np.stack([1 - p1, p1])
    assert expected_calibration_error(calibrated, labels) < 0.01
    always_sure_and_wrong = np.stack([labels.astype(float), 1.0 - labels])  # confidence 1, accuracy 0
    assert expected_calibration_error(always_sure_and_wrong, labels) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class indices"):
        expected_calibration_error(calibrated, labels + 5)
    with pytest.raises(ValueError, match="do not match"):
        expected_calibration_error(calibrated, labels[:10])


def test_error_detection_auroc_ranks():
    errors = np.array([0, 0, 1, 1, 0, 1], bool)
    assert error_detection_auroc(errors * 1.0 + 0.1, errors) == 1.0
    assert error_detection_auroc(1.0 - errors, errors) == 0.0
    assert error_detection_auroc(np.zeros(6), errors) == 0.5  # ties count one half
    # One wrong voxel ranked below one right voxel out of 3 × 3 pairs: 8/9.
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.5, 0.4])
    assert error_detection_auroc(scores, errors) == pytest.approx(8 / 9)
    assert math.isnan(error_detection_auroc(np.arange(4.0), np.zeros(4, bool)))
    # Lists of cases are pooled.
    assert error_detection_auroc([scores[:3], scores[3:]], [errors[:3], errors[3:]]) == pytest.approx(8 / 9)


def test_error_share_in_top_counts_and_shares_ties():
    errors = np.zeros(100, bool)
    errors[:10] = True
    scores = np.zeros(100)
    scores[:5] = 1.0  # five of the ten errors are the five most uncertain voxels
    top = error_share_in_top(scores, errors, fraction=0.05)
    assert top["recall"] == pytest.approx(0.5) and top["precision"] == pytest.approx(1.0)
    assert top["error_rate"] == pytest.approx(0.1)
    flat = error_share_in_top(np.zeros(100), errors, fraction=0.05)  # all tied: a random 5% holds 5% of the errors
    assert flat["recall"] == pytest.approx(0.05) and flat["precision"] == pytest.approx(0.1)
    d = error_detection(scores, errors)
    assert set(d) == {"auroc", "top5_recall", "top5_precision", "error_rate", "n_voxels"}
    with pytest.raises(ValueError, match="fraction"):
        error_share_in_top(scores, errors, fraction=0.0)
    with pytest.raises(ValueError, match="NaN"):
        error_share_in_top(np.full(100, np.nan), errors)


@pytest.mark.slow
def test_trained_network_uncertainty_points_at_its_errors(tiny_dataset, tiny_net_config, tmp_path):
    """Train the tiny network briefly: it learns (Dice up), head MC's entropy ranks its wrong voxels above its right
    ones, and the calibration fitted on the validation split does not raise the NLL."""
    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.ml.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    ds = DataSet(tiny_dataset)
    samples = ds.training_samples(ds.splits["train"], ds.splits["train"])
    val = ds.training_samples(ds.splits["val"], ds.splits["val"])
    cfg = TrainConfig(method="supervised", network=tiny_net_config.to_dict(), patch_size=TINY_PATCH, iterations=30,
                      batch_labeled=2, batch_unlabeled=0, val_interval=1000, lr=0.05, seed=1, device="cpu")
    trainer = Trainer(cfg, samples, val)
    test_pairs = [ds.load_pair(c) for c in ds.splits["test"]]

    def dice(model):
        return float(np.mean([dice_of(predict_volume(model, image, TINY_PATCH, passes=1, device="cpu").label > 0,
                                      label.array > 0) for image, label in test_pairs]))

    dice_before = dice(trainer.student)
    trainer.fit()
    model = trainer.student.eval()
    assert dice(model) > max(dice_before + 0.2, 0.4)

    unc, err = [], []
    for image, label in test_pairs:
        pred = predict_volume(model, image, TINY_PATCH, passes=8, device="cpu")
        assert pred.estimator == "head_mc"
        unc.append(pred.entropy)
        err.append(pred.label != label.array)
    quality = error_detection(unc, err)
    assert quality["auroc"] > 0.75
    assert quality["top5_recall"] > 0.2  # the top 5% hold far more than 5% of the errors

    cal = calibrate(Predictor(model, TINY_PATCH, passes=4, device="cpu"), [s.image for s in val], [s.label for s in val])
    assert cal.estimator == "head_mc" and cal.n_voxels == sum(s.label.size for s in val)
    assert cal.nll_after <= cal.nll_before + 1e-9
    image, _ = test_pairs[0]
    raw = predict_volume(model, image, TINY_PATCH, passes=4, device="cpu")
    scaled = predict_volume(model, image, TINY_PATCH, passes=4, device="cpu", temperature=cal)
    np.testing.assert_array_equal(scaled.label, raw.label)
    assert scaled.temperature == pytest.approx(cal.temperature)
    if cal.temperature > 1.0:  # softened: more uncertain everywhere
        assert scaled.entropy.mean() >= raw.entropy.mean()
    assert (scaled.mutual_information <= scaled.entropy + 1e-6).all()

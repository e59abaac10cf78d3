"""examples.calibration.expected_calibration_error against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from examples.calibration import expected_calibration_error


def test_perfectly_confident_and_right_is_zero():
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(probs, np.array([0, 1, 2, 1])) == 0.0


def test_hand_computed_two_bins():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right); 10 bins:
    # bin (0.8, 0.9]: acc 0.5, conf 0.9 -> |0.4| * 2/4; bin (0.5, 0.6]: acc 1, conf 0.6 -> 0.4 * 2/4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)


def test_uniform_predictions_on_balanced_labels():
    probs = np.full((6, 3), 1 / 3)
    labels = np.array([0, 1, 2, 0, 1, 2])  # argmax 0: right 2 of 6, confidence 1/3
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="probs"):
        expected_calibration_error(np.ones(3), np.ones(3))


def test_both_loops_record_the_final_models_ece_and_train_bsam():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    from examples import train_jax, train_torch
    from examples.cli import make_config

    common = dict(dataset="digits", epochs=2, lr=0.05, label_smoothing=0.0, threads=1,
                  limit_train=256, batch_size=64)
    a = train_torch.train(make_config(optimizer="sgd", **common))
    b = train_jax.train(make_config(optimizer="sgd", **common))
    assert a[0]["test_ece"] is None and b[0]["test_ece"] is None  # the final epoch's only
    assert 0.0 <= a[-1]["test_ece"] <= 1.0
    assert abs(a[-1]["test_ece"] - b[-1]["test_ece"]) < 0.02  # same data, weights, schedule
    assert abs(a[-1]["test_acc_calibrated"] - a[-1]["test_acc"]) < 0.01  # the same argmax
    bsam = train_torch.train(make_config(optimizer="bsam", rho=0.05, **common))[-1]
    assert 0.0 <= bsam["test_ece"] <= 1.0 and bsam["test_acc_calibrated"] is not None

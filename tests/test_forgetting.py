"""Forgetting metrics on hand-computed accuracy matrices."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ruvllm_lab.learning.metrics import (AccuracyMatrix, average_accuracy, average_forgetting, backward_transfer,
                                         continual_report, forgetting_per_10k_updates, forgetting_per_phase)

# rows: after training phase i; columns: evaluated on phase j
A = np.array([[0.90, 0.20, 0.10],
              [0.70, 0.80, 0.30],
              [0.60, 0.75, 0.95]])


def test_forgetting_after_reference():
    # F_0 = 0.90 - 0.60 = 0.30, F_1 = 0.80 - 0.75 = 0.05
    np.testing.assert_allclose(forgetting_per_phase(A), [0.30, 0.05])
    assert average_forgetting(A) == pytest.approx(0.175)
    assert backward_transfer(A) == pytest.approx(-0.175)


def test_forgetting_max_reference_uses_best_earlier_accuracy():
    b = np.array([[0.5, 0.0, 0.0], [0.8, 0.9, 0.0], [0.6, 0.7, 0.9]])
    # phase 0 peaked at 0.8 after phase 1: F_0 = 0.8 - 0.6 = 0.2; F_1 = 0.9 - 0.7
    np.testing.assert_allclose(forgetting_per_phase(b, "max"), [0.2, 0.2])
    np.testing.assert_allclose(forgetting_per_phase(b, "after"), [-0.1, 0.2])


def test_average_accuracy_and_single_phase():
    assert average_accuracy(A) == pytest.approx((0.60 + 0.75 + 0.95) / 3)
    assert math.isnan(average_forgetting([[0.9, 0.1]]))
    assert average_accuracy(A[:2]) == pytest.approx(0.75)


def test_forgetting_per_10k_updates():
    # phases ended after 2,000 / 7,000 / 12,000 updates
    # R_0 = 0.30 / 10,000 * 1e4 = 0.30; R_1 = 0.05 / 5,000 * 1e4 = 0.10
    assert forgetting_per_10k_updates(A, [2000, 7000, 12000]) == pytest.approx(0.20)
    # a past phase with no update since it was learned is skipped
    assert forgetting_per_10k_updates(A, [2000, 12000, 12000]) == pytest.approx(0.30)
    assert math.isnan(forgetting_per_10k_updates(A, [5, 5, 5]))
    with pytest.raises(ValueError):
        forgetting_per_10k_updates(A, [10, 5, 20])
    with pytest.raises(ValueError):
        forgetting_per_10k_updates(A, [10, 20])


def test_accuracy_matrix_helper():
    m = AccuracyMatrix()
    for i in range(3):
        for j in range(3):
            m.record(i, j, float(A[i, j]))
    np.testing.assert_allclose(m.as_array(), A)
    rep = continual_report(m, [2000, 7000, 12000])
    assert rep["forgetting"] == pytest.approx(0.175)
    assert rep["forgetting_per_10k_updates"] == pytest.approx(0.20)
    md = m.to_markdown()
    assert "| phase 2 | 0.600 | 0.750 | 0.950 |" in md
    partial = AccuracyMatrix(n_phases=3)
    partial.record(0, 0, 0.5)
    arr = partial.as_array()
    assert arr.shape == (1, 3) and arr[0, 0] == 0.5 and np.isnan(arr[0, 1])
    with pytest.raises(ValueError):
        m.record(0, 0, 1.5)

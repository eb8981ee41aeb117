"""MLKD's loss (kd/methods/mlkd.py) against its formulas written out here in float64 with numpy, and hand-worked
cases on a batch of two. The loss computes in float32, as every loss here does, so the comparisons are at that
precision."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd.methods.mlkd import batch_level_loss, class_level_loss, confidence_shares, mlkd_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference(weak_s, weak_t, strong_s, strong_t, base_t):
    """The released KD_ours.py's three terms, written out term by term (its temperatures: T, 3, 5, 2, 6; the strong
    instance term at 2 and 6 on the weak view; masks from numpy.percentile, averaged)."""
    def kd(s, t, temp):
        ps, pt = softmax(s, temp), softmax(t, temp)
        return np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1)) * temp ** 2

    def cc(s, t, temp):
        ps, pt = softmax(s, temp), softmax(t, temp)
        return np.sum((pt.T @ pt - ps.T @ ps) ** 2) / s.shape[1]

    def bc(s, t, temp):
        ps, pt = softmax(s, temp), softmax(t, temp)
        return np.sum((pt @ pt.T - ps @ ps.T) ** 2) / s.shape[0]

    p = softmax(weak_t, 1.0)
    confidence, class_confidence = p.max(axis=1), p.sum(axis=0)
    mask = (confidence <= np.percentile(confidence, 50)).mean()
    class_mask = (class_confidence <= np.percentile(class_confidence, 50)).mean()
    temps = [base_t, 3.0, 5.0, 2.0, 6.0]
    instance = sum(kd(weak_s, weak_t, t) * mask for t in temps)
    instance += kd(strong_s, strong_t, base_t) + kd(strong_s, strong_t, 3.0) + kd(strong_s, strong_t, 5.0)
    instance += kd(weak_s, weak_t, 2.0) + kd(weak_s, weak_t, 6.0)
    return {"instance": instance, "class": sum(cc(weak_s, weak_t, t) * class_mask for t in temps),
            "batch": sum(bc(weak_s, weak_t, t) * mask for t in temps)}


def as_tensors(*arrays):
    return [torch.tensor(a, dtype=torch.float64) for a in arrays]


def test_the_three_levels_match_the_formulas_on_random_logits():
    rng = np.random.default_rng(0)
    for batch, classes in ((2, 3), (5, 7), (8, 10)):
        logits = [rng.normal(scale=3.0, size=(batch, classes)) for _ in range(4)]
        expected = reference(*logits, 4.0)
        got = mlkd_loss(*as_tensors(*logits), temperature=4.0)
        for level in ("instance", "class", "batch"):
            assert got[level].item() == pytest.approx(expected[level], rel=1e-5, abs=1e-7), (batch, level)


def test_confidence_shares_on_a_batch_of_two():
    """Two samples: the median is their mean, so exactly the less confident one counts (1/2); three classes: the
    median is the middle class, which with the lowest one counts (2/3)."""
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    sample_share, class_share = confidence_shares(teacher)
    assert sample_share.item() == 0.5 and class_share.item() == pytest.approx(2 / 3)


def test_hand_worked_levels_of_a_uniform_student_against_a_one_hot_teacher():
    """Student logits 0 (Q_s = 1/2 everywhere), teacher one-hot on classes 0 and 1 (logits +-50: one-hot to 1e-7
    at T <= 6). Then Q_t^T Q_t = Q_t Q_t^T = I and Q_s^T Q_s = Q_s Q_s^T = J/2, so both Gram terms are
    ||I - J/2||^2 = 4 * 1/4 = 1, divided by C = B = 2: 0.5 at every temperature; KD's KL(one-hot || uniform) is
    log 2, times T^2."""
    student = torch.zeros(2, 2, dtype=torch.float64)
    teacher = torch.tensor([[50.0, -50.0], [-50.0, 50.0]], dtype=torch.float64)
    for t in (1.0, 2.0, 4.0, 6.0):
        assert class_level_loss(student, teacher, t).item() == pytest.approx(0.5, abs=1e-6)
        assert batch_level_loss(student, teacher, t).item() == pytest.approx(0.5, abs=1e-6)
    # both samples are equally confident: both are at the median, the shares are 1
    got = mlkd_loss(student, teacher, student, teacher, temperature=4.0)
    temps_squared = 4.0 ** 2 + 3.0 ** 2 + 5.0 ** 2 + 2.0 ** 2 + 6.0 ** 2
    assert got["instance"].item() == pytest.approx(2 * math.log(2) * temps_squared, rel=1e-5)
    assert got["class"].item() == pytest.approx(5 * 0.5, abs=1e-5)
    assert got["batch"].item() == pytest.approx(5 * 0.5, abs=1e-5)


def test_a_student_equal_to_its_teacher_has_no_loss_and_only_the_student_gets_gradients():
    rng = np.random.default_rng(1)
    teacher, strong_teacher = as_tensors(rng.normal(size=(4, 5)), rng.normal(size=(4, 5)))
    got = mlkd_loss(teacher.clone(), teacher, strong_teacher.clone(), strong_teacher, temperature=4.0)
    assert all(abs(value.item()) < 1e-6 for value in got.values())

    student = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    teacher_leaf = teacher.clone().requires_grad_(True)
    total = sum(mlkd_loss(student, teacher_leaf, student, teacher_leaf, temperature=4.0).values())
    total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher_leaf.grad is None

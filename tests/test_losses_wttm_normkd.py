"""WTTM (Zheng & Yang, ICLR 2024) and NormKD (Chi et al., arXiv 2023): their pure losses against values worked by
hand and against float64 formulas written out here with per-row loops, and one training step of each Distiller.

The formulas follow the authors' code: distiller_zoo/wttm.py of github.com/zkxufo/TTM and kd_loss_normal in
mdistiller/distillers/NormKD.py of github.com/gizi1/NormKD. No helper from kd/ computes an expected value.

Precision: both losses compute in float32 (`.float()`, as every loss in kd/methods/, so that fp16/bf16 logits
are upcast), also for float64 inputs. So the float64 references are compared at float32 precision (rtol 1e-5,
the result's dtype asserted to be float32), not to 1e-12; the hand-worked numbers are exact float64 values.
"""
from __future__ import annotations

import math

import pytest
import torch

from kd.methods import METHODS
from kd.methods.normkd import NormKD, normkd_loss, normkd_temperature
from kd.methods.wttm import WTTM, wttm_loss
from models.cifar import CIFAR_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

Tensor = torch.Tensor


# ============================================================================ independent float64 references
def softmax_row(z: Tensor) -> Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def kl_row(p: Tensor, q: Tensor) -> Tensor:
    return (p * (torch.log(p) - torch.log(q))).sum()


def wttm_ref(student: Tensor, teacher: Tensor, gamma: float) -> Tensor:
    """mean over rows of U * KL(p_t^gamma / U || softmax(z_s)), U = sum_k p_t,k^gamma (the power taken directly)."""
    total = torch.zeros((), dtype=torch.float64)
    for z_s, z_t in zip(student, teacher):
        powered = softmax_row(z_t) ** gamma
        power_sum = powered.sum()
        total = total + power_sum * kl_row(powered / power_sum, softmax_row(z_s))
    return total / len(student)


def std_unbiased_ref(z: Tensor) -> Tensor:
    mean = z.sum() / len(z)
    return torch.sqrt(((z - mean) ** 2).sum() / (len(z) - 1))


def normkd_ref(student: Tensor, teacher: Tensor, t_norm: float) -> Tensor:
    """mean over rows of T_t^2 * KL(softmax(z_t / T_t) || softmax(z_s / T_s)), T = t_norm * unbiased std(own row)."""
    total = torch.zeros((), dtype=torch.float64)
    for z_s, z_t in zip(student, teacher):
        t_s, t_t = t_norm * std_unbiased_ref(z_s), t_norm * std_unbiased_ref(z_t)
        total = total + t_t ** 2 * kl_row(softmax_row(z_t / t_t), softmax_row(z_s / t_s))
    return total / len(student)


def assert_float32_close(got: Tensor, expected, rtol: float = 1e-5, atol: float = 0.0) -> None:
    """A 0-dim float32 result, equal to the float64 `expected` at float32 precision."""
    assert got.dim() == 0 and got.dtype == torch.float32, (got.shape, got.dtype)
    torch.testing.assert_close(got.detach().double(), torch.as_tensor(expected, dtype=torch.float64),
                               rtol=rtol, atol=atol)


def randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def log_probs(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


# ============================================================================ WTTM
class TestWTTMLoss:
    def test_gamma_one_is_plain_softmax_matching(self):
        # gamma = 1: U = sum p_t = 1 and the target is softmax(z_t) itself, so the loss is KL at T = 1 and its
        # gradient per row is (softmax(z_s) - softmax(z_t)) / N
        student, teacher = randn(3, 5, seed=0, scale=2.0), randn(3, 5, seed=1, scale=2.0)
        expected = sum(kl_row(softmax_row(t), softmax_row(s)) for s, t in zip(student, teacher)) / 3
        assert_float32_close(wttm_loss(student, teacher, 1.0), expected)
        z = student.clone().requires_grad_(True)
        wttm_loss(z, teacher, 1.0).backward()
        expected_grad = torch.stack([softmax_row(s) - softmax_row(t) for s, t in zip(student, teacher)]) / 3
        torch.testing.assert_close(z.grad, expected_grad, rtol=1e-5, atol=1e-7)

    def test_gamma_two_worked_by_hand(self):
        # p_t = (1/2, 1/3, 1/6), gamma 2: p_t^2 = (9, 4, 1) / 36, U = 14/36 = 7/18, target q = (9, 4, 1) / 14.
        # A uniform student (1/3 each): loss = U * (sum q ln q + ln 3) = 0.104276890756818...
        teacher = torch.tensor([log_probs(1 / 2, 1 / 3, 1 / 6)], dtype=torch.float64)
        uniform = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
        q = (9 / 14, 4 / 14, 1 / 14)
        expected = 7 / 18 * (sum(x * math.log(x) for x in q) + math.log(3))
        assert expected == pytest.approx(0.10427689075681815, rel=1e-12)
        loss = wttm_loss(uniform, teacher, 2.0)
        assert_float32_close(loss, expected)
        # d loss / d z_s = U (softmax(z_s) - q) = 7/18 * (1/3 - 9/14, 1/3 - 4/14, 1/3 - 1/14) = (-13, 2, 11) / 108
        loss.backward()
        torch.testing.assert_close(uniform.grad, torch.tensor([[-13 / 108, 2 / 108, 11 / 108]], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)
        # the transformed distribution is the minimiser: a student at q has loss 0
        assert_float32_close(wttm_loss(torch.tensor([log_probs(*q)], dtype=torch.float64), teacher, 2.0), 0.0,
                             atol=1e-7)

    def test_sample_weight_on_two_samples_worked_by_hand(self):
        # gamma 1/2. Row 0: p_t = (1/4, 1/4, 1/2) -> sqrt (1/2, 1/2, 1/sqrt2), U0 = 1 + 1/sqrt2 ~ 1.707 (flatter);
        #            row 1: p_t = (1/9, 4/9, 4/9) -> sqrt (1/3, 2/3, 2/3), U1 = 5/3, q1 = (1/5, 2/5, 2/5).
        # The student matches row 0's target exactly (KL 0) and is uniform on row 1:
        #   loss = (U0 * 0 + U1 * KL(q1 || uniform)) / 2 = 5/6 * (1/5 ln 1/5 + 4/5 ln 2/5 + ln 3)
        teacher = torch.tensor([log_probs(1 / 4, 1 / 4, 1 / 2), log_probs(1 / 9, 4 / 9, 4 / 9)], dtype=torch.float64)
        u0 = 1 + 1 / math.sqrt(2)
        q0 = [0.5 / u0, 0.5 / u0, (1 / math.sqrt(2)) / u0]
        student = torch.tensor([log_probs(*q0), [0.0, 0.0, 0.0]], dtype=torch.float64)
        kl1 = 0.2 * math.log(0.2) + 0.8 * math.log(0.4) + math.log(3)
        assert_float32_close(wttm_loss(student, teacher, 0.5), 5 / 3 * kl1 / 2)
        # the rows swapped: row 1 matched, row 0 uniform -> U0 * KL(q0 || uniform) / 2
        student = torch.tensor([[0.0, 0.0, 0.0], [math.log(0.2), math.log(0.4), math.log(0.4)]], dtype=torch.float64)
        kl0 = sum(x * math.log(x) for x in q0) + math.log(3)
        assert_float32_close(wttm_loss(student, teacher, 0.5), u0 * kl0 / 2)
        assert u0 == pytest.approx(1.7071067811865475, rel=1e-15)

    @pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5, 1.0, 2.0])
    def test_matches_float64_formula(self, gamma):
        student, teacher = randn(4, 6, seed=2, scale=3.0), randn(4, 6, seed=3, scale=5.0)
        assert_float32_close(wttm_loss(student, teacher, gamma), wttm_ref(student, teacher, gamma))
        # float32 inputs give the same
        assert_float32_close(wttm_loss(student.float(), teacher.float(), gamma), wttm_ref(student, teacher, gamma),
                             rtol=1e-5)

    def test_confident_teacher_is_finite(self):
        # p_t of the other classes ~ e^-200 underflows in float32; in log space the power is still exact
        student, teacher = randn(2, 4, seed=4), torch.tensor([[200.0, 0.0, 0.0, 0.0], [0.0, 0.0, 150.0, 1.0]])
        got = wttm_loss(student, teacher, 0.2)
        assert torch.isfinite(got)
        assert_float32_close(got, wttm_ref(student, teacher.double(), 0.2))

    def test_no_gradient_reaches_the_teacher(self):
        student = randn(3, 5, seed=5).float().requires_grad_(True)
        teacher = randn(3, 5, seed=6).float().requires_grad_(True)
        wttm_loss(student, teacher, 0.3).backward()
        assert teacher.grad is None and student.grad.abs().sum() > 0


# ============================================================================ NormKD
class TestNormKDTemperature:
    def test_worked_by_hand(self):
        # (0, 0, 3): mean 1, squared deviations 1 + 1 + 4 = 6, unbiased variance 6/2 = 3: T = 2 sqrt3 at t_norm 2
        # (the biased std would give 2 sqrt2 = 2.828...)
        # (1, 2, 3, 6): mean 3, squared deviations 4 + 1 + 0 + 9 = 14, variance 14/3: T = 2 sqrt(14/3)
        logits = torch.tensor([[0.0, 0.0, 3.0, 1.0], [1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
        assert normkd_temperature(logits[:1, :3], 2.0).shape == (1, 1)
        assert normkd_temperature(logits[:1, :3], 2.0).item() == pytest.approx(3.4641016151377544, rel=1e-12)
        assert normkd_temperature(logits[1:], 2.0).item() == pytest.approx(4.320493798938574, rel=1e-12)
        assert normkd_temperature(logits[1:], 0.5).item() == pytest.approx(4.320493798938574 / 4, rel=1e-12)

    def test_one_per_row(self):
        logits = randn(5, 7, seed=7, scale=4.0)
        got = normkd_temperature(logits, 1.5)
        assert got.shape == (5, 1)
        for row, t in zip(logits, got[:, 0]):
            assert t.item() == pytest.approx(1.5 * std_unbiased_ref(row).item(), rel=1e-12)


class TestNormKDLoss:
    def test_worked_by_hand(self):
        # teacher (-1, 0, 1): std 1, so T_t = t_norm. Student (-2, 0, 2): std 2, T_s = 2 t_norm -> the same
        # distribution as the teacher's: loss 0 (each model divides by its own temperature).
        teacher = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
        assert_float32_close(normkd_loss(torch.tensor([[-2.0, 0.0, 2.0]], dtype=torch.float64), teacher, 1.0), 0.0,
                             atol=1e-7)
        # student (2, 0, -2): the teacher's distribution p = (e^-a, 1, e^a) / Z (a = 1 / t_norm) reversed;
        # ln p - ln p_rev = (-2a, 0, 2a), KL = 2a (p_3 - p_1) = 4a sinh(a) / (1 + 2 cosh(a)); times T_t^2 = t_norm^2
        reverse = torch.tensor([[2.0, 0.0, -2.0]], dtype=torch.float64)
        for t_norm in (1.0, 2.0):
            a = 1 / t_norm
            expected = t_norm ** 2 * 4 * a * math.sinh(a) / (1 + 2 * math.cosh(a))
            assert_float32_close(normkd_loss(reverse, teacher, t_norm), expected)
        assert 4 * math.sinh(1) / (1 + 2 * math.cosh(1)) == pytest.approx(1.150420765208883, rel=1e-12)

    def test_t_squared_is_per_sample_with_the_teacher_temperature(self):
        # the same pair twice, the second teacher row scaled by 3: its distribution is unchanged (T_t scales too)
        # but its T_t^2 is 9 times larger -> (KL + 9 KL) / 2 = 5 KL
        student, teacher = randn(1, 6, seed=8, scale=2.0), randn(1, 6, seed=9, scale=4.0)
        single = normkd_ref(student, teacher, 2.0)
        both = normkd_loss(torch.cat([student, student]), torch.cat([teacher, 3 * teacher]), 2.0)
        assert_float32_close(both, 5 * single)
        # the student's own scale and any shift change nothing
        assert_float32_close(normkd_loss(7 * student - 3, teacher + 1, 2.0), single)

    @pytest.mark.parametrize("t_norm", [0.5, 1.0, 2.0])
    def test_matches_float64_formula(self, t_norm):
        student, teacher = randn(4, 6, seed=10, scale=3.0), randn(4, 6, seed=11, scale=5.0)
        assert_float32_close(normkd_loss(student, teacher, t_norm), normkd_ref(student, teacher, t_norm))
        assert_float32_close(normkd_loss(student.float(), teacher.float(), t_norm),
                             normkd_ref(student, teacher, t_norm))

    def test_student_gradient_flows_through_its_temperature(self):
        # as the authors' code, T_s is not detached: the gradient equals the float64 reference's autograd, and
        # differs from the one with T_s held constant
        student, teacher = randn(3, 5, seed=12, scale=2.0), randn(3, 5, seed=13, scale=3.0)
        z = student.float().requires_grad_(True)
        normkd_loss(z, teacher.float(), 2.0).backward()
        z64 = student.clone().requires_grad_(True)
        normkd_ref(z64, teacher, 2.0).backward()
        torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)
        frozen = student.clone().requires_grad_(True)
        t_s = torch.stack([2.0 * std_unbiased_ref(row) for row in student])
        t_t = torch.stack([2.0 * std_unbiased_ref(row) for row in teacher])
        sum(t ** 2 * kl_row(softmax_row(zt / t), softmax_row(zs / ts))
            for zs, zt, ts, t in zip(frozen, teacher, t_s, t_t)).div(3).backward()
        assert (frozen.grad - z64.grad).abs().max() > 1e-3

    def test_no_gradient_reaches_the_teacher(self):
        student = randn(3, 5, seed=14).float().requires_grad_(True)
        teacher = randn(3, 5, seed=15).float().requires_grad_(True)
        normkd_loss(student, teacher, 2.0).backward()
        assert teacher.grad is None and student.grad.abs().sum() > 0


# ============================================================================ the Distillers
DEFAULTS = {"WTTM": {"gamma": 0.2, "ce_weight": 1.0, "wttm_weight": 4.0},
            "NormKD": {"t_norm": 2.0, "ce_weight": 0.1, "kd_weight": 0.9}}
NUM_CLASSES = 5


@pytest.mark.parametrize("name,distiller_class,loss_key",
                         [("WTTM", WTTM, "loss_wttm"), ("NormKD", NormKD, "loss_normkd")])
def test_distiller_training_step(name, distiller_class, loss_key):
    method = METHODS[name]
    assert method.distiller is distiller_class and set(method.settings) == set(DEFAULTS[name])
    assert all(method.settings[key].check(value) for key, value in DEFAULTS[name].items())
    torch.manual_seed(0)
    student = CIFAR_MODELS["resnet8"](num_classes=NUM_CLASSES)
    teacher = CIFAR_MODELS["resnet8"](num_classes=NUM_CLASSES)
    distiller = distiller_class(student, teacher, **DEFAULTS[name])
    distiller.train()
    assert not teacher.training and student.training
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 4, 2])
    logits, losses = distiller(images, targets)
    assert logits.shape == (4, NUM_CLASSES) and set(losses) == {"loss_ce", loss_key}
    assert all(torch.isfinite(value) and value.dim() == 0 for value in losses.values())
    assert losses[loss_key] > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert sum(p.grad.abs().sum() for p in student.parameters()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    fresh = CIFAR_MODELS["resnet8"](num_classes=NUM_CLASSES)
    fresh.load_state_dict(distiller.student.state_dict(), strict=True)

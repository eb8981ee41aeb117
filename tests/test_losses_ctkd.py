"""CTKD (Li et al., AAAI 2023): the gradient reversal, the λ curriculum, the base losses it wraps, and one step
of each registered variant on tiny models.

Expected values are worked by hand (numbers in the comments) or computed by float64 formulas written out
here; the authors' formulas are those of github.com/zhengli97/CTKD (models/temp_global.py, train_student.py's
CosineDecay, helper/loops.py's T = 1 + 20 · sigmoid(θ)).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd.methods.ctkd import CTKD, CTKD_DKD, REVERSAL_SHARE, GradientReversal, reversal_strength
from kd.methods.dkd import DKD
from kd.methods.kd import KD
from kd.methods.registry import METHODS
from models.cifar import CIFAR_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

CURRICULUM = {"temperature_min": 1.0, "temperature_span": 20.0, "reversal_max": 1.0, "reversal_epochs": 10}
KD_BASE = {"ce_weight": 0.1, "kd_weight": 0.9, "standardize": False}
DKD_BASE = {"ce_weight": 1.0, "tckd_weight": 1.0, "nckd_weight": 8.0, "warmup_epochs": 0, "standardize": False}
VARIANTS = {"CTKD": (CTKD, KD_BASE), "CTKD_DKD": (CTKD_DKD, DKD_BASE)}


class Fixed(nn.Module):
    """A "model" whose logits are given: the losses are then checked on exactly these numbers."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def logit_pair(seed: int, n: int = 4, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 2, torch.randn(n, k, generator=g) * 3,
            torch.randint(0, k, (n,), generator=g))


def kd_ref(student: torch.Tensor, teacher: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """T^2 * sum_i sum_k p_t (log p_t - log p_s) / N, softmax written out with exp and sum."""
    def log_softmax(z: torch.Tensor) -> torch.Tensor:
        z = z / temperature
        return z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    log_p_t, log_p_s = log_softmax(teacher), log_softmax(student)
    return temperature ** 2 * (torch.exp(log_p_t) * (log_p_t - log_p_s)).sum() / student.shape[0]


def raw_for(temperature: float) -> float:
    """θ with 1 + 20 · sigmoid(θ) = temperature."""
    share = (temperature - 1.0) / 20.0
    return math.log(share / (1.0 - share))


def test_reversal_layer_is_identity_forward_and_minus_lambda_backward():
    # y = GRL(x)^3 at x = 0.5, λ = 0.3: y = 0.125; plain dy/dx = 3 · 0.25 = 0.75, reversed -0.3 · 0.75 = -0.225
    x = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y = GradientReversal.apply(x, 0.3) ** 3
    assert y.item() == 0.125
    y.backward()
    assert x.grad.dtype == torch.float64 and x.grad.item() == pytest.approx(-0.225, rel=1e-15)


@pytest.mark.parametrize("strength", [0.25, 1.0])
def test_temperature_gradient_is_the_plain_one_times_minus_lambda(strength):
    student, teacher, targets = logit_pair(0)
    distiller = CTKD(Fixed(student), Fixed(teacher), **KD_BASE, **CURRICULUM)
    distiller.reversal = strength
    _, losses = distiller.forward_train(torch.zeros(4, 3, 8, 8), targets)
    losses["loss_kd"].backward()
    # the same loss in float64 on a plain (non-reversed) θ: 0.9 · kd(T(θ)), T(θ) = 1 + 20 · sigmoid(θ), θ = 1
    raw = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (0.9 * kd_ref(student.double(), teacher.double(), 1.0 + 20.0 * torch.sigmoid(raw))).backward()
    assert raw.grad.abs() > 1e-6  # the check below is not 0 == 0
    torch.testing.assert_close(distiller.raw_temperature.grad.double(), -strength * raw.grad, rtol=1e-4, atol=1e-9)


def test_curriculum_follows_the_authors_cosine():
    # λ(i) = λ_max (1 - cos(π min(i, N) / N)) / 2 at the 1-based epoch i (0-based e = i - 1), N = 10
    # i = 1: (1 - cos(18°)) / 2 = (1 - 0.9510565163) / 2 = 0.0244717419; i = 5: (1 - cos 90°) / 2 = 0.5;
    # i >= 10: (1 - cos 180°) / 2 = 1
    assert reversal_strength(0, 10, 1.0) == pytest.approx(0.0244717419, abs=1e-10)
    assert reversal_strength(4, 10, 1.0) == pytest.approx(0.5, abs=1e-15)
    assert reversal_strength(9, 10, 1.0) == 1.0 and reversal_strength(200, 10, 1.0) == 1.0
    assert reversal_strength(4, 10, 2.0) == pytest.approx(1.0, abs=1e-15)  # λ_max scales it
    assert reversal_strength(0, 1, 1.0) == 1.0  # a one-epoch curriculum is at λ_max at once
    # 10 of the authors' 240 epochs: 10 of 240, 2 of 50 (2.08), 1 of 12 (0.5 rounds to even: 0, then at least 1)
    assert [REVERSAL_SHARE.epochs(e) for e in (240, 50, 12)] == [10, 2, 1]
    assert METHODS["CTKD"].resolve({"reversal_epochs": None}, 240) == {"reversal_epochs": 10}
    distiller = CTKD(Fixed(torch.zeros(1, 2)), Fixed(torch.zeros(1, 2)), **KD_BASE, **CURRICULUM)
    distiller.start_epoch(4, 240)
    assert distiller.loss_weights()["reversal"] == pytest.approx(0.5)


@pytest.mark.parametrize("name, base_cls", [("CTKD", KD), ("CTKD_DKD", DKD)])
def test_at_a_fixed_temperature_the_loss_is_the_base_methods(name, base_cls):
    cls, base = VARIANTS[name]
    student, teacher, targets = logit_pair(1)
    ctkd = cls(Fixed(student), Fixed(teacher), **base, **CURRICULUM)
    with torch.no_grad():
        ctkd.raw_temperature.fill_(raw_for(4.0))
    assert ctkd.loss_weights()["temperature"] == pytest.approx(4.0, rel=1e-6)
    reference = base_cls(Fixed(student), Fixed(teacher), **base, temperature=4.0)
    _, got = ctkd.forward_train(torch.zeros(4, 3, 8, 8), targets)
    _, expected = reference.forward_train(torch.zeros(4, 3, 8, 8), targets)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=2e-6, atol=0.0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_one_step_on_tiny_models(name):
    torch.manual_seed(0)
    cls, base = VARIANTS[name]
    assert METHODS[name].distiller is cls
    student, teacher = CIFAR_MODELS["resnet8"](num_classes=5), CIFAR_MODELS["resnet8"](num_classes=5)
    distiller = cls(student, teacher, **base, **CURRICULUM)
    distiller.start_epoch(0, 240)
    distiller.train()
    logits, losses = distiller(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 4]))
    total = sum(losses.values())
    assert logits.shape == (4, 5) and torch.isfinite(total)
    total.backward()
    raw = distiller.raw_temperature
    assert raw.grad is not None and torch.isfinite(raw.grad) and raw.grad != 0
    assert any(p is raw for p in distiller.trainable_parameters())
    assert all(p.grad is None for p in teacher.parameters())
    saved = distiller.deployable_models()
    assert list(saved) == [""] and saved[""] is student
    assert not any("temperature" in key for key in student.state_dict())
    CIFAR_MODELS["resnet8"](num_classes=5).load_state_dict(student.state_dict(), strict=True)
    weights = distiller.loss_weights()
    assert weights["temperature"] == pytest.approx(1.0 + 20.0 / (1.0 + math.exp(-1.0)))  # θ = 1: 15.6212
    assert weights["reversal"] == pytest.approx(reversal_strength(0, 10, 1.0))
    extras = distiller.record_extras([], 1)
    assert extras.keys() == METHODS[name].record_fields.keys()

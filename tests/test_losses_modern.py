"""The pure loss functions of the newer methods, checked against values computed independently here.

DKD (Zhao et al., CVPR 2022), DIST (Huang et al., NeurIPS 2022), CRD's contrast loss (Tian et al., ICLR 2020),
ReviewKD's hierarchical context loss (Chen et al., CVPR 2021), RKD (Park et al., CVPR 2019), SP (Tung & Mori,
ICCV 2019), PKT (Passalis & Tefas, ECCV 2018) and logit standardization for KD / DKD (Sun et al., CVPR 2024).

Every expected value is either worked by hand (the numbers are in the comments) or computed by a float64
formula written out below with plain torch ops (exp / log / sqrt / sum / reshape-mean); no helper from kd/ is
used for a reference, and the function under test never produces its own expected value. The formulas follow
the reference code: mdistiller's DKD.py / ReviewKD.py, image_classification_sota's dist_kd.py, RepDistiller's
crd/criterion.py, distiller_zoo/RKD.py, SP.py and PKT.py, and the LS repo's normalize(logit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from kd.methods.common import kd_loss, standardize_logits, warmup_factor
from kd.methods.crd import contrast_loss
from kd.methods.dist_kd import dist_loss
from kd.methods.dkd import dkd_loss
from kd.methods.pkt import pkt_loss
from kd.methods.reviewkd import hcl_loss
from kd.methods.rkd import rkd_loss
from kd.methods.sp import sp_loss

Tensor = torch.Tensor


# ============================================================================ independent float64 references
def softmax_ref(z: Tensor, temperature: float = 1.0) -> Tensor:
    z = z / temperature
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def kl_sum_over_batch_ref(p: Tensor, q: Tensor) -> Tensor:
    """sum_i sum_k p (log p - log q) / N (terms with p = 0 contribute 0)."""
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum() / p.shape[0]


def kd_ref(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    return temperature ** 2 * kl_sum_over_batch_ref(softmax_ref(teacher, temperature), softmax_ref(student, temperature))


def standardize_ref(z: Tensor, eps: float = 1e-7) -> Tensor:
    """(z - mean) / (eps + std), std UNBIASED (divided by K - 1), per sample over the classes."""
    k = z.shape[1]
    centred = z - z.sum(dim=1, keepdim=True) / k
    std = torch.sqrt((centred * centred).sum(dim=1, keepdim=True) / (k - 1))
    return centred / (eps + std)


def standardize_biased_ref(z: Tensor, eps: float = 1e-7) -> Tensor:
    """The WRONG variant (population std, divided by K), only to show the two differ."""
    centred = z - z.mean(dim=1, keepdim=True)
    return centred / (eps + torch.sqrt((centred * centred).mean(dim=1, keepdim=True)))


def onehot_ref(targets: Tensor, k: int) -> Tensor:
    m = torch.zeros(len(targets), k, dtype=torch.bool)
    m[torch.arange(len(targets)), targets] = True
    return m


def tckd_ref(student: Tensor, teacher: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """T^2 * KL over the binary [p_g, sum_{j != g} p_j], summed over the batch, divided by N."""
    gt = onehot_ref(targets, student.shape[1])
    p_s, p_t = softmax_ref(student, temperature), softmax_ref(teacher, temperature)
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0.0).sum(dim=1)], dim=1)
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0.0).sum(dim=1)], dim=1)
    return temperature ** 2 * kl_sum_over_batch_ref(b_t, b_s)


def nckd_ref(student: Tensor, teacher: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """T^2 * KL of the softmax over the non-target classes only (gt column removed exactly), / N."""
    n, k = student.shape
    keep = ~onehot_ref(targets, k)
    s_nt, t_nt = student[keep].reshape(n, k - 1), teacher[keep].reshape(n, k - 1)
    return temperature ** 2 * kl_sum_over_batch_ref(softmax_ref(t_nt, temperature), softmax_ref(s_nt, temperature))


def dkd_ref(student, teacher, targets, alpha, beta, temperature, standardize=False) -> Tensor:
    if standardize:
        student, teacher = standardize_ref(student), standardize_ref(teacher)
    return (alpha * tckd_ref(student, teacher, targets, temperature)
            + beta * nckd_ref(student, teacher, targets, temperature))


def pearson_rows_ref(a: Tensor, b: Tensor, eps: float = 1e-8, eps_mode: str = "outside") -> Tensor:
    """Pearson correlation of each row of a with the same row of b.

    eps_mode "outside" (the spec / dist_kd.py): sum(a'b') / (|a'| |b'| + eps).  "max" and "none" exist only to
    show that the placement of eps is observable.
    """
    ac = a - a.mean(dim=1, keepdim=True)
    bc = b - b.mean(dim=1, keepdim=True)
    prod = torch.sqrt((ac * ac).sum(dim=1)) * torch.sqrt((bc * bc).sum(dim=1))
    denom = {"outside": prod + eps, "max": prod.clamp_min(eps), "none": prod}[eps_mode]
    return (ac * bc).sum(dim=1) / denom


def dist_inter_ref(student, teacher, temperature, eps_mode="outside") -> Tensor:
    y_s, y_t = softmax_ref(student, temperature), softmax_ref(teacher, temperature)
    return 1 - pearson_rows_ref(y_s, y_t, eps_mode=eps_mode).mean()          # each sample, over classes


def dist_intra_ref(student, teacher, temperature, eps_mode="outside") -> Tensor:
    y_s, y_t = softmax_ref(student, temperature), softmax_ref(teacher, temperature)
    return 1 - pearson_rows_ref(y_s.t(), y_t.t(), eps_mode=eps_mode).mean()  # each class, over the batch


def dist_ref(student, teacher, beta, gamma, temperature, eps_mode="outside") -> Tensor:
    return temperature ** 2 * (beta * dist_inter_ref(student, teacher, temperature, eps_mode)
                               + gamma * dist_intra_ref(student, teacher, temperature, eps_mode))


def contrast_ref(x: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    x = x.reshape(x.shape[0], -1)
    n, m = x.shape[0], x.shape[1] - 1
    m_pn = m / n_data
    pos = torch.log(x[:, 0] / (x[:, 0] + m_pn + eps))
    neg = torch.log(m_pn / (x[:, 1:] + m_pn + eps))
    return -(pos.sum() + neg.sum()) / n


def mse_ref(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).sum() / a.numel()


def pool_ref(f: Tensor, size: int) -> Tensor:
    """Average-pool an (N, C, H, H) map to size x size with reshape + mean (H a multiple of size)."""
    n, c, h, w = f.shape
    return f.reshape(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


# (pooled size, weight) per spatial size H, literally as stated for ReviewKD's hcl
HCL_POOLS = {
    1: [],
    2: [(1, 1 / 2)],
    4: [(2, 1 / 2), (1, 1 / 4)],
    8: [(4, 1 / 2), (2, 1 / 4), (1, 1 / 8)],
    16: [(4, 1 / 2), (2, 1 / 4), (1, 1 / 8)],
}


def hcl_level_ref(fs: Tensor, ft: Tensor) -> Tensor:
    pools = HCL_POOLS[fs.shape[2]]
    total = mse_ref(fs, ft) + sum(w * mse_ref(pool_ref(fs, l), pool_ref(ft, l)) for l, w in pools)
    return total / (1 + sum(w for _, w in pools))


def hcl_ref(student_feats, teacher_feats) -> Tensor:
    return sum(hcl_level_ref(fs, ft) for fs, ft in zip(student_feats, teacher_feats))


def smooth_l1_ref(a: Tensor, b: Tensor) -> Tensor:
    x = (a - b).abs()
    return torch.where(x < 1, 0.5 * x * x, x - 0.5).mean()


def rkd_distances_ref(e: Tensor) -> Tensor:
    e = e.reshape(e.shape[0], -1)
    sq = (e * e).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2 * e @ e.t()
    d = torch.sqrt(d2.clamp(min=1e-12)) * (1 - torch.eye(len(e), dtype=e.dtype))  # d_ii = 0
    return d / d[d > 0].mean()


def rkd_angles_ref(e: Tensor) -> Tensor:
    e = e.reshape(e.shape[0], -1)
    diff = e[None, :, :] - e[:, None, :]                        # diff[i, j] = x_j - x_i
    norm = torch.linalg.vector_norm(diff, dim=2, keepdim=True)
    unit = diff / norm.clamp_min(1e-12)                         # zero vector for i = j
    return torch.einsum("ijd,ikd->ijk", unit, unit)             # A_ijk = e_ij . e_ik


def rkd_ref(student, teacher, distance_weight=25.0, angle_weight=50.0) -> Tensor:
    return (distance_weight * smooth_l1_ref(rkd_distances_ref(student), rkd_distances_ref(teacher))
            + angle_weight * smooth_l1_ref(rkd_angles_ref(student), rkd_angles_ref(teacher)))


def sp_gram_ref(f: Tensor) -> Tensor:
    f = f.reshape(f.shape[0], -1)
    g = f @ f.t()
    return g / torch.sqrt((g * g).sum(dim=1, keepdim=True)).clamp_min(1e-12)


def sp_ref(student_feats, teacher_feats) -> Tensor:
    total = 0.0
    for fs, ft in zip(student_feats, teacher_feats):
        b = fs.shape[0]
        total = total + ((sp_gram_ref(ft) - sp_gram_ref(fs)) ** 2).sum() / b ** 2
    return total


def pkt_prob_ref(x: Tensor, eps: float) -> Tensor:
    x = x / (torch.sqrt((x * x).sum(dim=1, keepdim=True)) + eps)
    s = (x @ x.t() + 1) / 2
    return s / s.sum(dim=1, keepdim=True)


def pkt_ref(student, teacher, eps=1e-7) -> Tensor:
    p_s, p_t = pkt_prob_ref(student, eps), pkt_prob_ref(teacher, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()   # mean over all N^2 entries


# ============================================================================ checking helpers
def assert_scalar_close(got: Tensor, expected, rtol: float = 1e-5, atol: float = 0.0,
                        dtype: torch.dtype = torch.float32) -> None:
    """A 0-dim tensor of `dtype`, equal to the float64 `expected` to rtol (atol only for near-zero values)."""
    assert isinstance(got, torch.Tensor)
    assert got.dim() == 0, f"expected a 0-dim tensor, got shape {tuple(got.shape)}"
    assert got.dtype == dtype, got.dtype
    expected = torch.as_tensor(expected, dtype=torch.float64).detach()
    torch.testing.assert_close(got.detach().double(), expected, rtol=rtol, atol=atol)


def assert_grad_close(got: Tensor, expected: Tensor) -> None:
    # float32 gradient against the float64 one: the forward pass already carries ~1e-6 relative rounding
    # (sums over N^2 or N^3 terms, softmax, sqrt), hence rtol 1e-4 and an atol tied to the gradient's scale
    # for the entries that are (nearly) zero.
    assert got is not None
    atol = 1e-6 * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=atol)


def randn(*shape, seed: int, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# ============================================================================ one table for the common checks
@dataclass
class Case:
    """impl(students, teachers) -> loss under test; ref(students64, teachers64) -> float64 formula;
    make(seed) -> (student tensors, teacher tensors), float32."""
    impl: Callable
    ref: Callable
    make: Callable


TARGETS = torch.tensor([0, 3, 1, 4, 4, 2])


def logit_pair(seed):
    return [randn(6, 5, seed=seed, scale=3.0)], [randn(6, 5, seed=seed + 100, scale=3.0)]


def crd_scores(seed, k=7, three_dim=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(5, k + 1, generator=g) * 2 + 0.01  # exp(.)/Z scores are positive
    return [x.unsqueeze(2) if three_dim else x], []


def hcl_maps(seed):
    sizes = [16, 8, 4, 2, 1]  # shallow -> deep, like ReviewKD's levels
    fs = [randn(2, 3, h, h, seed=seed + i) for i, h in enumerate(sizes)]
    ft = [randn(2, 3, h, h, seed=seed + 50 + i) for i, h in enumerate(sizes)]
    return fs, ft


def sp_maps(seed):
    # channel and spatial sizes differ between student and teacher (and between the two pairs)
    fs = [randn(4, 3, 4, 4, seed=seed), randn(4, 8, 2, 2, seed=seed + 1)]
    ft = [randn(4, 6, 2, 2, seed=seed + 2), randn(4, 5, 4, 4, seed=seed + 3)]
    return fs, ft


CASES = {
    "kd_plain": Case(lambda s, t: kd_loss(s[0], t[0], 4.0, standardize=False),
                     lambda s, t: kd_ref(s[0], t[0], 4.0), logit_pair),
    "kd_standardize": Case(lambda s, t: kd_loss(s[0], t[0], 2.0, standardize=True),
                           lambda s, t: kd_ref(standardize_ref(s[0]), standardize_ref(t[0]), 2.0), logit_pair),
    "dkd": Case(lambda s, t: dkd_loss(s[0], t[0], TARGETS, 1.0, 8.0, 4.0),
                lambda s, t: dkd_ref(s[0], t[0], TARGETS, 1.0, 8.0, 4.0), logit_pair),
    "dkd_standardize": Case(lambda s, t: dkd_loss(s[0], t[0], TARGETS, 9.0, 72.0, 2.0, standardize=True),
                            lambda s, t: dkd_ref(s[0], t[0], TARGETS, 9.0, 72.0, 2.0, standardize=True),
                            logit_pair),
    "dist": Case(lambda s, t: dist_loss(s[0], t[0], 2.0, 2.0, 4.0),
                 lambda s, t: dist_ref(s[0], t[0], 2.0, 2.0, 4.0), logit_pair),
    "dist_t1": Case(lambda s, t: dist_loss(s[0], t[0], 1.0, 0.5, 1.0),
                    lambda s, t: dist_ref(s[0], t[0], 1.0, 0.5, 1.0), logit_pair),
    "crd_2d": Case(lambda s, t: contrast_loss(s[0], 50), lambda s, t: contrast_ref(s[0], 50), crd_scores),
    "crd_3d": Case(lambda s, t: contrast_loss(s[0], 50), lambda s, t: contrast_ref(s[0], 50),
                   lambda seed: crd_scores(seed, three_dim=True)),
    "hcl": Case(lambda s, t: hcl_loss(s, t), lambda s, t: hcl_ref(s, t), hcl_maps),
    "rkd": Case(lambda s, t: rkd_loss(s[0], t[0]), lambda s, t: rkd_ref(s[0], t[0]),
                lambda seed: ([randn(6, 8, seed=seed)], [randn(6, 12, seed=seed + 1, scale=2.0)])),
    "rkd_maps_flattened": Case(lambda s, t: rkd_loss(s[0], t[0], 2.0, 3.0), lambda s, t: rkd_ref(s[0], t[0], 2.0, 3.0),
                               lambda seed: ([randn(5, 2, 2, 2, seed=seed)], [randn(5, 4, 1, 1, seed=seed + 1)])),
    "sp": Case(lambda s, t: sp_loss(s, t), lambda s, t: sp_ref(s, t), sp_maps),
    "pkt": Case(lambda s, t: pkt_loss(s[0], t[0]), lambda s, t: pkt_ref(s[0], t[0]),
                lambda seed: ([randn(6, 8, seed=seed)], [randn(6, 12, seed=seed + 1)])),
}
WITH_TEACHER = [name for name in CASES if not name.startswith("crd")]


def to64(tensors):
    return [x.detach().double() for x in tensors]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_formula_on_random_inputs(name, seed):
    case = CASES[name]
    students, teachers = case.make(seed)
    expected = case.ref(to64(students), to64(teachers))
    assert_scalar_close(case.impl(students, teachers), expected, rtol=1e-5)


@pytest.mark.parametrize("name", WITH_TEACHER)
def test_no_gradient_reaches_teacher(name):
    case = CASES[name]
    students, teachers = case.make(3)
    students = [x.clone().requires_grad_(True) for x in students]
    teachers = [x.clone().requires_grad_(True) for x in teachers]
    case.impl(students, teachers).backward()
    for t in teachers:
        assert t.grad is None or torch.count_nonzero(t.grad) == 0
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)


@pytest.mark.parametrize("name", list(CASES))
def test_student_gradient_matches_float64_autograd(name):
    case = CASES[name]
    students, teachers = case.make(4)
    students32 = [x.clone().requires_grad_(True) for x in students]
    case.impl(students32, teachers).backward()
    students64 = [x.double().requires_grad_(True) for x in students]
    case.ref(students64, to64(teachers)).backward()
    for got, expected in zip(students32, students64):
        assert got.grad is not None and got.grad.dtype == torch.float32
        assert_grad_close(got.grad, expected.grad)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast_to_float32(name, dtype):
    # the inputs are rounded to bf16 / fp16 first; the reference sees exactly those rounded values
    case = CASES[name]
    students, teachers = case.make(5)
    students, teachers = [x.to(dtype) for x in students], [x.to(dtype) for x in teachers]
    got = case.impl(students, teachers)
    assert_scalar_close(got, case.ref(to64(students), to64(teachers)), rtol=1e-5, dtype=torch.float32)


# ============================================================================ logit standardization (Sun et al., CVPR 2024)
class TestStandardizeLogits:
    def test_worked_by_hand_unbiased_std_plus_eps(self):
        # z = (1, 2, 3): mean 2, unbiased std = sqrt((1 + 0 + 1) / 2) = 1  ->  (-1, 0, 1) / (1 + 1e-7)
        # (the biased std sqrt(2/3) would give -+1.2247...)
        z = torch.tensor([[1.0, 2.0, 3.0]])
        out = standardize_logits(z)
        assert out.shape == z.shape
        torch.testing.assert_close(out.double(), torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64) / (1 + 1e-7),
                                   rtol=1e-6, atol=1e-7)
        assert abs(out[0, 0].item() - (-1 / math.sqrt(2 / 3))) > 0.2

    def test_eps_is_added_to_std(self):
        # eps = 0.5: (-1, 0, 1) / (0.5 + 1) = (-2/3, 0, 2/3); adding eps to the variance would give 1/sqrt(1.5)
        z = torch.tensor([[1.0, 2.0, 3.0], [10.0, 12.0, 14.0]])
        # second row: mean 12, unbiased std 2 -> (-2, 0, 2) / 2.5 = (-0.8, 0, 0.8)
        out = standardize_logits(z, eps=0.5)
        expected = torch.tensor([[-2 / 3, 0.0, 2 / 3], [-0.8, 0.0, 0.8]], dtype=torch.float64)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)

    def test_constant_row_gives_zeros(self):
        out = standardize_logits(torch.full((2, 4), 5.0))
        assert torch.isfinite(out).all() and torch.count_nonzero(out) == 0

    def test_random_matches_unbiased_formula_not_biased(self):
        z = randn(4, 7, seed=0, scale=3.0) + 2.0
        out = standardize_logits(z)
        expected = standardize_ref(z.double())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
        biased = standardize_biased_ref(z.double())
        assert (out.double() - biased).abs().max() > 1e-2

    def test_per_sample_rows_are_independent(self):
        z = randn(3, 6, seed=1, scale=2.0)
        other = z.clone()
        other[1:] = randn(2, 6, seed=2, scale=5.0)
        torch.testing.assert_close(standardize_logits(z)[0], standardize_logits(other)[0])

    def test_gradient_flows_through_mean_and_std(self):
        z = randn(3, 5, seed=3, scale=2.0)
        w = randn(3, 5, seed=4)
        z32 = z.clone().requires_grad_(True)
        (standardize_logits(z32) * w).sum().backward()
        z64 = z.double().requires_grad_(True)
        (standardize_ref(z64) * w.double()).sum().backward()
        assert_grad_close(z32.grad, z64.grad)
        # through the mean: every row's gradient sums to zero (a constant shift changes nothing)
        torch.testing.assert_close(z32.grad.sum(dim=1), torch.zeros(3), atol=1e-5, rtol=0)


class TestKDStandardize:
    def test_worked_by_hand(self):
        # teacher (1, 2, 3) standardizes to (-s, 0, s), s = 1 / (1 + 1e-7); the constant student to (0, 0, 0)
        # (uniform). T = 1: KL(p_t || uniform) = sum p_t ln p_t + ln 3, p_t = softmax(-s, 0, s) ~ (.0900, .2447, .6652)
        s = 1 / (1 + 1e-7)
        e = [math.exp(-s), 1.0, math.exp(s)]
        p = [x / sum(e) for x in e]
        expected = sum(x * math.log(x) for x in p) + math.log(3)
        assert expected == pytest.approx(0.266216664, rel=1e-8)
        got = kd_loss(torch.full((1, 3), 7.0), torch.tensor([[1.0, 2.0, 3.0]]), 1.0, standardize=True)
        assert_scalar_close(got, expected)
        # T = 2 on standardized logits: same formula with (-s, 0, s) / 2, times T^2 = 4
        e2 = [math.exp(-s / 2), 1.0, math.exp(s / 2)]
        p2 = [x / sum(e2) for x in e2]
        expected2 = 4 * (sum(x * math.log(x) for x in p2) + math.log(3))
        got2 = kd_loss(torch.full((1, 3), 7.0), torch.tensor([[1.0, 2.0, 3.0]]), 2.0, standardize=True)
        assert_scalar_close(got2, expected2)

    def test_invariant_to_shift_and_scale_of_either_side(self):
        t = randn(4, 6, seed=0, scale=2.0)
        s = 5.0 * t + 3.0
        # same logits after standardization (up to the eps, ~1e-7): the loss vanishes
        assert_scalar_close(kd_loss(s, t, 2.0, standardize=True), 0.0, atol=1e-5)
        # ... while plain KD sees very different distributions
        assert kd_loss(s, t, 2.0, standardize=False).item() > 0.1

    def test_default_is_not_standardized(self):
        s, t = randn(5, 4, seed=1, scale=3.0), randn(5, 4, seed=2, scale=3.0)
        assert_scalar_close(kd_loss(s, t, 4.0), kd_ref(s.double(), t.double(), 4.0))
        assert kd_loss(s, t, 4.0).item() == kd_loss(s, t, 4.0, standardize=False).item()
        assert not math.isclose(kd_loss(s, t, 4.0, standardize=True).item(), kd_loss(s, t, 4.0).item(),
                                rel_tol=1e-3)

    def test_standardized_with_biased_std_would_differ(self):
        s, t = randn(5, 4, seed=3, scale=3.0), randn(5, 4, seed=4, scale=3.0)
        s64, t64 = s.double(), t.double()
        got = kd_loss(s, t, 2.0, standardize=True)
        assert_scalar_close(got, kd_ref(standardize_ref(s64), standardize_ref(t64), 2.0))
        wrong = kd_ref(standardize_biased_ref(s64), standardize_biased_ref(t64), 2.0)
        assert not math.isclose(got.item(), wrong.item(), rel_tol=1e-3)


# ============================================================================ DKD (Zhao et al., CVPR 2022)
# A 3-class case worked by hand, target g = 0, T = 1:
#   teacher logits (ln 2, 0, 0) -> p_t = (1/2, 1/4, 1/4): b_t = (1/2, 1/2), non-target q_t = (1/2, 1/2)
#   student logits (0, ln 2, 0) -> p_s = (1/4, 1/2, 1/4): b_s = (1/4, 3/4), non-target q_s = (2/3, 1/3)
#   TCKD = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln(4/3) = 0.143841036...
#   NCKD = 1/2 ln((1/2)/(2/3)) + 1/2 ln((1/2)/(1/3)) = 1/2 ln(9/8) = 0.058891518...
DKD_STUDENT = torch.tensor([[0.0, math.log(2.0), 0.0]])
DKD_TEACHER = torch.tensor([[math.log(2.0), 0.0, 0.0]])
DKD_TARGET = torch.tensor([0])
HAND_TCKD = 0.5 * math.log(4 / 3)
HAND_NCKD = 0.5 * math.log(9 / 8)


class TestDKDLoss:
    def test_hand_values(self):
        assert HAND_TCKD == pytest.approx(0.14384103622589042, rel=1e-12)
        assert HAND_NCKD == pytest.approx(0.05889151782819173, rel=1e-12)

    @pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.0, 1.0), (2.0, 3.0), (1.0, 8.0)])
    def test_worked_by_hand(self, alpha, beta):
        got = dkd_loss(DKD_STUDENT, DKD_TEACHER, DKD_TARGET, alpha, beta, 1.0)
        assert_scalar_close(got, alpha * HAND_TCKD + beta * HAND_NCKD, atol=1e-7)

    def test_worked_by_hand_temperature_squared(self):
        # logits scaled by T = 2 give the same distributions at T = 2; the loss gains T^2 = 4
        got = dkd_loss(2 * DKD_STUDENT, 2 * DKD_TEACHER, DKD_TARGET, 1.0, 1.0, 2.0)
        assert_scalar_close(got, 4 * (HAND_TCKD + HAND_NCKD))

    def test_divided_by_batch_size(self):
        # add a row where student == teacher (contributes 0): the mean over N = 2 halves the value
        student = torch.cat([DKD_STUDENT, torch.tensor([[0.3, -1.0, 2.0]])])
        teacher = torch.cat([DKD_TEACHER, torch.tensor([[0.3, -1.0, 2.0]])])
        got = dkd_loss(student, teacher, torch.tensor([0, 2]), 1.0, 1.0, 1.0)
        assert_scalar_close(got, (HAND_TCKD + HAND_NCKD) / 2, atol=1e-7)

    def test_target_position_matters(self):
        # the same logits with target g = 1: b_t = (1/4, 3/4), b_s = (1/2, 1/2);
        # TCKD = 1/4 ln(1/2) + 3/4 ln(3/2); non-target classes (0, 2): q_t = (2/3, 1/3), q_s = (1/2, 1/2):
        # NCKD = 2/3 ln(4/3) + 1/3 ln(2/3)
        tckd = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
        nckd = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
        assert_scalar_close(dkd_loss(DKD_STUDENT, DKD_TEACHER, torch.tensor([1]), 1.0, 0.0, 1.0), tckd)
        assert_scalar_close(dkd_loss(DKD_STUDENT, DKD_TEACHER, torch.tensor([1]), 0.0, 1.0, 1.0), nckd)

    @pytest.mark.parametrize("temperature", [1.0, 4.0])
    def test_alpha_and_beta_weight_tckd_and_nckd_separately(self, temperature):
        (s,), (t,) = logit_pair(7)
        s64, t64 = s.double(), t.double()
        tckd = tckd_ref(s64, t64, TARGETS, temperature)
        nckd = nckd_ref(s64, t64, TARGETS, temperature)
        assert_scalar_close(dkd_loss(s, t, TARGETS, 1.0, 0.0, temperature), tckd)
        assert_scalar_close(dkd_loss(s, t, TARGETS, 0.0, 1.0, temperature), nckd)
        assert_scalar_close(dkd_loss(s, t, TARGETS, 1.0, 8.0, temperature), tckd + 8 * nckd)
        assert_scalar_close(dkd_loss(s, t, TARGETS, 0.0, 0.0, temperature), 0.0, atol=1e-12)

    def test_standardize_applies_to_both_logits(self):
        (s,), (t,) = logit_pair(8)
        s64, t64 = s.double(), t.double()
        for alpha, beta in [(1.0, 0.0), (0.0, 1.0), (9.0, 72.0)]:
            got = dkd_loss(s, t, TARGETS, alpha, beta, 2.0, standardize=True)
            expected = (alpha * tckd_ref(standardize_ref(s64), standardize_ref(t64), TARGETS, 2.0)
                        + beta * nckd_ref(standardize_ref(s64), standardize_ref(t64), TARGETS, 2.0))
            assert_scalar_close(got, expected)
        plain = dkd_loss(s, t, TARGETS, 9.0, 72.0, 2.0)
        standardized = dkd_loss(s, t, TARGETS, 9.0, 72.0, 2.0, standardize=True)
        assert not math.isclose(plain.item(), standardized.item(), rel_tol=1e-3)
        # standardization makes DKD blind to a per-sample affine map of the student's logits
        assert_scalar_close(dkd_loss(3 * t + 1, t, TARGETS, 9.0, 72.0, 2.0, standardize=True), 0.0, atol=1e-4)

    def test_identical_logits_give_zero(self):
        (s,), _ = logit_pair(9)
        assert_scalar_close(dkd_loss(s, s.clone(), TARGETS, 1.0, 8.0, 4.0), 0.0, atol=1e-5)


class TestDKDWarmup:
    @pytest.mark.parametrize("epoch,warmup,expected", [
        (0, 20, 1 / 20), (1, 20, 2 / 20), (9, 20, 0.5), (18, 20, 19 / 20), (19, 20, 1.0), (20, 20, 1.0),
        (30, 20, 1.0), (0, 0, 1.0), (7, 0, 1.0), (0, 1, 1.0), (0, 4, 0.25), (2, 4, 0.75),
    ])
    def test_linear_warmup_over_zero_based_epochs(self, epoch, warmup, expected):
        got = warmup_factor(epoch, warmup)
        assert isinstance(got, float)
        assert got == pytest.approx(expected, rel=1e-12)

    def test_whole_schedule(self):
        assert [warmup_factor(e, 20) for e in range(50)] == pytest.approx(
            [min((e + 1) / 20, 1.0) for e in range(50)], rel=1e-12)
        assert [warmup_factor(e, 0) for e in range(5)] == [1.0] * 5


# ============================================================================ DIST (Huang et al., NeurIPS 2022)
class TestDISTLoss:
    def test_worked_by_hand_full_correlations(self):
        # K = 2: a centred row (p, 1-p) - 1/2 = +-(2p - 1)/2, so each Pearson is the sign product (norms >> 1e-8).
        # student rows (1, 0), (0, 1): p0 = sigmoid(1) = .731, sigmoid(-1) = .269
        # teacher rows (2, 0), (3, 0): p0 = sigmoid(2) = .881, sigmoid(3) = .953
        # inter: row 1 (+, +) -> 1, row 2 (-, +) -> -1; mean 0 -> inter = 1
        # intra: column 0 student decreases (.731 -> .269), teacher increases (.881 -> .953) -> -1; column 1 the
        #        same -> -1; intra = 1 - (-1) = 2.   Loss = T^2 (beta * 1 + gamma * 2)
        student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        teacher = torch.tensor([[2.0, 0.0], [3.0, 0.0]])
        assert_scalar_close(dist_loss(student, teacher, 1.0, 1.0, 1.0), 3.0)
        assert_scalar_close(dist_loss(student, teacher, 1.0, 0.0, 1.0), 1.0)
        assert_scalar_close(dist_loss(student, teacher, 0.0, 1.0, 1.0), 2.0)
        # T = 2 keeps every sign: T^2 (2 * 1 + 0.5 * 2) = 4 * 3
        assert_scalar_close(dist_loss(student, teacher, 2.0, 0.5, 2.0), 12.0)

    def test_worked_by_hand_constant_row_has_zero_correlation(self):
        # teacher row 2 is (0, 0): uniform, zero variance -> Pearson = 0 / (0 + 1e-8) = 0 (no NaN)
        # inter = 1 - (1 + 0) / 2 = 1/2
        # intra: teacher column 0 (.881, .5) and student (.731, .269) both decrease -> +1; column 1 both increase
        #        -> +1; intra = 0.        beta = 1, gamma = 1, T = 1 -> 1/2
        student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        teacher = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        got = dist_loss(student, teacher, 1.0, 1.0, 1.0)
        assert torch.isfinite(got)
        assert_scalar_close(got, 0.5, atol=1e-7)

    def test_identical_logits_give_zero(self):
        # every Pearson is 1 - 1e-8 / (product of norms) ~ 1, rounded in float32 (~1e-7 each); T^2 = 16 and the
        # two terms scale that rounding up, hence atol 1e-4
        (s,), _ = logit_pair(3)
        assert_scalar_close(dist_loss(s, s.clone(), 1.0, 1.0, 4.0), 0.0, atol=1e-4)
        assert_scalar_close(dist_loss(s, s.clone(), 1.0, 1.0, 1.0), 0.0, atol=1e-5)

    @pytest.mark.parametrize("temperature", [1.0, 4.0])
    def test_inter_over_rows_and_intra_over_columns(self, temperature):
        (s,), (t,) = logit_pair(4)
        s64, t64 = s.double(), t.double()
        inter = temperature ** 2 * dist_inter_ref(s64, t64, temperature)
        intra = temperature ** 2 * dist_intra_ref(s64, t64, temperature)
        assert not math.isclose(inter.item(), intra.item(), rel_tol=1e-2)
        assert_scalar_close(dist_loss(s, t, 1.0, 0.0, temperature), inter)
        assert_scalar_close(dist_loss(s, t, 0.0, 1.0, temperature), intra)
        assert_scalar_close(dist_loss(s, t, 2.0, 3.0, temperature), 2 * inter + 3 * intra)

    def test_eps_is_added_outside_the_product_of_norms(self):
        # class 2 is nearly impossible for the student (probabilities ~4e-7 and ~1e-7: centred norm ~2e-7),
        # while the teacher's class-2 column varies (norm ~0.17); the norms' product (~3e-8) is comparable to
        # 1e-8, so that class's Pearson is ~-0.77 with eps outside, -1 with max(product, eps). (Without any eps the
        # teacher's uniform first row would give 0/0.) Small probabilities are exact enough in float32: their
        # relative rounding is ~1e-7, hence rtol 1e-4 here.
        student = torch.tensor([[0.0, 0.0, -14.0], [0.0, 1.0, -14.5]])
        teacher = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        s64, t64 = student.double(), teacher.double()
        expected = dist_ref(s64, t64, 1.0, 1.0, 1.0)
        got = dist_loss(student, teacher, 1.0, 1.0, 1.0)
        assert_scalar_close(got, expected, rtol=1e-4)
        wrong = dist_ref(s64, t64, 1.0, 1.0, 1.0, eps_mode="max")
        assert abs(wrong.item() - expected.item()) > 0.02
        assert torch.isnan(dist_ref(s64, t64, 1.0, 1.0, 1.0, eps_mode="none"))


# ============================================================================ CRD contrast loss (Tian et al., ICLR 2020)
class TestContrastLoss:
    def test_worked_by_hand(self):
        # n_data = 4, K = 2 -> m * Pn = 2/4 = 1/2; x = (0.5 | 0.5, 1.5)
        #   positive: ln(0.5 / (0.5 + 0.5 + eps));  negatives: ln(0.5 / (0.5 + 0.5 + eps)) + ln(0.5 / (1.5 + 0.5 + eps))
        #   loss = -(2 ln(0.5 / (1 + eps)) + ln(0.5 / (2 + eps))) ~ 4 ln 2 = 2.7726
        eps = 1e-7
        expected = -(2 * math.log(0.5 / (1 + eps)) + math.log(0.5 / (2 + eps)))
        assert expected == pytest.approx(4 * math.log(2), rel=1e-6)
        x = torch.tensor([[0.5, 0.5, 1.5]])
        assert_scalar_close(contrast_loss(x, 4), expected)
        assert_scalar_close(contrast_loss(x.unsqueeze(2), 4), expected)

    def test_eps_in_the_denominators(self):
        # n_data = 1e7, K = 1 -> m * Pn = 1e-7 = eps. x = (1e-7 | 0):
        #   positive ln(1e-7 / (1e-7 + 1e-7 + 1e-7)) = -ln 3; negative ln(1e-7 / (0 + 1e-7 + 1e-7)) = -ln 2
        #   loss = ln 3 + ln 2 = ln 6 (without the eps it would be ln 2)
        x = torch.tensor([[1e-7, 0.0]])
        assert_scalar_close(contrast_loss(x, 10_000_000), math.log(6.0))

    def test_m_is_the_number_of_negatives(self):
        # one row (1 | 1, ..., 1) with K negatives, n_data = 10: c = K / 10;
        #   loss = -(ln(1 / (1 + c + eps)) + K ln(c / (1 + c + eps)))
        eps = 1e-7
        for k in (1, 3, 9):
            c = k / 10
            expected = -(math.log(1 / (1 + c + eps)) + k * math.log(c / (1 + c + eps)))
            assert_scalar_close(contrast_loss(torch.ones(1, k + 1), 10), expected)

    def test_two_and_three_dim_inputs_agree(self):
        (x,), _ = crd_scores(11, k=16)
        a = contrast_loss(x, 100)
        b = contrast_loss(x.unsqueeze(2), 100)
        assert a.dim() == 0 and b.dim() == 0
        torch.testing.assert_close(a, b)
        assert_scalar_close(a, contrast_ref(x.double(), 100))

    def test_averaged_over_the_batch(self):
        (x,), _ = crd_scores(12)
        once = contrast_loss(x, 50)
        twice = contrast_loss(torch.cat([x, x]), 50)
        assert_scalar_close(twice, once.double(), rtol=1e-5)


# ============================================================================ ReviewKD hcl (Chen et al., CVPR 2021)
class TestHCLLoss:
    def test_h1_worked_by_hand(self):
        # 1x1: plain mse (3 - 1)^2 = 4
        fs, ft = torch.full((1, 1, 1, 1), 3.0), torch.full((1, 1, 1, 1), 1.0)
        assert_scalar_close(hcl_loss([fs], [ft]), 4.0)

    def test_h2_worked_by_hand(self):
        # fs = [[1, 2], [3, 4]], ft = 0: mse = (1 + 4 + 9 + 16) / 4 = 7.5; 1x1 pool 2.5 -> 6.25
        # (7.5 + 1/2 * 6.25) / 1.5 = 10.625 / 1.5 = 7.08333...
        fs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        assert_scalar_close(hcl_loss([fs], [torch.zeros_like(fs)]), 10.625 / 1.5)

    def test_h4_worked_by_hand(self):
        # fs = 0..15 in a 4x4, ft = 0: mse = sum k^2 / 16 = 1240 / 16 = 77.5
        # 2x2 pool: block means 2.5, 4.5, 10.5, 12.5 -> mse (6.25 + 20.25 + 110.25 + 156.25) / 4 = 73.25
        # 1x1 pool: 7.5 -> 56.25
        # (77.5 + 73.25 / 2 + 56.25 / 4) / 1.75 = 128.1875 / 1.75 = 73.25
        fs = torch.arange(16.0).reshape(1, 1, 4, 4)
        assert_scalar_close(hcl_loss([fs], [torch.zeros_like(fs)]), 73.25)

    def test_h8_worked_by_hand(self):
        # a single non-zero element 8 in an 8x8 (teacher 0): mse = 64 / 64 = 1;
        # 4x4 pool: one cell 8/4 = 2 -> 4 / 16 = 1/4; 2x2 pool: 8/16 = 1/2 -> 1/4 / 4 = 1/16; 1x1: 8/64 = 1/8 -> 1/64
        # (1 + 1/2 * 1/4 + 1/4 * 1/16 + 1/8 * 1/64) / 1.875
        fs = torch.zeros(1, 1, 8, 8)
        fs[0, 0, 5, 2] = 8.0
        expected = (1 + 0.5 / 4 + 0.25 / 16 + 0.125 / 64) / 1.875
        assert_scalar_close(hcl_loss([fs], [torch.zeros_like(fs)]), expected)
        # the same map as teacher and the zeros as student: symmetric
        assert_scalar_close(hcl_loss([torch.zeros_like(fs)], [fs]), expected)

    @pytest.mark.parametrize("h,denominator", [(1, 1.0), (2, 1.5), (4, 1.75), (8, 1.875), (16, 1.875)])
    def test_each_size_against_the_formula(self, h, denominator):
        fs, ft = randn(3, 4, h, h, seed=h), randn(3, 4, h, h, seed=h + 1, scale=2.0)
        fs64, ft64 = fs.double(), ft.double()
        assert 1 + sum(w for _, w in HCL_POOLS[h]) == denominator
        assert_scalar_close(hcl_loss([fs], [ft]), hcl_level_ref(fs64, ft64))
        # written out once more per size, literally
        m = mse_ref
        p = pool_ref
        literal = {
            1: lambda: m(fs64, ft64),
            2: lambda: (m(fs64, ft64) + m(p(fs64, 1), p(ft64, 1)) / 2) / 1.5,
            4: lambda: (m(fs64, ft64) + m(p(fs64, 2), p(ft64, 2)) / 2 + m(p(fs64, 1), p(ft64, 1)) / 4) / 1.75,
        }.get(h, lambda: (m(fs64, ft64) + m(p(fs64, 4), p(ft64, 4)) / 2 + m(p(fs64, 2), p(ft64, 2)) / 4
                          + m(p(fs64, 1), p(ft64, 1)) / 8) / 1.875)()
        assert_scalar_close(hcl_loss([fs], [ft]), literal)

    def test_sum_over_levels(self):
        fs, ft = hcl_maps(6)
        per_level = [hcl_level_ref(a.double(), b.double()) for a, b in zip(fs, ft)]
        assert_scalar_close(hcl_loss(fs, ft), sum(per_level))
        for a, b, expected in zip(fs, ft, per_level):
            assert_scalar_close(hcl_loss([a], [b]), expected)

    def test_identical_maps_give_zero(self):
        fs, _ = hcl_maps(7)
        assert_scalar_close(hcl_loss(fs, [f.clone() for f in fs]), 0.0, atol=1e-12)


# ============================================================================ RKD (Park et al., CVPR 2019)
# Worked by hand: student points (0,0), (1,0), (0,1); teacher points (0,0), (1,0), (2,0) (collinear).
#   distances: teacher d01 = 1, d02 = 2, d12 = 1, mean over the 6 positive entries 4/3 -> 3/4, 3/2, 3/4
#              student 1, 1, sqrt2, mean (2 + sqrt2)/3 -> u, u, sqrt2 u with u = 3/(2 + sqrt2)
#   all |diffs| < 1 -> smoothL1 = 1/2 diff^2; each pair twice among 9 entries: (a^2 + b^2 + c^2) / 9 ~ 0.0717
#   angles A_ijk = e_ij . e_ik: 1 on j = k != i (both), 0 when j = i or k = i; off-diagonal (j != k, each twice):
#     i=0 student e01.e02 = 0, teacher 1            -> |diff| 1          -> 1/2
#     i=1 student (-1,0).(-1,1)/sqrt2 = 1/sqrt2, teacher (-1,0).(1,0) = -1 -> 1 + 1/sqrt2 -> 1/2 + 1/sqrt2
#     i=2 student (0,-1).(1,-1)/sqrt2 = 1/sqrt2, teacher 1 -> 1 - 1/sqrt2 -> (1 - 1/sqrt2)^2 / 2
#   sum = 1/2 + 1/2 + 1/sqrt2 + (3/2 - sqrt2)/2 = 7/4; angle loss = 2 * 7/4 / 27 = 7/54
RKD_STUDENT = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
RKD_TEACHER = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
_U = 3 / (2 + math.sqrt(2))
HAND_RKD_DIST = ((_U - 0.75) ** 2 + (_U - 1.5) ** 2 + (math.sqrt(2) * _U - 0.75) ** 2) / 9
HAND_RKD_ANGLE = 7 / 54


class TestRKDLoss:
    def test_hand_values(self):
        assert HAND_RKD_DIST == pytest.approx(0.07169914110089359, rel=1e-12)
        assert 2 * (0.5 + 0.5 + 1 / math.sqrt(2) + (1 - 1 / math.sqrt(2)) ** 2 / 2) / 27 == pytest.approx(7 / 54)

    def test_worked_by_hand(self):
        assert_scalar_close(rkd_loss(RKD_STUDENT, RKD_TEACHER, 1.0, 0.0), HAND_RKD_DIST)
        assert_scalar_close(rkd_loss(RKD_STUDENT, RKD_TEACHER, 0.0, 1.0), HAND_RKD_ANGLE)
        assert_scalar_close(rkd_loss(RKD_STUDENT, RKD_TEACHER), 25 * HAND_RKD_DIST + 50 * HAND_RKD_ANGLE)
        assert 25 * HAND_RKD_DIST + 50 * HAND_RKD_ANGLE == pytest.approx(8.27396000900382, rel=1e-12)

    def test_invariant_to_scale_translation_and_width(self):
        # distances normalised by their mean and unit-vector angles: a scaled, shifted copy of the student
        # embedded in more dimensions has the same relations -> 0
        s = randn(5, 4, seed=0)
        t = torch.cat([3 * s + 1.5, torch.full((5, 2), 1.5)], dim=1)
        assert_scalar_close(rkd_loss(s, t), 0.0, atol=1e-5)

    def test_duplicate_points_count_with_the_clamped_distance(self):
        # integer points (exact in float32), the first two equal: their squared distance 0 is clamped to 1e-12,
        # so d_01 = sqrt(1e-12) = 1e-6 > 0 and it counts in the mean (only the diagonal is set to 0).
        # student positive distances: 1e-6, 5, 1, 5, 1, sqrt20, each twice -> mean (2e-6 + 2 (12 + sqrt20)) / 12
        s = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
        t = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
        d = rkd_distances_ref(s.double())
        mean = (2e-6 + 2 * (12 + math.sqrt(20))) / 12
        assert d[0, 2].item() == pytest.approx(5 / mean, rel=1e-12)
        assert d[0, 1].item() == pytest.approx(1e-6 / mean, rel=1e-9)
        assert_scalar_close(rkd_loss(s, t, 1.0, 0.0),
                            smooth_l1_ref(d, rkd_distances_ref(t.double())))
        # the equal pair's difference vector is 0, so its unit vector and every angle with it are 0
        a = rkd_angles_ref(s.double())
        assert a[0, 1].abs().max().item() == 0.0
        assert_scalar_close(rkd_loss(s, t, 0.0, 1.0), smooth_l1_ref(a, rkd_angles_ref(t.double())))

    def test_large_differences_use_the_linear_branch(self):
        # 1-D points: far (0, 1, 10): d = 1, 10, 9, mean of the 6 off-diagonal entries 20/3 -> .15, 1.5, 1.35
        #             near (0, 9, 10): d = 9, 10, 1                                   -> 1.35, 1.5, .15
        # diffs -1.2, 0, +1.2 (each twice): smooth L1 beyond |x| = 1 is |x| - 1/2 = 0.7 -> 4 * 0.7 / 9
        # angles: the same orderings give the same +-1 unit vectors -> angle term 0
        far = torch.tensor([[0.0], [1.0], [10.0]])
        near = torch.tensor([[0.0], [9.0], [10.0]])
        assert_scalar_close(rkd_loss(far, near, 1.0, 0.0), 4 * 0.7 / 9)
        assert_scalar_close(rkd_loss(far, near, 0.0, 1.0), 0.0, atol=1e-7)
        assert_scalar_close(rkd_loss(far, near), 25 * 4 * 0.7 / 9)


# ============================================================================ SP (Tung & Mori, ICCV 2019)
class TestSPLoss:
    def test_worked_by_hand(self):
        # b = 2. student rows (1, 0), (0, 1): G = I, rows already unit.
        # teacher rows (1, 0), (1, 0): G = all ones, rows -> (1/sqrt2, 1/sqrt2)
        # ||G_t - G_s||^2 = 2 (1/sqrt2 - 1)^2 + 2 (1/2) = 4 - 2 sqrt2; / b^2 -> 1 - sqrt2 / 2 = 0.29289...
        fs = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1)
        ft = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 1, 1, 2)  # other channel/spatial layout
        expected = 1 - math.sqrt(2) / 2
        assert_scalar_close(sp_loss([fs], [ft]), expected)
        # a sum over pairs
        assert_scalar_close(sp_loss([fs, fs], [ft, ft]), 2 * expected)

    def test_different_channel_and_spatial_sizes(self):
        fs, ft = sp_maps(9)
        assert_scalar_close(sp_loss(fs, ft), sp_ref([f.double() for f in fs], [f.double() for f in ft]))
        for a, b in zip(fs, ft):
            assert_scalar_close(sp_loss([a], [b]), sp_ref([a.double()], [b.double()]))

    def test_invariant_to_a_global_scale(self):
        # G scales by a^2 and its rows are normalised
        fs, ft = sp_maps(10)
        assert_scalar_close(sp_loss([5 * f for f in fs], ft), sp_ref([f.double() for f in fs], [f.double() for f in ft]))

    def test_identical_maps_give_zero(self):
        fs, _ = sp_maps(11)
        assert_scalar_close(sp_loss(fs, [f.clone() for f in fs]), 0.0, atol=1e-10)


# ============================================================================ PKT (Passalis & Tefas, ECCV 2018)
class TestPKTLoss:
    def test_worked_by_hand(self):
        # student rows (1, 0), (0, 1) -> x / (1 + eps) = s e_k, s = 1/(1 + eps);
        #   S = [[(s^2 + 1)/2, 1/2], [1/2, (s^2 + 1)/2]] -> P_s rows ((s^2 + 1)/(s^2 + 2), 1/(s^2 + 2)) ~ (2/3, 1/3)
        # teacher rows (1, 0), (1, 0): S = all (s^2 + 1)/2 -> P_t = 1/2 everywhere
        # mean over the 4 entries: (1/4) [ln((1/2 + eps)/(p1 + eps)) + ln((1/2 + eps)/(p2 + eps))] ~ ln(9/8)/4
        eps = 1e-7
        s = 1 / (1 + eps)
        p1, p2 = (s * s + 1) / (s * s + 2), 1 / (s * s + 2)
        expected = 0.25 * (math.log((0.5 + eps) / (p1 + eps)) + math.log((0.5 + eps) / (p2 + eps)))
        assert expected == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)
        student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        assert_scalar_close(pkt_loss(student, teacher), expected)
        # the norm is divided out: scaling the rows changes (almost) nothing
        assert_scalar_close(pkt_loss(3 * student, 2 * teacher), expected, rtol=1e-5)

    def test_eps_argument(self):
        s, t = randn(4, 5, seed=0), randn(4, 3, seed=1)
        for eps in (1e-7, 0.1):
            assert_scalar_close(pkt_loss(s, t, eps=eps), pkt_ref(s.double(), t.double(), eps=eps))
        assert not math.isclose(pkt_loss(s, t, eps=0.1).item(), pkt_loss(s, t).item(), rel_tol=1e-3)

    def test_zero_feature_row_is_finite(self):
        s, t = randn(4, 6, seed=2), randn(4, 5, seed=3)
        s[1] = 0.0
        got = pkt_loss(s, t)
        assert torch.isfinite(got)
        assert_scalar_close(got, pkt_ref(s.double(), t.double()))

    def test_mean_over_all_entries(self):
        # N^2 entries: a per-row sum (batchmean) would be N times larger
        s, t = randn(5, 6, seed=4), randn(5, 7, seed=5)
        p_s, p_t = pkt_prob_ref(s.double(), 1e-7), pkt_prob_ref(t.double(), 1e-7)
        terms = p_t * torch.log((p_t + 1e-7) / (p_s + 1e-7))
        assert_scalar_close(pkt_loss(s, t), terms.sum() / 25)

    def test_identical_features_give_zero(self):
        s = randn(4, 6, seed=6)
        assert_scalar_close(pkt_loss(s, s.clone()), 0.0, atol=1e-8)

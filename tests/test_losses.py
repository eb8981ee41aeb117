"""The pure loss functions of every method, checked against values computed independently here.

Reference values are written out with plain torch ops (exp / log / sum) or worked by hand; the function
under test is never used to produce its own expected value. README's "Methods" section states each loss.
"""
from __future__ import annotations

import math

import pytest
import torch

from kd.methods.at import at_loss
from kd.methods.byot import byot_loss, byot_loss_terms
from kd.methods.common import kd_loss
from kd.methods.dml import dml_loss
from kd.methods.fitnets import Regressor, hint_loss


# ----------------------------------------------------------------------------- independent references
def softmax_ref(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    e = torch.exp(z / temperature)
    return e / e.sum(dim=1, keepdim=True)


def kl_batchmean_ref(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over classes, averaged over the batch."""
    return (p * (torch.log(p) - torch.log(q))).sum() / p.shape[0]


def kd_ref(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return temperature ** 2 * kl_batchmean_ref(softmax_ref(teacher, temperature), softmax_ref(student, temperature))


def ce_ref(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_probs = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    return -log_probs[torch.arange(len(y)), y].mean()


def attention_ref(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    v = (f.abs() ** p).mean(dim=1).reshape(f.shape[0], -1)
    return v / torch.sqrt((v * v).sum(dim=1, keepdim=True))


def avg_pool_ref(f: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool by an integer factor, written with reshape + mean (no F.adaptive_avg_pool2d)."""
    n, c, h, w = f.shape
    return f.reshape(n, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


# A 2-class case worked by hand: teacher logits (2 ln 3, 0) at T=2 give p_t = (3/4, 1/4); student
# logits (0, 0) give p_s = (1/2, 1/2).  KL = 3/4 ln(3/2) + 1/4 ln(1/2); times T^2 = 4.
HAND_STUDENT = torch.tensor([[0.0, 0.0]])
HAND_TEACHER = torch.tensor([[2 * math.log(3.0), 0.0]])
HAND_T = 2.0
HAND_VALUE = 4.0 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))


# ----------------------------------------------------------------------------- KD (Hinton)
class TestKDLoss:
    def test_identical_logits_give_zero(self):
        torch.manual_seed(0)
        z = torch.randn(5, 7)
        for t in (1.0, 4.0):
            assert kd_loss(z, z.clone(), t).item() == pytest.approx(0.0, abs=1e-6)

    def test_two_class_worked_by_hand_with_t_squared(self):
        value = kd_loss(HAND_STUDENT, HAND_TEACHER, HAND_T)
        assert value.item() == pytest.approx(HAND_VALUE, rel=1e-5)
        assert HAND_VALUE == pytest.approx(0.5232481437645479, rel=1e-12)  # the number itself, by hand

    def test_three_class_worked_by_hand(self):
        # T=1, teacher logits (ln 2, 0, 0) -> p_t = (1/2, 1/4, 1/4); student uniform (1/3 each).
        # KL = 1/2 ln(3/2) + 2 * 1/4 ln(3/4)
        student = torch.zeros(1, 3)
        teacher = torch.tensor([[math.log(2.0), 0.0, 0.0]])
        expected = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
        assert kd_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-5)
        # same distributions at T=3 need logits scaled by 3, and the loss gains the factor T^2 = 9
        assert kd_loss(student, 3 * teacher, 3.0).item() == pytest.approx(9 * expected, rel=1e-5)

    def test_matches_explicit_formula_random(self):
        torch.manual_seed(1)
        s, t = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
        for temp in (1.0, 2.5, 4.0):
            assert kd_loss(s, t, temp).item() == pytest.approx(kd_ref(s, t, temp).item(), rel=1e-5)

    def test_batchmean_averages_over_batch(self):
        # one row with zero loss + one row with the hand value -> half the hand value (batchmean, not sum)
        student = torch.cat([HAND_TEACHER, HAND_STUDENT])
        teacher = torch.cat([HAND_TEACHER, HAND_TEACHER])
        assert kd_loss(student, teacher, HAND_T).item() == pytest.approx(HAND_VALUE / 2, rel=1e-5)
        # repeating the same row leaves the value unchanged (mean over batch, not over batch*classes)
        rep = kd_loss(HAND_STUDENT.repeat(4, 1), HAND_TEACHER.repeat(4, 1), HAND_T)
        assert rep.item() == pytest.approx(HAND_VALUE, rel=1e-5)

    def test_no_gradient_reaches_teacher(self):
        torch.manual_seed(2)
        s = torch.randn(4, 3, requires_grad=True)
        t = torch.randn(4, 3, requires_grad=True)
        kd_loss(s, t, 4.0).backward()
        assert t.grad is None
        assert s.grad is not None and s.grad.abs().sum() > 0

    def test_student_gradient_matches_closed_form(self):
        # d/dz_s of T^2 KL(p_t || softmax(z_s/T)) batchmean = T (p_s - p_t) / N
        torch.manual_seed(3)
        s = torch.randn(4, 3, requires_grad=True)
        t = torch.randn(4, 3)
        temp = 4.0
        kd_loss(s, t, temp).backward()
        expected = temp * (softmax_ref(s.detach(), temp) - softmax_ref(t, temp)) / 4
        torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- AT
class TestATLoss:
    def test_identical_maps_give_zero(self):
        torch.manual_seed(0)
        feats = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
        assert at_loss(feats, [f.clone() for f in feats]).item() == pytest.approx(0.0, abs=1e-7)

    def test_channel_count_does_not_matter_for_equal_attention(self):
        # teacher = student's channels repeated 4x: same mean over channels -> same attention -> 0
        torch.manual_seed(0)
        fs = torch.randn(2, 64, 4, 4)
        ft = fs.repeat(1, 4, 1, 1)  # 256 channels
        assert at_loss([fs], [ft]).item() == pytest.approx(0.0, abs=1e-7)

    def test_worked_by_hand(self):
        # student: 2 channels, 1x2 positions; channel0 = (1, 2), channel1 = (1, 0)
        #   mean_c f^2 = ((1+1)/2, (4+0)/2) = (1, 2) -> a_s = (1, 2)/sqrt(5)
        # teacher: 1 channel, (2, 0): f^2 = (4, 0) -> a_t = (1, 0)
        # mean((a_s - a_t)^2) = ((1/sqrt5 - 1)^2 + 4/5) / 2 = 1 - 1/sqrt(5)
        fs = torch.tensor([[[[1.0, 2.0]], [[1.0, 0.0]]]])
        ft = torch.tensor([[[[2.0, 0.0]]]])
        expected = 1 - 1 / math.sqrt(5)
        assert at_loss([fs], [ft]).item() == pytest.approx(expected, rel=1e-6)
        # a sum over layers: two copies of the pair give twice the value
        assert at_loss([fs, fs], [ft, ft]).item() == pytest.approx(2 * expected, rel=1e-6)
        # sign does not matter (|f|^p)
        assert at_loss([-fs], [ft]).item() == pytest.approx(expected, rel=1e-6)

    def test_p_one_worked_by_hand(self):
        # p=1, one channel: student |f| = (3, 4) -> a_s = (3, 4)/5; teacher |f| = (4, 3) -> a_t = (4, 3)/5
        # mean((a_s - a_t)^2) = ((1/5)^2 + (1/5)^2) / 2 = 1/25
        fs = torch.tensor([[[[3.0, 4.0]]]])
        ft = torch.tensor([[[[4.0, -3.0]]]])
        assert at_loss([fs], [ft], p=1.0).item() == pytest.approx(1 / 25, rel=1e-6)

    def test_different_channel_counts_match_formula(self):
        torch.manual_seed(1)
        fs = [torch.randn(3, 64, 4, 4), torch.randn(3, 128, 2, 2)]
        ft = [torch.randn(3, 256, 4, 4), torch.randn(3, 512, 2, 2)]
        expected = sum(((attention_ref(a) - attention_ref(b)) ** 2).mean() for a, b in zip(fs, ft))
        assert at_loss(fs, ft).item() == pytest.approx(expected.item(), rel=1e-5)

    def test_mean_is_over_batch_and_positions(self):
        # duplicating the batch must leave the value unchanged
        torch.manual_seed(2)
        fs, ft = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
        once = at_loss([fs], [ft]).item()
        twice = at_loss([torch.cat([fs, fs])], [torch.cat([ft, ft])]).item()
        assert twice == pytest.approx(once, rel=1e-6)
        expected = ((attention_ref(fs) - attention_ref(ft)) ** 2).sum() / (2 * 9)
        assert once == pytest.approx(expected.item(), rel=1e-5)

    @pytest.mark.parametrize("student_larger", [False, True])
    def test_different_spatial_sizes_pool_the_larger_map(self, student_larger):
        torch.manual_seed(3)
        small, large = torch.randn(2, 64, 4, 4), torch.randn(2, 256, 8, 8)
        fs, ft = (large, small) if student_larger else (small, large)
        pooled = avg_pool_ref(large, 2)
        a_large, a_small = attention_ref(pooled), attention_ref(small)
        expected = ((a_large - a_small) ** 2).mean()
        assert at_loss([fs], [ft]).item() == pytest.approx(expected.item(), rel=1e-5)
        # pooling happens BEFORE a(.): pooling the attention map instead gives a different number
        wrong = attention_ref(large).reshape(2, 1, 8, 8)
        wrong = avg_pool_ref(wrong, 2).reshape(2, -1)
        wrong = wrong / wrong.norm(dim=1, keepdim=True)
        assert not math.isclose(((wrong - a_small) ** 2).mean().item(), expected.item(), rel_tol=1e-3)

    def test_no_gradient_reaches_teacher(self):
        torch.manual_seed(4)
        fs = [torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 2, 2, requires_grad=True)]
        ft = [torch.randn(2, 32, 4, 4, requires_grad=True), torch.randn(2, 32, 4, 4, requires_grad=True)]
        at_loss(fs, ft).backward()
        assert all(f.grad is None for f in ft)
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)


# ----------------------------------------------------------------------------- FitNets
class TestFitNets:
    def test_hint_loss_worked_by_hand(self):
        a = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
        b = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
        assert hint_loss(a, b).item() == pytest.approx(13 / 3, rel=1e-6)  # (0 + 4 + 9) / 3

    def test_hint_loss_is_mean_squared_error(self):
        torch.manual_seed(0)
        a, b = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
        expected = ((a - b) ** 2).sum() / a.numel()
        assert hint_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-5)
        assert hint_loss(a, a.clone()).item() == 0.0

    def test_hint_loss_no_gradient_to_teacher(self):
        torch.manual_seed(1)
        a = torch.randn(2, 4, 2, 2, requires_grad=True)
        b = torch.randn(2, 4, 2, 2, requires_grad=True)
        hint_loss(a, b).backward()
        assert b.grad is None
        torch.testing.assert_close(a.grad, 2 * (a.detach() - b.detach()) / a.numel())

    @pytest.mark.parametrize("in_size,out_size", [(8, 8), (8, 4), (4, 8), (4, 2)])
    def test_regressor_maps_channels_and_size(self, in_size, out_size):
        torch.manual_seed(2)
        reg = Regressor(128, 512)
        x = torch.randn(2, 128, in_size, in_size)
        y = reg(x, torch.Size([out_size, out_size]))
        assert y.shape == (2, 512, out_size, out_size)
        assert (y >= 0).all()  # ends in ReLU

    def test_regressor_is_1x1_conv_bn_relu(self):
        reg = Regressor(64, 256)
        assert reg.conv.kernel_size == (1, 1)
        assert reg.conv.in_channels == 64 and reg.conv.out_channels == 256
        assert isinstance(reg.bn, torch.nn.BatchNorm2d) and reg.bn.num_features == 256


# ----------------------------------------------------------------------------- DML
class TestDMLLoss:
    def test_worked_by_hand(self):
        assert dml_loss(HAND_STUDENT, HAND_TEACHER, HAND_T).item() == pytest.approx(HAND_VALUE, rel=1e-5)
        # default T=1: KL((3/4,1/4) || (1/2,1/2)) with teacher logits (ln 3, 0)
        peer = torch.tensor([[math.log(3.0), 0.0]])
        expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
        assert dml_loss(HAND_STUDENT, peer).item() == pytest.approx(expected, rel=1e-5)

    def test_direction_is_kl_peer_to_self(self):
        # KL is asymmetric: the loss of z against its peer is KL(softmax(peer) || softmax(z))
        torch.manual_seed(0)
        z, peer = torch.randn(5, 4) * 2, torch.randn(5, 4) * 2
        for temp in (1.0, 3.0):
            forward = kd_ref(z, peer, temp).item()
            backward = kd_ref(peer, z, temp).item()
            assert not math.isclose(forward, backward, rel_tol=1e-3)
            assert dml_loss(z, peer, temp).item() == pytest.approx(forward, rel=1e-5)
        assert dml_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)

    def test_peer_target_gets_no_gradient(self):
        torch.manual_seed(1)
        z = torch.randn(4, 3, requires_grad=True)
        peer = torch.randn(4, 3, requires_grad=True)
        dml_loss(z, peer).backward()
        assert peer.grad is None
        torch.testing.assert_close(z.grad, (softmax_ref(z.detach()) - softmax_ref(peer.detach())) / 4,
                                   rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- BYOT
def byot_ref(exit_logits, exit_feats, targets, alpha, temperature, feat_weight):
    """The formula README states, written out term by term."""
    *shallow, deepest = exit_logits
    *shallow_f, deepest_f = exit_feats
    ce = sum(ce_ref(z, targets) for z in exit_logits)
    kd = sum(kd_ref(z, deepest, temperature) for z in shallow)
    feat = 0.0
    for f in shallow_f:
        mask = ((f > 0) | (deepest_f > 0)).float()
        feat = feat + (((f - deepest_f) ** 2) * mask).sum()
    return {"loss_ce": (1 - alpha) * ce, "loss_kd": alpha * kd, "loss_feat": feat_weight * feat}


def byot_case(seed: int = 0, requires_grad: bool = False):
    torch.manual_seed(seed)
    logits = [(torch.randn(3, 4) * 2).requires_grad_(requires_grad) for _ in range(4)]
    feats = [torch.randn(3, 5).requires_grad_(requires_grad) for _ in range(4)]
    targets = torch.tensor([0, 3, 1])
    return logits, feats, targets


class TestBYOTLoss:
    def test_feature_term_worked_by_hand(self):
        # F_C = [[-2, 0, 0], [1, 0, 2]]
        # F_1 = [[-1, .5, 0], [3, 0, 0]]: kept elements (F_1>0 or F_C>0): (.5-0)^2=.25, (3-1)^2=4, (0-2)^2=4
        #       (element [0,0] is masked out though (−1+2)^2 = 1) -> 8.25
        # F_2 = F_C -> 0
        # F_3 = 0  -> kept where F_C>0: (0-1)^2 + (0-2)^2 = 5
        # SUM (not mean) over elements and batch: 8.25 + 0 + 5 = 13.25
        fc = torch.tensor([[-2.0, 0.0, 0.0], [1.0, 0.0, 2.0]])
        f1 = torch.tensor([[-1.0, 0.5, 0.0], [3.0, 0.0, 0.0]])
        feats = [f1, fc.clone(), torch.zeros(2, 3), fc]
        logits = [torch.zeros(2, 2)] * 4  # uniform everywhere: KD term 0, CE = ln 2 per exit
        targets = torch.tensor([0, 1])
        terms = byot_loss_terms(logits, feats, targets, alpha=0.25, temperature=3.0, feat_weight=1.0)
        assert terms["loss_feat"].item() == pytest.approx(13.25, rel=1e-6)
        assert terms["loss_kd"].item() == pytest.approx(0.0, abs=1e-7)
        assert terms["loss_ce"].item() == pytest.approx(0.75 * 4 * math.log(2.0), rel=1e-6)
        total = byot_loss(logits, feats, targets, alpha=0.25, temperature=3.0, feat_weight=1e-2)
        assert total.item() == pytest.approx(0.75 * 4 * math.log(2.0) + 1e-2 * 13.25, rel=1e-6)

    def test_kd_term_worked_by_hand(self):
        # deepest (2 ln 3, 0) at T=2 teaches each of 3 uniform shallow exits: alpha * 3 * HAND_VALUE
        z_c = HAND_TEACHER
        logits = [HAND_STUDENT, HAND_STUDENT, HAND_STUDENT, z_c]
        feats = [torch.zeros(1, 2)] * 4
        terms = byot_loss_terms(logits, feats, torch.tensor([1]), alpha=0.5, temperature=2.0, feat_weight=1.0)
        assert terms["loss_kd"].item() == pytest.approx(0.5 * 3 * HAND_VALUE, rel=1e-5)
        assert terms["loss_feat"].item() == 0.0
        # CE (no temperature): 3 uniform shallow exits give ln 2 each; the deepest exit has
        # softmax(2 ln 3, 0) = (9/10, 1/10) and target 1, so CE = ln 10
        assert terms["loss_ce"].item() == pytest.approx(0.5 * (3 * math.log(2.0) + math.log(10.0)), rel=1e-5)

    @pytest.mark.parametrize("alpha,temperature,feat_weight", [(0.1, 3.0, 1e-6), (0.3, 2.0, 0.5), (1.0, 1.0, 1.0)])
    def test_full_formula_random(self, alpha, temperature, feat_weight):
        logits, feats, targets = byot_case(seed=5)
        expected = byot_ref(logits, feats, targets, alpha, temperature, feat_weight)
        terms = byot_loss_terms(logits, feats, targets, alpha, temperature, feat_weight)
        assert set(terms) == {"loss_ce", "loss_kd", "loss_feat"}
        for key in terms:
            assert terms[key].item() == pytest.approx(expected[key].item(), rel=1e-5, abs=1e-7), key
        total = byot_loss(logits, feats, targets, alpha, temperature, feat_weight)
        assert total.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)
        assert total.item() == pytest.approx(sum(e.item() for e in expected.values()), rel=1e-5)

    def test_defaults_match_spec(self):
        logits, feats, targets = byot_case(seed=6)
        expected = sum(byot_ref(logits, feats, targets, 0.1, 3.0, 1e-6).values())
        assert byot_loss(logits, feats, targets).item() == pytest.approx(expected.item(), rel=1e-5)

    def test_deepest_logits_get_no_kd_gradient(self):
        logits, feats, targets = byot_case(seed=7, requires_grad=True)
        byot_loss_terms(logits, feats, targets)["loss_kd"].backward()
        assert logits[-1].grad is None
        assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in logits[:-1])

    def test_deepest_logits_gradient_is_only_their_own_ce(self):
        # With alpha < 1 the deepest logits DO get gradient, but only from (1 - alpha) * CE(z_C, y):
        # d/dz_C = (1 - alpha) (softmax(z_C) - onehot(y)) / N.
        alpha = 0.3
        logits, feats, targets = byot_case(seed=8, requires_grad=True)
        byot_loss(logits, feats, targets, alpha=alpha, temperature=3.0, feat_weight=1.0).backward()
        z_c = logits[-1].detach()
        onehot = torch.zeros_like(z_c)
        onehot[torch.arange(3), targets] = 1.0
        expected = (1 - alpha) * (softmax_ref(z_c) - onehot) / 3
        torch.testing.assert_close(logits[-1].grad, expected, rtol=1e-4, atol=1e-6)

    def test_deepest_logits_no_gradient_when_alpha_is_one(self):
        # alpha = 1: the CE term has weight 0, so the deepest logits receive an all-zero gradient
        logits, feats, targets = byot_case(seed=9, requires_grad=True)
        byot_loss(logits, feats, targets, alpha=1.0, temperature=3.0, feat_weight=1.0).backward()
        assert logits[-1].grad is None or torch.count_nonzero(logits[-1].grad) == 0
        assert all(torch.count_nonzero(z.grad) > 0 for z in logits[:-1])

    def test_deepest_features_get_no_gradient_and_shallow_match_closed_form(self):
        w = 0.5
        logits, feats, targets = byot_case(seed=10, requires_grad=True)
        byot_loss(logits, feats, targets, alpha=0.1, temperature=3.0, feat_weight=w).backward()
        assert feats[-1].grad is None
        f_c = feats[-1].detach()
        for f in feats[:-1]:
            mask = ((f.detach() > 0) | (f_c > 0)).float()
            torch.testing.assert_close(f.grad, 2 * w * (f.detach() - f_c) * mask)

"""OFA-KD (Hao et al., NeurIPS 2023): its pure loss against values worked by hand and against a float64 formula
written out here with per-row loops, and its projectors' shapes on a 4-stage ResNet18, a 3-stage CIFAR-zoo
ResNet and a tiny timm ViT (plus a tiny torchvision ViT), and the Distiller's choices of stages and refusals.

The formula follows the authors' ofa_loss in distillers/ofa.py of github.com/Hao840/OFAKD. No helper from kd/
computes an expected value. The loss computes in float32 (`.float()`, as every loss in kd/methods/), also for
float64 inputs, so the float64 references are compared at float32 precision (rtol 1e-5).
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import final
from kd.methods import METHODS
from kd.methods.ofa import OFA, ofa_loss
from kd.methods.ofa_projectors import PatchMerging, SepConv, TokenProjector, build_projector, merge_count
from models import FeatureTap, ModelError, build_model, model_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

Tensor = torch.Tensor
LN2 = math.log(2)
NUM_CLASSES, BATCH = 5, 2


# ============================================================================ independent float64 reference
def softmax_row(z: Tensor) -> Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def ofa_ref(student: Tensor, teacher: Tensor, targets: Tensor, eps: float, temperature: float = 1.0) -> Tensor:
    """mean over rows of -sum_k w_k log p_s,k with w_k = (p_t,k + 1)^eps - 1 for the target and p_t,k^eps for
    every other class, p = softmax(z / T) (the two cases of (p_t + y)^eps - y written out)."""
    total = torch.zeros((), dtype=torch.float64)
    for z_s, z_t, y in zip(student, teacher, targets):
        p_s, p_t = softmax_row(z_s / temperature), softmax_row(z_t / temperature)
        for k in range(len(z_s)):
            weight = (p_t[k] + 1) ** eps - 1 if k == y else p_t[k] ** eps
            total = total - weight * torch.log(p_s[k])
    return total / len(student)


def assert_float32_close(got: Tensor, expected, rtol: float = 1e-5) -> None:
    """A 0-dim float32 result, equal to the float64 `expected` at float32 precision."""
    assert got.dim() == 0 and got.dtype == torch.float32, (got.shape, got.dtype)
    torch.testing.assert_close(got.detach().double(), torch.as_tensor(expected, dtype=torch.float64),
                               rtol=rtol, atol=0.0)


def randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def logits_of(*probs: float) -> Tensor:
    """Logits whose softmax is `probs` (their logs), as one row."""
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float64)


# Two rows whose softmaxes are exact: p_s = (1/2, 1/4, 1/4), p_t = (1/4, 1/2, 1/4) in both
STUDENT = torch.cat([logits_of(0.5, 0.25, 0.25)] * 2)
TEACHER = torch.cat([logits_of(0.25, 0.5, 0.25)] * 2)


# ============================================================================ the loss
class TestOFALoss:
    def test_eps_one_is_the_cross_entropy_with_the_teachers_soft_target(self):
        # eps = 1: the weights are (p_t + y) - y = p_t whatever the target, so the loss is
        # -(1/4 ln 1/2 + 1/2 ln 1/4 + 1/4 ln 1/4) = (1/4 + 1 + 1/2) ln 2 = 1.75 ln 2 = 1.21301 per row
        for targets in (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])):
            assert_float32_close(ofa_loss(STUDENT[:1], TEACHER[:1], targets, eps=1.0), 1.75 * LN2)
        assert 1.75 * LN2 == pytest.approx(1.213008, abs=1e-6)

    def test_eps_one_matches_soft_cross_entropy_on_random_logits(self):
        student, teacher, targets = randn(6, NUM_CLASSES, seed=0, scale=3), randn(6, NUM_CLASSES, seed=1, scale=3), \
            torch.tensor([0, 1, 2, 3, 4, 0])
        soft_ce = sum(-(softmax_row(t) * torch.log(softmax_row(s))).sum() for s, t in zip(student, teacher)) / 6
        assert_float32_close(ofa_loss(student, teacher, targets, eps=1.0), soft_ce)

    def test_eps_two_by_hand(self):
        # row 1, target 0: weights ((1/4 + 1)^2 - 1, (1/2)^2, (1/4)^2) = (0.5625, 0.25, 0.0625), so
        #   -(0.5625 ln 1/2 + 0.25 ln 1/4 + 0.0625 ln 1/4) = (0.5625 + 0.5 + 0.125) ln 2 = 1.1875 ln 2
        # row 2, target 1: weights ((1/4)^2, (1/2 + 1)^2 - 1, (1/4)^2) = (0.0625, 1.25, 0.0625), so
        #   -(0.0625 ln 1/2 + 1.25 ln 1/4 + 0.0625 ln 1/4) = (0.0625 + 2.5 + 0.125) ln 2 = 2.6875 ln 2
        # their mean: 1.9375 ln 2 = 1.34297
        assert_float32_close(ofa_loss(STUDENT[:1], TEACHER[:1], torch.tensor([0]), eps=2.0), 1.1875 * LN2)
        assert_float32_close(ofa_loss(STUDENT[1:], TEACHER[1:], torch.tensor([1]), eps=2.0), 2.6875 * LN2)
        assert_float32_close(ofa_loss(STUDENT, TEACHER, torch.tensor([0, 1]), eps=2.0), 1.9375 * LN2)
        assert 1.9375 * LN2 == pytest.approx(1.342973, abs=1e-6)

    @pytest.mark.parametrize("eps", [0.5, 1.0, 1.5, 2.0])
    def test_matches_the_float64_formula(self, eps):
        student, teacher = randn(8, NUM_CLASSES, seed=2, scale=2), randn(8, NUM_CLASSES, seed=3, scale=4)
        targets = torch.tensor([0, 1, 2, 3, 4, 4, 2, 0])
        assert_float32_close(ofa_loss(student, teacher, targets, eps), ofa_ref(student, teacher, targets, eps))

    def test_temperature_divides_both_logits(self):
        # the hand rows' logits doubled, at T = 2, give the same softmaxes: the same 1.1875 ln 2 at eps = 2
        assert_float32_close(ofa_loss(2 * STUDENT[:1], 2 * TEACHER[:1], torch.tensor([0]), eps=2.0, temperature=2.0),
                             1.1875 * LN2)
        student, teacher = randn(6, NUM_CLASSES, seed=4, scale=5), randn(6, NUM_CLASSES, seed=5, scale=5)
        targets = torch.tensor([1, 2, 3, 4, 0, 1])
        for temperature in (0.5, 4.0):
            assert_float32_close(ofa_loss(student, teacher, targets, 1.5, temperature),
                                 ofa_ref(student, teacher, targets, 1.5, temperature))
        # no T^2 factor (unlike KD): at T = 4 the loss is the reference's, not 16 times it
        assert ofa_loss(student, teacher, targets, 1.0, 4.0).item() < 2 * math.log(NUM_CLASSES)

    def test_gradient_reaches_only_the_student(self):
        student = randn(4, NUM_CLASSES, seed=6).requires_grad_()
        teacher = randn(4, NUM_CLASSES, seed=7).requires_grad_()
        targets = torch.tensor([0, 2, 4, 1])
        ofa_loss(student, teacher, targets, eps=2.0).backward()
        assert teacher.grad is None
        # d/dz_s of -sum_k w_k log p_s,k is (sum_k w_k) p_s - w per row, averaged over the batch
        expected = torch.zeros_like(student)
        for i, (z_s, z_t, y) in enumerate(zip(student.detach(), teacher.detach(), targets)):
            p_s, p_t = softmax_row(z_s), softmax_row(z_t)
            w = p_t ** 2
            w[y] = (p_t[y] + 1) ** 2 - 1
            expected[i] = (w.sum() * p_s - w) / 4
        torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


# ============================================================================ the projectors
def make(name: str, size: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model_spec({"model": name, "weights": None}, size, "auto"), 3)


def stage_features(model: nn.Module, modules: list[str], size: int = 32) -> dict[str, Tensor]:
    tap = FeatureTap(model, modules)
    try:
        model(torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)))
        return dict(tap.outputs)
    finally:
        tap.remove()


def ofa(student: nn.Module, teacher: nn.Module, **settings) -> OFA:
    return OFA(student, teacher, **{**final.METHODS_CONFIG["OFA"], **settings})


def sepconvs(projector: nn.Module) -> list[SepConv]:
    return [m for m in projector.modules() if isinstance(m, SepConv)]


def test_resnet18_student_gets_one_sepconv_per_later_stage():
    student, teacher = make("resnet18"), make("timm/test_vit")  # pooled widths 512 and 64
    distiller = ofa(student, teacher)
    assert distiller.stages == [1, 2, 3, 4] and distiller.stage_modules == ["layer1", "layer2", "layer3", "layer4"]
    features = stage_features(student, distiller.stage_modules)
    assert [features[m].shape[1:] for m in distiller.stage_modules] == [(64, 32, 32), (128, 16, 16), (256, 8, 8),
                                                                     (512, 4, 4)]
    for k, module in zip(distiller.stages, distiller.stage_modules):
        projector = distiller.projectors[str(k)]
        assert len(sepconvs(projector)) == 4 - k
        assert projector(features[module]).shape == (BATCH, 3)
    # stage 1: 64 -> 128 -> 256 -> max(512, 64); the deepest: a 1x1 conv to 512
    assert [(s[0].in_channels, s[5].out_channels) for s in sepconvs(distiller.projectors["1"])] == [
        (64, 128), (128, 256), (256, 512)]
    deepest = distiller.projectors["4"][0]
    assert isinstance(deepest, nn.Conv2d) and deepest.kernel_size == (1, 1) and deepest.out_channels == 512
    distiller.close()


def test_cifar_zoo_resnet8x4_has_three_stages_and_the_teachers_wider_feature():
    student, teacher = make("cifar/resnet8x4"), make("resnet18")  # pooled widths 256 and 512
    distiller = ofa(student, teacher)
    assert distiller.stage_modules == ["layer1", "layer2", "layer3"]
    features = stage_features(student, distiller.stage_modules)
    for k, module in zip(distiller.stages, distiller.stage_modules):
        projector = distiller.projectors[str(k)]
        assert len(sepconvs(projector)) == 3 - k  # the stages after it (the authors' 4 - stage of 4)
        assert projector[-1].in_features == 512  # max(256, 512)
        assert projector(features[module]).shape == (BATCH, 3)
    distiller.close()


def test_tiny_maps_stay_one_by_one():
    # at 8 px resnet18's layer4 is 1x1 and layer1's three stride-2 blocks take 8 -> 4 -> 2 -> 1
    student = make("resnet18", size=8)
    projector = build_projector(student, make("resnet18", size=8, seed=1), 1, 3)
    assert projector(stage_features(student, ["layer1"], size=8)["layer1"]).shape == (BATCH, 3)


def test_timm_vit_student_reads_blocks_at_the_authors_fractions_of_depth():
    student, teacher = make("timm/test_vit"), make("resnet18")  # 6 blocks, width 64, 2x2 patches at 32 px
    distiller = ofa(student, teacher)
    # blocks 2, 4, 10, 12 of 12 are 1/6, 1/3, 5/6, 1 of the depth: blocks 1, 2, 5, 6 of 6
    assert distiller.stage_modules == ["blocks.0", "blocks.1", "blocks.4", "blocks.5"]
    features = stage_features(student, distiller.stage_modules)
    for k, module in zip(distiller.stages, distiller.stage_modules):
        projector = distiller.projectors[str(k)]
        assert isinstance(projector, TokenProjector) and len(projector.merges) == 0  # a 2x2 grid is not merged
        assert len(projector.blocks) == max(4 - k, 1) and projector.blocks[0].attn.num_heads == 4
        assert features[module].shape == (BATCH, 5, 64)  # the class token and 4 patch tokens
        assert projector(features[module]).shape == (BATCH, 3)
    note, = OFA.plan_notes(student, teacher)
    assert "blocks 1, 2, 5, 6 of 6" in note
    distiller.close()


def test_vit_without_a_class_token_pools_its_patch_tokens():
    student = make("timm/test_vit2")  # no class token
    projector = build_projector(student, make("resnet18"), 2, 3)
    assert not projector.class_token
    tokens = stage_features(student, ["blocks.2"])["blocks.2"]
    assert projector(tokens).shape == (BATCH, 3)


def test_torchvision_vit_merges_a_14x14_grid_to_7x7():
    student = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=2, num_heads=2,
                                                   hidden_dim=16, mlp_dim=32, num_classes=3)
    distiller = ofa(student, make("resnet18"), stages=[1, 4])
    assert distiller.stage_modules == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    projector = distiller.projectors["1"]
    assert len(projector.merges) == 1  # int(log2(14 / 7)) = 1
    assert isinstance(projector.merges[0].act, torch.nn.GELU)  # the authors' first merge always has one
    tokens = torch.randn(BATCH, 1 + 14 * 14, 16)
    assert projector.merges(tokens[:, 1:]).shape == (BATCH, 49, 16)
    assert projector(tokens).shape == (BATCH, 3)
    distiller.close()


def test_merge_counts_and_patch_merging():
    assert [merge_count(g) for g in [(14, 14), (28, 28), (56, 56), (16, 16), (15, 15), (12, 12), (2, 2), None]] == [
        1, 2, 3, 1, 0, 0, 0, 0]
    merge = PatchMerging((4, 4), 8, activation=False)
    tokens = torch.arange(BATCH * 16 * 8, dtype=torch.float32).reshape(BATCH, 16, 8)
    assert merge(tokens).shape == (BATCH, 4, 8)


def test_projectors_start_as_the_authors_init_weights():
    projector = build_projector(make("resnet18"), make("resnet18", seed=1), 2, 3)
    for m in projector.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    linear = projector[-1]  # 3 x 512 weights drawn with std 0.02 (truncated at +-2, absolute, as timm's)
    assert torch.equal(linear.bias, torch.zeros(3)) and 0.018 < linear.weight.std().item() < 0.022


# ============================================================================ the Distiller
def test_chosen_stages_only_and_nothing_saved_with_the_student():
    student, teacher = make("resnet18"), make("resnet18", seed=1)
    distiller = ofa(student, teacher, stages=[3, 1])
    assert distiller.stages == [1, 3] and sorted(distiller.projectors) == ["1", "3"]
    assert distiller.deployable_models() == {"": student}
    assert not any(key.startswith("projectors") for key in student.state_dict())
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    logits, losses = distiller.train().forward_train(images, targets)
    assert logits.shape == (4, 3) and set(losses) == {"loss_ce", "loss_kd", "loss_ofa"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.projectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    distiller.close()


def test_unservable_students_and_stages_are_refused_in_one_line():
    with pytest.raises(ModelError, match=r"stages \[4\].*it has stages 1-3 \(layer1, layer2, layer3\)"):
        ofa(make("cifar/resnet8x4"), make("resnet18"), stages=[4])
    with pytest.raises(ModelError, match="neither feature-map stages nor ViT blocks"):
        ofa(make("timm/test_mambaout"), make("resnet18"))
    narrow = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                  hidden_dim=18, mlp_dim=8, num_classes=3)
    with pytest.raises(ModelError, match="token width 18"):
        ofa(narrow, make("resnet18"))


def test_stages_rule():
    rule = METHODS["OFA"].settings["stages"]
    assert all(rule.check(v) for v in (None, [1], [1, 2, 3, 4], [4, 2]))
    assert not any(rule.check(v) for v in ([], [0], [1, 1], [1.0], "1", 2, [True], (1, 2)))

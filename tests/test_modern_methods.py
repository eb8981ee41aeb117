"""The methods of 2018-2024 (DKD, DIST, CRD, ReviewKD, RKD, SP, PKT, KD_LS, DKD_LS) as Distillers and in runs.

Their pure losses are checked in test_losses_modern.py; here: CRD's negatives, memory banks and constants,
the loss warm-ups through the Distillers, ReviewKD's pre-ReLU teacher features and fusion modules, method
names (`all`, `dkd-ls`), the validation of the new settings, an end-to-end run of all nine (the saved students
are plain ResNet18s), and a ViT teacher (the logit and pooled-feature methods work, the map methods are
refused). Tiny models and images: the module runs in under a minute on a 2-core CPU.
"""
from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import final
import run_experiment
from kd import methods
from kd.errors import UserError
from kd.experiment.config import resolve_method_names, split_method_settings
from kd.methods.common import kd_loss
from kd.methods.crd import CRD, NegativeSampler
from kd.methods.reviewkd import ReviewKD, teacher_preactivations
from models import FeatureTap, apply_stem, build_model, build_resnet, classifier_name, find_stages, model_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

NEW_METHODS = ("DKD", "DIST", "CRD", "ReviewKD", "RKD", "SP", "PKT", "KD_LS", "DKD_LS")
# 2023-2024: tests/test_newest_methods.py and test_ofa.py
NEWEST_METHODS = ("WTTM", "CTKD", "CTKD_DKD", "NormKD", "MLKD", "OFA")
ALL_METHODS = ("Baseline", "KD", "AT", "FitNets", "DML", "BYOT", *NEW_METHODS, *NEWEST_METHODS)
DEFAULT_METHODS = ["Baseline", "KD", "AT", "FitNets", "DML", "BYOT"]
STAGES = ("layer1", "layer2", "layer3", "layer4")
NUM_CLASSES, BATCH, SIZE = 3, 4, 8
TRAIN_LABELS = torch.arange(12) % 3  # a training set of 12 images, 4 per class
VIT_TEACHER = "timm/test_vit"
VIT_SIZE = 32
VIT_METHODS = ("DKD", "DIST", "CRD", "RKD", "PKT", "KD_LS")  # logits or the pooled feature only
EXTRA_MODULE_PREFIXES = ("embed", "memory", "abfs", "z_s", "z_t", "steps", "teacher", "student.")


# ----------------------------------------------------------------------------- helpers


def make_batch(seed: int = 0, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, size, size, generator=g), torch.tensor([0, 1, 2, 1])


BATCH_INDICES = torch.tensor([0, 1, 5, 4])  # positions in TRAIN_LABELS with make_batch's labels 0, 1, 2, 1


def randomize_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-default BatchNorm statistics and affine parameters, so that an eval-mode BN is no identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model


_BUILT: dict[tuple[str, int], torch.nn.Module] = {}


def make_resnet(arch: str = "ResNet18", seed: int = 0) -> torch.nn.Module:
    """A fresh copy of the ResNet built from `seed` (each built once per module: initialisation is the slow
    part), with the CIFAR stem."""
    if (arch, seed) not in _BUILT:
        rng = torch.get_rng_state()
        torch.manual_seed(seed)
        _BUILT[arch, seed] = build_resnet(arch, NUM_CLASSES, "cifar")
        torch.set_rng_state(rng)
    return copy.deepcopy(_BUILT[arch, seed])


def tiny_net(width: int, seed: int) -> torch.nn.Module:
    """A one-convolution CNN whose classifier `fc` sees the pooled feature, as in a ResNet: enough for the
    logit and pooled-feature methods, and far cheaper than a ResNet18."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(OrderedDict(
        conv=torch.nn.Conv2d(3, width, 3, padding=1), bn=torch.nn.BatchNorm2d(width), relu=torch.nn.ReLU(),
        pool=torch.nn.AdaptiveAvgPool2d(1), flatten=torch.nn.Flatten(), fc=torch.nn.Linear(width, NUM_CLASSES)))


def make_distiller(name: str, seed: int = 0, teacher: torch.nn.Module | None = None, tiny: bool = False,
                   **overrides) -> methods.Distiller:
    """The method with its METHODS_CONFIG settings (as a run of 50 epochs resolves them) on a ResNet18 student
    and (by default) a ResNet18 teacher; `tiny`: a tiny_net student (width 8) and teacher (width 12) instead."""
    method = methods.METHODS[name]
    cls = method.distiller
    student = tiny_net(8, seed) if tiny else make_resnet("ResNet18", seed)
    if cls.needs_teacher and teacher is None:
        teacher = randomize_bn(tiny_net(12, 100) if tiny else make_resnet("ResNet18", 100), 7).eval()
    torch.manual_seed(seed + 1)
    settings = method.resolve({**final.METHODS_CONFIG[name], **overrides}, 50)
    distiller = cls(student, teacher if cls.needs_teacher else None, **settings)
    distiller.attach_data(TRAIN_LABELS, seed)
    return distiller


def plain_resnet18(num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """The plain torchvision ResNet18 with the CIFAR stem, as a user rebuilds it to load a saved student."""
    return apply_stem(torchvision.models.resnet18(num_classes=num_classes), "cifar")


def capture_inputs(module: torch.nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    """A forward pre-hook that keeps a copy of every call's first input."""
    return module.register_forward_pre_hook(lambda _m, inputs: store.append(inputs[0].detach().clone()))


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ============================================================================= 1. CRD's negatives
LAYOUTS = {
    "balanced": torch.arange(30) % 3,
    "sorted": torch.tensor([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5),
    # unbalanced, interleaved, one class with a single image and one label (3) absent
    "unbalanced": torch.tensor([2, 0, 0, 4, 0, 1, 0, 0, 4, 0, 1, 0, 2, 0, 0, 4, 1, 0, 5, 0]),
    "two_classes": torch.tensor([1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_negatives_are_never_of_the_anchors_class(layout):
    labels = LAYOUTS[layout]
    sampler = NegativeSampler(labels)
    anchors = torch.arange(len(labels)).repeat(5)  # every image, several times
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 7):
        negatives = sampler.draw(anchors, k, g)
        assert negatives.shape == (len(anchors), k) and negatives.dtype == torch.int64
        assert negatives.min() >= 0 and negatives.max() < len(labels)
        clash = labels[negatives] == labels[anchors][:, None]
        assert not clash.any(), f"{layout}: anchors {anchors[clash.any(dim=1)].tolist()} got own-class negatives"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_negatives_without_replacement_up_to_the_pool_size(layout):
    labels = LAYOUTS[layout]
    sampler = NegativeSampler(labels)
    g = torch.Generator().manual_seed(1)
    for anchor in range(len(labels)):
        others = sorted((labels != labels[anchor]).nonzero().flatten().tolist())
        pool = len(others)
        for k in sorted({1, max(1, pool // 2), pool}):
            rows = sampler.draw(torch.tensor([anchor] * 4), k, g)
            for row in rows.tolist():
                assert len(set(row)) == k, f"anchor {anchor}, k={k} <= pool {pool}: repeated {row}"
                assert set(row) <= set(others)
        # k == pool: every other-class image exactly once
        full = sampler.draw(torch.tensor([anchor]), pool, g)[0].tolist()
        assert sorted(full) == others


@pytest.mark.parametrize("layout", ["unbalanced", "two_classes"])
def test_negatives_with_replacement_beyond_the_pool(layout):
    labels = LAYOUTS[layout]
    sampler = NegativeSampler(labels)
    g = torch.Generator().manual_seed(2)
    for anchor in range(len(labels)):
        others = set((labels != labels[anchor]).nonzero().flatten().tolist())
        k = len(others) + 3
        row = sampler.draw(torch.tensor([anchor]), k, g)[0].tolist()
        assert len(row) == k and set(row) <= others  # repeats are unavoidable, other classes only


def test_negatives_are_reproducible_from_the_generator_seed():
    labels = LAYOUTS["unbalanced"]
    sampler = NegativeSampler(labels)
    anchors = torch.arange(len(labels))

    def draw(seed: int, k: int) -> torch.Tensor:
        return sampler.draw(anchors, k, torch.Generator().manual_seed(seed))

    for k in (2, 9):
        assert torch.equal(draw(5, k), draw(5, k))
        assert not torch.equal(draw(5, k), draw(6, k))
    # a fresh sampler on the same labels draws the same
    assert torch.equal(NegativeSampler(labels.clone()).draw(anchors, 4, torch.Generator().manual_seed(5)), draw(5, 4))


def test_negatives_cover_every_other_class_image_about_uniformly():
    labels = LAYOUTS["unbalanced"]
    sampler = NegativeSampler(labels)
    g = torch.Generator().manual_seed(3)
    for anchor in (0, 5, 18, 3):  # class 0 (large), 1, 5 (single image), 4
        others = (labels != labels[anchor]).nonzero().flatten()
        draws, k = 1500, 2
        counts = torch.bincount(sampler.draw(torch.full((draws,), anchor), k, g).flatten(), minlength=len(labels))
        assert counts[labels == labels[anchor]].sum() == 0
        expected = draws * k / len(others)
        assert (counts[others] > 0).all(), f"anchor {anchor}: never drawn {others[counts[others] == 0].tolist()}"
        assert counts[others].min() > 0.6 * expected and counts[others].max() < 1.4 * expected, counts[others]


# ============================================================================= 2. CRD's Distiller
CRD_SMALL = {"feat_dim": 16, "nce_k": 5, "tiny": True}


def test_crd_memory_banks_after_attach_data():
    first, second = make_distiller("CRD", seed=3, **CRD_SMALL), make_distiller("CRD", seed=3, **CRD_SMALL)
    other_seed = make_distiller("CRD", seed=4, **CRD_SMALL)
    bound = 1 / math.sqrt(16 / 3)
    for name in ("memory_s", "memory_t"):
        bank = getattr(first, name)
        assert bank.shape == (len(TRAIN_LABELS), 16) and bank.dtype == torch.float32
        assert bank.abs().max() <= bound
        assert bank.abs().max() > 0.8 * bound and bank.min() < 0 < bank.max()  # spread over [-a, a]
        assert torch.equal(bank, getattr(second, name))
        assert not torch.equal(bank, getattr(other_seed, name))
    assert not torch.equal(first.memory_s, first.memory_t)
    assert first.z_s.item() < 0 and first.z_t.item() < 0  # not yet fixed
    assert int(first.steps) == 0


def test_crd_contrast_indices_anchor_then_other_classes():
    distiller = make_distiller("CRD", **CRD_SMALL)
    indices = torch.tensor([0, 1, 5, 4, 11, 6])
    contrast = distiller.contrast_indices(indices)
    assert contrast.shape == (len(indices), 1 + CRD_SMALL["nce_k"])
    assert torch.equal(contrast[:, 0], indices)
    assert not (TRAIN_LABELS[contrast[:, 1:]] == TRAIN_LABELS[indices][:, None]).any()
    for row in contrast[:, 1:].tolist():  # 8 other-class images >= nce_k: no repeats
        assert len(set(row)) == len(row)
    assert int(distiller.steps) == 1


def test_crd_steps_change_the_draws_and_a_restored_distiller_draws_alike():
    indices = torch.tensor([0, 1, 5, 4])
    distiller = make_distiller("CRD", seed=2, **CRD_SMALL)
    draws = [distiller.contrast_indices(indices) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert int(distiller.steps) == 3
    restored = make_distiller("CRD", seed=2, **CRD_SMALL)
    assert torch.equal(restored.contrast_indices(indices), draws[0])  # same seed, same first step
    restored.load_state_dict(distiller.state_dict())
    assert int(restored.steps) == 3
    assert torch.equal(restored.contrast_indices(indices), distiller.contrast_indices(indices))
    assert torch.equal(restored.contrast_indices(indices), distiller.contrast_indices(indices))
    assert not torch.equal(draws[0], distiller.contrast_indices(indices))  # step 6 is not step 0 again


def _crd_reference(distiller: CRD, memory_t: torch.Tensor, memory_s: torch.Tensor, pooled_s: torch.Tensor,
                   pooled_t: torch.Tensor, contrast: torch.Tensor):
    """v_s, v_t and the scores exp(memory[contrast] . v / nce_t), computed here from the pooled features."""
    with torch.no_grad():
        v_s = F.normalize(distiller.embed_s(pooled_s), dim=1)
        v_t = F.normalize(distiller.embed_t(pooled_t), dim=1)
        out_s = torch.exp(torch.einsum("nkd,nd->nk", memory_t[contrast], v_s) / distiller.nce_t)
        out_t = torch.exp(torch.einsum("nkd,nd->nk", memory_s[contrast], v_t) / distiller.nce_t)
    return v_s, v_t, out_s, out_t


def _nce(x: torch.Tensor, n_data: int) -> torch.Tensor:
    k = x.shape[1] - 1
    noise = k / n_data
    return -(torch.log(x[:, 0] / (x[:, 0] + noise + 1e-7)).sum()
             + torch.log(noise / (x[:, 1:] + noise + 1e-7)).sum()) / x.shape[0]


def test_crd_first_step_fixes_z_updates_the_memory_and_computes_the_loss():
    distiller = make_distiller("CRD", seed=1, nce_m=0.3, **CRD_SMALL).train()  # 0.5 would hide m <-> 1 - m
    n_data, m = len(TRAIN_LABELS), distiller.nce_m
    pooled_s, pooled_t, contrasts = [], [], []
    handles = [capture_inputs(distiller.student.fc, pooled_s), capture_inputs(distiller.teacher.fc, pooled_t)]
    draw = distiller.contrast_indices
    distiller.contrast_indices = lambda indices: contrasts.append(draw(indices)) or contrasts[-1]
    memory_s, memory_t = distiller.memory_s.clone(), distiller.memory_t.clone()

    images, targets = make_batch()
    logits, losses = distiller.forward_train(images, targets, BATCH_INDICES)
    v_s, v_t, out_s, out_t = _crd_reference(distiller, memory_t, memory_s, pooled_s[-1], pooled_t[-1], contrasts[-1])
    # Z = mean(out) * n_data, from this first batch
    assert distiller.z_s.item() == pytest.approx(out_s.mean().item() * n_data, rel=1e-4)
    assert distiller.z_t.item() == pytest.approx(out_t.mean().item() * n_data, rel=1e-4)
    assert distiller.z_s.item() > 0 and distiller.z_t.item() > 0
    expected = distiller.beta * (_nce(out_s / distiller.z_s, n_data) + _nce(out_t / distiller.z_t, n_data))
    assert losses["loss_crd"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert losses["loss_ce"].item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    # the batch's rows move towards the new embeddings; no other row moves
    rows = BATCH_INDICES
    torch.testing.assert_close(distiller.memory_s[rows], F.normalize(m * memory_s[rows] + (1 - m) * v_s, dim=1))
    torch.testing.assert_close(distiller.memory_t[rows], F.normalize(m * memory_t[rows] + (1 - m) * v_t, dim=1))
    others = torch.ones(n_data, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(distiller.memory_s[others], memory_s[others])
    assert torch.equal(distiller.memory_t[others], memory_t[others])
    assert not torch.equal(distiller.memory_s[rows], memory_s[rows])
    assert torch.allclose(distiller.memory_s[rows].norm(dim=1), torch.ones(len(rows)))

    # later steps (with an SGD step between) keep Z, and the loss uses the kept Z
    z_s, z_t = distiller.z_s.clone(), distiller.z_t.clone()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    sum(losses.values()).backward()
    optimizer.step()
    for seed, indices in ((1, torch.tensor([3, 7, 2, 10])), (2, torch.tensor([6, 4, 8, 1]))):
        memory_s, memory_t = distiller.memory_s.clone(), distiller.memory_t.clone()
        images, _ = make_batch(seed)
        _, losses = distiller.forward_train(images, TRAIN_LABELS[indices], indices)
        _, _, out_s, out_t = _crd_reference(distiller, memory_t, memory_s, pooled_s[-1], pooled_t[-1], contrasts[-1])
        assert torch.equal(distiller.z_s, z_s) and torch.equal(distiller.z_t, z_t)
        expected = distiller.beta * (_nce(out_s / z_s, n_data) + _nce(out_t / z_t, n_data))
        assert losses["loss_crd"].item() == pytest.approx(expected.item(), rel=1e-4)
    for handle in handles:
        handle.remove()
    distiller.close()


def test_crd_scores_are_float32_under_bf16_autocast():
    distiller = make_distiller("CRD", **CRD_SMALL).train()
    scores = []
    compute = distiller._scores
    distiller._scores = lambda *args: scores.append(compute(*args)) or scores[-1]
    images, targets = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, losses = distiller.forward_train(images, targets, BATCH_INDICES)
        assert logits.dtype == torch.bfloat16  # autocast is really on for the models
    assert len(scores) == 2 and all(s.dtype == torch.float32 for s in scores)
    assert losses["loss_crd"].dtype == torch.float32 and torch.isfinite(losses["loss_crd"])
    assert distiller.z_s.dtype == torch.float32 and torch.isfinite(distiller.z_s) and distiller.z_s > 0
    assert distiller.memory_s.dtype == torch.float32 and distiller.memory_t.dtype == torch.float32
    sum(losses.values()).backward()
    assert torch.isfinite(distiller.embed_s.weight.grad).all() and distiller.embed_s.weight.grad.abs().sum() > 0


def test_crd_state_holds_memory_and_embeddings_but_the_student_does_not():
    distiller = make_distiller("CRD", feat_dim=16, nce_k=5)  # ResNet18s: the student must be the plain one
    distiller.train().forward_train(*make_batch(), BATCH_INDICES)
    state = distiller.state_dict()
    for key in ("memory_s", "memory_t", "z_s", "z_t", "steps", "embed_s.weight", "embed_s.bias", "embed_t.weight"):
        assert key in state, key
    assert state["embed_t.weight"].shape == (CRD_SMALL["feat_dim"], 512)
    student_state = distiller.student.state_dict()
    assert not any(key.startswith(EXTRA_MODULE_PREFIXES) for key in student_state)
    plain_resnet18().load_state_dict(student_state, strict=True)
    assert distiller.deployable_models() == {"": distiller.student}


# ============================================================================= 3. the loss warm-ups
@pytest.mark.parametrize("name, term", [("DKD", "dkd"), ("DKD_LS", "dkd"), ("ReviewKD", "reviewkd")])
def test_warmup_weight_per_epoch_scales_only_the_distillation_term(name, term):
    # unset, the warm-up is the references' 20 of 240 epochs as a share of the run: 50 * 20/240 = 4.17 -> 4
    assert final.METHODS_CONFIG[name]["warmup_epochs"] is None
    distiller = make_distiller(name, tiny=name != "ReviewKD").train()  # ReviewKD needs stages
    assert distiller.warmup_epochs == 4
    for epoch, weight in ((0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (35, 1.0)):
        distiller.start_epoch(epoch, 50)
        assert distiller.loss_weights() == {term: pytest.approx(weight)}
    images, targets = make_batch()
    distiller.start_epoch(0, 50)
    _, first = distiller.forward_train(images, targets)
    distiller.start_epoch(3, 50)
    _, fourth = distiller.forward_train(images, targets)
    assert set(first) == {"loss_ce", f"loss_{term}"}
    assert first[f"loss_{term}"].item() > 0
    assert fourth[f"loss_{term}"].item() == pytest.approx(4 * first[f"loss_{term}"].item(), rel=1e-5)
    assert fourth["loss_ce"].item() == pytest.approx(first["loss_ce"].item(), rel=1e-6)
    assert distiller.record_extras([], 1) == {"warmup_epochs": 4}  # the record shows the value it used
    distiller.close()


@pytest.mark.parametrize("epochs, warmup", [(240, 20), (50, 4), (4, 1), (1, 1), (30, 2), (200, 17)])
def test_an_unset_warmup_is_the_references_share_of_the_run(epochs, warmup):
    for name in ("DKD", "DKD_LS", "ReviewKD"):
        method = methods.METHODS[name]
        assert method.resolve(final.METHODS_CONFIG[name], epochs)["warmup_epochs"] == warmup, name
        assert method.resolve({**final.METHODS_CONFIG[name], "warmup_epochs": 7}, epochs)["warmup_epochs"] == 7


def test_without_warmup_the_weight_is_one_and_other_methods_report_none():
    distiller = make_distiller("DKD", tiny=True, warmup_epochs=0)
    distiller.start_epoch(0, 5)
    assert distiller.loss_weights() == {"dkd": 1.0}
    short = make_distiller("DKD", tiny=True, warmup_epochs=2)
    short.start_epoch(0, 5)
    assert short.loss_weights() == {"dkd": 0.5}
    for name in ("DIST", "RKD", "PKT", "KD_LS"):
        other = make_distiller(name, tiny=True)
        other.start_epoch(0, 5)
        assert other.loss_weights() == {}, name


@pytest.mark.parametrize("name", ["KD_LS", "DKD_LS"])
def test_logit_standardized_variants_standardize(name):
    """KD_LS / DKD_LS are the KD / DKD classes with standardize on: the loss is the standardized one."""
    distiller = make_distiller(name, tiny=True).train()
    assert type(distiller) is methods.METHODS[name.removesuffix("_LS")].distiller and distiller.standardize is True
    images, targets = make_batch()
    logits, losses = distiller.forward_train(images, targets)
    with torch.no_grad():
        teacher_logits = distiller.teacher(images)
    cfg = final.METHODS_CONFIG[name]
    if name == "KD_LS":
        expected = cfg["kd_weight"] * kd_loss(logits.detach(), teacher_logits, cfg["temperature"], standardize=True)
        plain = cfg["kd_weight"] * kd_loss(logits.detach(), teacher_logits, cfg["temperature"])
        got = losses["loss_kd"]
    else:
        from kd.methods.dkd import dkd_loss
        args = (logits.detach(), teacher_logits, targets, cfg["tckd_weight"], cfg["nckd_weight"], cfg["temperature"])
        expected, plain = dkd_loss(*args, standardize=True), dkd_loss(*args)
        got = losses["loss_dkd"]  # warm-up 1 before the first start_epoch
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() != pytest.approx(plain.item(), rel=1e-3)
    distiller.close()


# ============================================================================= 4. ReviewKD
def test_teacher_preactivations_name_each_stages_last_relu():
    with torch.device("meta"):  # names only: no weights needed
        resnet18, resnet50 = torchvision.models.resnet18(), torchvision.models.resnet50()
        mobilenet = torchvision.models.mobilenet_v2()
    assert teacher_preactivations(resnet18, list(STAGES)) == [f"{s}.1.relu" for s in STAGES]
    assert teacher_preactivations(resnet50, list(STAGES)) == ["layer1.2.relu", "layer2.3.relu", "layer3.5.relu",
                                                              "layer4.2.relu"]
    assert teacher_preactivations(mobilenet, ["features.3", "features.18"]) is None


def _residual_sum(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision block's output before its final ReLU, written out."""
    identity = x if block.downsample is None else block.downsample(x)
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        out = F.relu(block.bn1(block.conv1(x)))
        out = F.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out)) + identity
    return block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + identity


def _check_pre_relu_levels(teacher: torch.nn.Module, tapped: dict[str, torch.Tensor], names: list[str],
                           block_inputs: dict[str, list], stage_outputs: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for stage, name in zip(STAGES, names):
            expected = _residual_sum(teacher.get_submodule(stage)[-1], block_inputs[stage][-1])
            torch.testing.assert_close(tapped[name], expected, rtol=1e-4, atol=1e-5)
            assert (tapped[name] < 0).any(), f"{stage}: no negative values, not the pre-ReLU sum"
            torch.testing.assert_close(stage_outputs[stage], F.relu(tapped[name]))


def _watch_stages(teacher: torch.nn.Module) -> tuple[dict, dict, list]:
    """Hooks of the test's own: each stage's last block's input, and each stage's output."""
    block_inputs: dict[str, list] = {s: [] for s in STAGES}
    stage_outputs: dict[str, torch.Tensor] = {}
    handles = [capture_inputs(teacher.get_submodule(s)[-1], block_inputs[s]) for s in STAGES]
    handles += [teacher.get_submodule(s).register_forward_hook(
        lambda _m, _i, out, s=s: stage_outputs.__setitem__(s, out.detach().clone())) for s in STAGES]
    return block_inputs, stage_outputs, handles


def test_reviewkd_teacher_levels_are_the_pre_relu_residual_sums():
    teacher = randomize_bn(make_resnet("ResNet18", 100), 11).eval()
    distiller = make_distiller("ReviewKD", teacher=teacher).train()
    assert distiller.teacher_layers == [f"{s}.1.relu" for s in STAGES]
    block_inputs, stage_outputs, handles = _watch_stages(teacher)
    distiller.forward_train(*make_batch())
    for handle in handles:
        handle.remove()
    _check_pre_relu_levels(teacher, distiller.teacher_tap.outputs, distiller.teacher_layers, block_inputs,
                           stage_outputs)
    distiller.close()


def test_bottleneck_preactivation_taps_are_the_residual_sums():
    """ResNet50's blocks call their one `relu` three times; the tap keeps the last call's input (the hooks
    ReviewKD puts on the teacher, without building its ABFs for 2048 channels)."""
    teacher = randomize_bn(make_resnet("ResNet50", 100), 12).eval()
    names = teacher_preactivations(teacher, list(STAGES))
    assert names == ["layer1.2.relu", "layer2.3.relu", "layer3.5.relu", "layer4.2.relu"]
    tap = FeatureTap(teacher, names, inputs=True)
    block_inputs, stage_outputs, handles = _watch_stages(teacher)
    with torch.no_grad():
        teacher(make_batch()[0])
    for handle in handles:
        handle.remove()
    tap.remove()
    _check_pre_relu_levels(teacher, tap.outputs, names, block_inputs, stage_outputs)


def _reviewed(distiller: ReviewKD, images: torch.Tensor, targets: torch.Tensor) -> tuple[list, list]:
    """(each ABF's output shallow -> deep, the teacher's levels shallow -> deep) of one training forward."""
    outputs: dict[int, torch.Tensor] = {}
    handles = [abf.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out[0]))
               for i, abf in enumerate(distiller.abfs)]
    pooled: list = []
    handles.append(capture_inputs(distiller.teacher.get_submodule(classifier_name(distiller.teacher)), pooled))
    distiller.forward_train(images, targets)
    for handle in handles:
        handle.remove()
    teacher_levels = [distiller.teacher_tap[name] for name in distiller.teacher_layers] + [pooled[-1][..., None, None]]
    return [outputs[i] for i in range(len(distiller.abfs))], teacher_levels


def test_reviewkd_fusion_modules_and_shapes_with_a_resnet_teacher():
    distiller = make_distiller("ReviewKD").train()
    assert len(distiller.abfs) == len(STAGES) + 1
    assert all(abf.att_conv is not None for abf in distiller.abfs[:-1]) and distiller.abfs[-1].att_conv is None
    reviewed, teacher_levels = _reviewed(distiller, *make_batch())
    assert [tuple(r.shape) for r in reviewed] == [tuple(t.shape) for t in teacher_levels]
    assert [t.shape[1] for t in teacher_levels] == [64, 128, 256, 512, 512]
    assert teacher_levels[-1].shape[-2:] == (1, 1)
    # the ABFs train with the student, and are never part of it
    assert {id(p) for p in distiller.abfs.parameters()} <= {id(p) for p in distiller.trainable_parameters()}
    assert not any(key.startswith("abfs") for key in distiller.student.state_dict())
    assert any(key.startswith("abfs.") for key in distiller.state_dict())
    distiller.close()


def test_reviewkd_with_a_non_resnet_teacher_uses_the_stage_outputs():
    torch.manual_seed(0)
    teacher = torchvision.models.mobilenet_v2(num_classes=10).eval()
    student = build_resnet("ResNet18", 10, "cifar")
    stages = [stage.module for stage in find_stages(teacher)]
    assert teacher_preactivations(teacher, stages) is None
    notes = ReviewKD.plan_notes(student, teacher)
    assert len(notes) == 1 and "stage outputs" in notes[0] and "MobileNetV2" in notes[0]
    resnet_notes = ReviewKD.plan_notes(student, make_resnet())
    assert len(resnet_notes) == 1 and "pre-ReLU" in resnet_notes[0] and "after activation" not in resnet_notes[0]

    distiller = ReviewKD(student, teacher, **methods.METHODS["ReviewKD"].resolve(final.METHODS_CONFIG["ReviewKD"], 50)).train()
    assert distiller.teacher_layers == stages
    assert len(distiller.abfs) == len(stages) + 1 and distiller.abfs[-1].att_conv is None
    stage_outputs = {}
    handles = [teacher.get_submodule(s).register_forward_hook(
        lambda _m, _i, out, s=s: stage_outputs.__setitem__(s, out.detach().clone())) for s in stages]
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 7])
    reviewed, teacher_levels = _reviewed(distiller, images, targets)
    for handle in handles:
        handle.remove()
    for stage, level in zip(stages, teacher_levels):
        torch.testing.assert_close(level, stage_outputs[stage])  # the stage outputs themselves
    assert teacher_levels[-2].min() >= 0  # features.18 ends in ReLU6: not a pre-activation
    assert [tuple(r.shape) for r in reviewed] == [tuple(t.shape) for t in teacher_levels]
    assert teacher_levels[-1].shape == (2, 1280, 1, 1)
    distiller.close()


# ============================================================================= 5. method names
def test_all_resolves_to_every_registered_method_in_registry_order():
    assert tuple(methods.METHODS) == ALL_METHODS
    assert resolve_method_names(["all"], methods.METHODS) == list(ALL_METHODS)
    assert resolve_method_names([" ALL "], methods.METHODS) == list(ALL_METHODS)
    # given names first, then the rest once each
    assert resolve_method_names(["dkd", "all", "KD"], methods.METHODS) == ["DKD", *[m for m in ALL_METHODS if m != "DKD"]]


@pytest.mark.parametrize("given, expected", [
    (["dkd-ls"], ["DKD_LS"]), (["KD_ls"], ["KD_LS"]), ([" Dkd_LS "], ["DKD_LS"]), (["kd-LS", "KD_LS"], ["KD_LS"]),
    (["reviewkd", "Crd", "dist", "RKD", "sp", "pkt"], ["ReviewKD", "CRD", "DIST", "RKD", "SP", "PKT"])])
def test_new_method_names_resolve(given, expected):
    assert resolve_method_names(given, methods.METHODS) == expected


def test_unknown_method_lists_every_valid_one_and_all(tiny_config):
    tiny_config["experiment"]["methods"] = ["DKD", "dkd_ls_plus"]
    with pytest.raises(UserError) as info:
        final.validate_config(tiny_config)
    message = str(info.value)
    assert "unknown method 'dkd_ls_plus'" in message and "(or all)" in message
    assert f"valid methods are {', '.join(ALL_METHODS)}" in message
    tiny_config["experiment"]["methods"] = ["all"]
    assert final.validate_config(tiny_config)["experiment"]["methods"] == list(ALL_METHODS)


def test_default_methods_are_still_the_six():
    assert final.EXPERIMENT_CONFIG["methods"] == DEFAULT_METHODS
    assert final.validate_config(final.default_config())["experiment"]["methods"] == DEFAULT_METHODS
    assert set(final.METHODS_CONFIG) == set(ALL_METHODS)


def test_check_with_all_methods_plans_every_method(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "data", per_class={"train": 4, "val": 2})
    code = run_experiment.cli(["--data", str(data), "--methods", "all", "--check", "--device", "cpu",
                               "--precision", "fp32", "--batch-size", "4", "--teacher-epochs", "1",
                               "--student-epochs", "1", "--set", "teacher.model=resnet18",
                               "--set", "experiment.image_size=8", "--set", "experiment.num_workers=0",
                               "--logs-dir", str(tmp_path / "logs"), "--checkpoints-dir", str(tmp_path / "ckpt")])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert f"methods {', '.join(ALL_METHODS)}, seeds 0" in out
    assert "note: ReviewKD: the teacher's pre-ReLU stage outputs come from hooks" in out
    assert "trains its own student" not in out  # DKD's warmup_epochs is no student setting
    for method in ("DKD", "ReviewKD", "DKD_LS"):  # the effective warm-up of an unset one
        assert (f"note: {method}: warmup_epochs 1 of its 1 epochs (unset: the references' 20 of 240 epochs); "
                f"set methods.{method}.warmup_epochs to choose") in out
    assert "check passed" in out
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()


# ============================================================================= 6. settings of the new methods
BAD_VALUES = [
    ("DKD", "tckd_weight", -0.1), ("DKD", "nckd_weight", -1), ("DKD_LS", "nckd_weight", "8"),
    ("DIST", "gamma", -0.5), ("RKD", "distance_weight", -1.0), ("RKD", "angle_weight", -0.01),
    ("DKD", "warmup_epochs", -1), ("DKD", "warmup_epochs", 2.5), ("DKD", "warmup_epochs", True),
    ("ReviewKD", "warmup_epochs", -2), ("DKD_LS", "warmup_epochs", "20"),
    ("KD", "standardize", 1), ("KD_LS", "standardize", "yes"), ("DKD", "standardize", None),
    ("CRD", "feat_dim", 0), ("CRD", "feat_dim", 1.5), ("CRD", "feat_dim", True),
    ("CRD", "nce_k", 0), ("CRD", "nce_k", -3), ("CRD", "nce_t", 0), ("CRD", "nce_t", -0.07),
    ("CRD", "nce_m", 1), ("CRD", "nce_m", 1.5), ("CRD", "nce_m", -0.1),
]
GOOD_VALUES = [
    ("DKD", "tckd_weight", 0), ("DKD", "nckd_weight", 2.0), ("DIST", "gamma", 0), ("DIST", "gamma", 5.0),
    ("RKD", "distance_weight", 0), ("RKD", "angle_weight", 0.0), ("DKD", "warmup_epochs", 0),
    ("ReviewKD", "warmup_epochs", 5), ("DKD_LS", "warmup_epochs", None), ("KD", "standardize", True),
    ("DKD_LS", "standardize", False),
    ("CRD", "feat_dim", 1), ("CRD", "nce_k", 1), ("CRD", "nce_t", 1e-3), ("CRD", "nce_m", 0), ("CRD", "nce_m", 0.99),
]


@pytest.mark.parametrize("method, key, value", BAD_VALUES)
def test_bad_setting_names_the_key(method, key, value):
    with pytest.raises(UserError, match=rf"bad value methods\.{method}\.{key}=.*must be"):
        final.create_method_config(method, **{key: value})


@pytest.mark.parametrize("method, key, value", GOOD_VALUES)
def test_good_setting_passes(method, key, value):
    checked = final.create_method_config(method, **{key: value})
    assert checked[key] == value and type(checked[key]) is type(value)


def test_bad_setting_in_a_full_config_and_by_set(tiny_config):
    tiny_config["methods"]["CRD"]["nce_m"] = 1.0
    with pytest.raises(UserError, match=r"methods\.CRD\.nce_m=1\.0: must be a number in \[0, 1\)"):
        final.validate_config(tiny_config)
    tiny_config["methods"]["CRD"]["nce_m"] = 0.5
    from kd.experiment.config import apply_overrides
    apply_overrides(tiny_config, ["methods.DKD.warmup_epochs=-1"])
    with pytest.raises(UserError, match=r"methods\.DKD\.warmup_epochs=-1: must be null \(the references' share of "
                                        r"the epochs\) or an integer >= 0"):
        final.validate_config(tiny_config)


@pytest.mark.parametrize("method, key", [("DKD", "warmup_epochs"), ("DKD_LS", "warmup_epochs"),
                                         ("ReviewKD", "warmup_epochs"), ("DIST", "gamma")])
def test_loss_settings_named_like_student_keys_are_loss_settings(method, key):
    settings = final.METHODS_CONFIG[method]
    loss, overrides = split_method_settings(settings, methods.METHODS[method])
    assert loss == settings and key in loss
    assert overrides == {}


def test_a_method_may_still_override_student_keys_it_does_not_use():
    settings = final.create_method_config("DKD", lr=0.05, epochs=3)
    loss, overrides = split_method_settings(settings, methods.METHODS["DKD"])
    assert overrides == {"lr": 0.05, "epochs": 3}
    assert loss == final.METHODS_CONFIG["DKD"]
    with pytest.raises(UserError, match=r"methods\.DKD\.lr=-1"):
        final.create_method_config("DKD", lr=-1)
    # `gamma` is DIST's loss weight (>= 0) but StepLR's factor for another method (in (0, 1])
    assert split_method_settings(final.create_method_config("DKD", gamma=0.5),
                                 methods.METHODS["DKD"])[1] == {"gamma": 0.5}
    with pytest.raises(UserError, match=r"methods\.DKD\.gamma=2\.0: must be a number in \(0, 1\]"):
        final.create_method_config("DKD", gamma=2.0)
    # a CRD setting is no key of another method
    with pytest.raises(UserError, match=r"unknown config key 'methods\.DKD\.nce_k'"):
        final.create_method_config("DKD", nce_k=8)


# ============================================================================= 7. end to end, all nine
LOSS_KEYS = {"DKD": {"loss_ce", "loss_dkd"}, "DIST": {"loss_ce", "loss_dist"}, "CRD": {"loss_ce", "loss_crd"},
             "ReviewKD": {"loss_ce", "loss_reviewkd"}, "RKD": {"loss_ce", "loss_rkd"}, "SP": {"loss_ce", "loss_sp"},
             "PKT": {"loss_ce", "loss_pkt"}, "KD_LS": {"loss_ce", "loss_kd"}, "DKD_LS": {"loss_ce", "loss_dkd"}}


@pytest.fixture(scope="module")
def nine_run(module_dir, make_image_folder):
    """One experiment: a ResNet18 teacher, then the nine new methods trained together for one epoch of two
    steps (9 train images, batch 4: the last image would make a batch of one and is left out). The teacher's
    lr is 0.01: after one epoch at 0.1 its eval-mode BatchNorm statistics lag so far behind its weights that
    its features reach 1e8, which no student should be asked to match."""
    base = module_dir
    data = make_image_folder(base / "data", per_class={"train": 3, "val": 1})
    methods = "DKD,DIST,CRD,ReviewKD,RKD,SP,PKT,kd-ls,DKD_LS"
    code = run_experiment.cli(["--data", str(data), "--methods", methods, "--teacher-epochs", "1",
                               "--student-epochs", "1", "--batch-size", "4", "--device", "cpu",
                               "--precision", "fp32", "--set", "teacher.model=resnet18", "--set", "teacher.lr=0.01",
                               "--set", "experiment.image_size=8", "--set", "experiment.num_workers=0",
                               "--set", "methods.CRD.nce_k=4", "--set", "methods.CRD.feat_dim=16",
                               "--set", "methods.DKD.warmup_epochs=20",  # explicit; DKD_LS and ReviewKD unset
                               "--logs-dir", str(base / "logs"), "--checkpoints-dir", str(base / "ckpt")])
    experiments = list((base / "logs").glob("final_experiment_*"))
    assert len(experiments) == 1, experiments
    return {"code": code, "base": base, "exp": experiments[0],
            "records": json.loads((experiments[0] / "comparison_results.json").read_text())}


def test_nine_methods_run_ok_with_finite_losses(nine_run):
    assert nine_run["code"] == 0
    records = {r["method"]: r for r in nine_run["records"]}
    assert set(records) == {"Teacher", *NEW_METHODS}
    for method in NEW_METHODS:
        record = records[method]
        assert record["status"] == "ok", record.get("reason")
        assert record["protocol"] == "common", (method, record["protocol"])  # loss warm-ups are no student keys
        assert record["teacher"] == "resnet18"
        assert len(record["history"]) == 1
        entry = record["history"][0]
        assert entry["images"] == 8  # two steps of 4
        assert set(entry["train_loss"]) == LOSS_KEYS[method]
        assert all(math.isfinite(v) and 0 <= v < 1e5 for v in entry["train_loss"].values()), (method, entry)
    # trained together from the same start on the same batches
    assert len({records[m]["student_init_sha256"] for m in NEW_METHODS}) == 1
    assert len({records[m]["first_batch_sha256"] for m in NEW_METHODS}) == 1


def test_nine_methods_history_has_the_warmup_weights(nine_run):
    records = {r["method"]: r for r in nine_run["records"]}
    assert records["DKD"]["history"][0]["loss_weights"] == {"dkd": pytest.approx(0.05)}  # 1 of 20 epochs
    assert records["DKD"]["warmup_epochs"] == 20  # an explicit value wins
    # unset, a warm-up is the references' share (20 of 240) of the 1-epoch run, at least 1 epoch: none at all
    assert records["DKD_LS"]["history"][0]["loss_weights"] == {"dkd": 1.0}
    assert records["ReviewKD"]["history"][0]["loss_weights"] == {"reviewkd": 1.0}
    assert records["DKD_LS"]["warmup_epochs"] == records["ReviewKD"]["warmup_epochs"] == 1
    report = (nine_run["exp"] / "report.md").read_text()
    assert report.count("Loss warm-up epochs: 1.") == 2 and report.count("Loss warm-up epochs: 20.") == 1
    for method in ("DIST", "CRD", "RKD", "SP", "PKT", "KD_LS"):
        assert "loss_weights" not in records[method]["history"][0], method


def test_nine_methods_tensorboard_has_the_warmup_weight(nine_run):
    def scalars(method: str) -> EventAccumulator:
        runs = list((nine_run["base"] / "logs" / method).glob(f"{method}_ResNet18_Final_*"))
        assert len(runs) == 1, runs
        events = EventAccumulator(str(runs[0]))
        events.Reload()
        return events

    dkd = scalars("DKD")
    assert "train/weight_dkd" in dkd.Tags()["scalars"]
    assert [e.value for e in dkd.Scalars("train/weight_dkd")] == [pytest.approx(0.05)]
    assert "train/weight_reviewkd" in scalars("ReviewKD").Tags()["scalars"]
    crd_tags = scalars("CRD").Tags()["scalars"]
    assert "train/loss_crd" in crd_tags and not any(tag.startswith("train/weight_") for tag in crd_tags)


def test_nine_methods_save_plain_resnet18_students(nine_run):
    folder = nine_run["base"] / "ckpt" / "students"
    best = sorted(folder.glob("*_best.pth"))
    assert sorted(p.name for p in best) == sorted(f"{m}_ResNet18_best.pth" for m in NEW_METHODS)
    probe = torch.randn(2, 3, SIZE, SIZE)
    outputs = {}
    model = plain_resnet18()  # built once; each checkpoint is loaded into it strictly
    for path in best:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state, meta = checkpoint["model"], checkpoint["meta"]
        assert meta["stem"] == "cifar" and meta["num_classes"] == NUM_CLASSES and meta["builder"] == "resnet18"
        assert meta["method"] == path.name.split("_ResNet18")[0]
        assert not any(key.startswith(EXTRA_MODULE_PREFIXES) for key in state), path.name
        assert not any(part in key for key in state for part in ("embed", "memory", "abf")), path.name
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            outputs[path.name] = model.eval()(probe)
        assert torch.isfinite(outputs[path.name]).all()
    assert len({tuple(o.flatten().tolist()) for o in outputs.values()}) == len(NEW_METHODS)  # each its own student
    assert not (nine_run["exp"] / "resume").exists()  # the extra modules' state went with the finished runs


# ============================================================================= 8. a ViT teacher
@pytest.fixture(scope="module")
def vit_teacher():
    torch.manual_seed(0)
    spec = model_spec({"model": VIT_TEACHER, "weights": None}, VIT_SIZE, "auto")
    return build_model(spec, NUM_CLASSES)


@pytest.mark.parametrize("name", VIT_METHODS)
def test_vit_teacher_with_logit_and_pooled_feature_methods(name, vit_teacher):
    teacher = copy.deepcopy(vit_teacher)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = make_distiller(name, teacher=teacher, tiny=True, **({"feat_dim": 16, "nce_k": 5} if name == "CRD"
                                                                   else {})).train()
    student_before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    if name == "CRD":
        assert distiller.embed_t.in_features == teacher.embed_dim
    images, targets = make_batch(size=VIT_SIZE)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
    logits, losses = distiller.forward_train(images, targets, **({"indices": BATCH_INDICES}
                                                                 if distiller.needs_index else {}))
    assert logits.shape == (BATCH, NUM_CLASSES) and len(losses) == 2
    loss = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    loss.backward()
    optimizer.step()
    distiller.close()
    assert not torch.equal(student_before["fc.weight"], distiller.student.state_dict()["fc.weight"])
    assert not torch.equal(student_before["conv.weight"], distiller.student.state_dict()["conv.weight"])
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("method", ["SP", "ReviewKD"])
def test_vit_teacher_with_a_map_method_is_refused_at_check(tmp_path, make_image_folder, capsys, method):
    data = make_image_folder(tmp_path / "data", size=16, per_class={"train": 4, "val": 2})
    code = run_experiment.cli(["--data", str(data), "--methods", f"DKD,{method}", "--check", "--device", "cpu",
                               "--precision", "fp32", "--batch-size", "4", "--set", f"teacher.model={VIT_TEACHER}",
                               "--set", f"experiment.image_size={VIT_SIZE}", "--set", "experiment.num_workers=0",
                               "--logs-dir", str(tmp_path / "logs"), "--checkpoints-dir", str(tmp_path / "ckpt")])
    line = _error_line(capsys.readouterr().err)
    assert code == 2
    assert f"{method} needs feature maps of the teacher" in line and VIT_TEACHER in line and "--methods" in line
    working = line.split("run ", 1)[1].split(" with it")[0].split(", ")
    assert set(VIT_METHODS) | {"Baseline", "KD", "DML", "BYOT", "DKD_LS"} <= set(working), working
    assert not {"SP", "ReviewKD", "AT", "FitNets"} & set(working), working
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()

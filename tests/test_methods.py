"""Every Distiller, end to end on tiny inputs: one training step, the frozen teacher, predict(), saving.

ResNet18 student / ResNet50 teacher with the CIFAR stem, 3 classes, 4 images of 8x8: seconds on a CPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from final import METHODS_CONFIG
from kd import methods
from models import apply_stem, build_resnet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

STAGES = ("layer1", "layer2", "layer3", "layer4")  # a torchvision ResNet's stages

NUM_CLASSES, BATCH, SIZE = 3, 4, 8

EXPECTED_KEYS = {
    "Baseline": {"loss_ce"},
    "KD": {"loss_ce", "loss_kd"},
    "AT": {"loss_ce", "loss_at"},
    "FitNets": {"loss_ce", "loss_hint"},
    "DML": {"loss_ce", "loss_kl"},
    "BYOT": {"loss_ce", "loss_kd", "loss_feat"},
    "DKD": {"loss_ce", "loss_dkd"},
    "DIST": {"loss_ce", "loss_dist"},
    "CRD": {"loss_ce", "loss_crd"},
    "ReviewKD": {"loss_ce", "loss_reviewkd"},
    "RKD": {"loss_ce", "loss_rkd"},
    "SP": {"loss_ce", "loss_sp"},
    "PKT": {"loss_ce", "loss_pkt"},
    "KD_LS": {"loss_ce", "loss_kd"},
    "DKD_LS": {"loss_ce", "loss_dkd"},
    "WTTM": {"loss_ce", "loss_wttm"},
    "CTKD": {"loss_ce", "loss_kd"},
    "CTKD_DKD": {"loss_ce", "loss_dkd"},
    "NormKD": {"loss_ce", "loss_normkd"},
    "MLKD": {"loss_ce", "loss_kd", "loss_cc", "loss_bc"},
    "OFA": {"loss_ce", "loss_kd", "loss_ofa"},
}
TRAIN_LABELS = torch.arange(12) % 3  # a training set of 12 images (CRD's memory and negatives)


# ----------------------------------------------------------------------------- helpers


_TEACHER_CACHE: list[torch.nn.Module] = []


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    targets = torch.tensor([0, 1, 2, 1])
    return images, targets


def make_student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_resnet("ResNet18", NUM_CLASSES, "cifar")


def make_teacher() -> torch.nn.Module:
    """A fresh copy of one ResNet50 (built once per module: its initialisation is the slow part)."""
    if not _TEACHER_CACHE:
        rng = torch.get_rng_state()
        torch.manual_seed(100)
        teacher = build_resnet("ResNet50", NUM_CLASSES, "cifar")
        # non-default BN statistics, so that "unchanged" is a real check
        with torch.no_grad():
            for m in teacher.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        torch.set_rng_state(rng)
        _TEACHER_CACHE.append(teacher)
    return copy.deepcopy(_TEACHER_CACHE[0]).eval()


def make_distiller(name: str, seed: int = 0, **overrides):
    cls = methods.METHODS[name].distiller
    student = make_student(seed)
    teacher = make_teacher() if cls.needs_teacher else None
    torch.manual_seed(seed + 1)  # DML's extra peers / BYOT's heads draw from the global RNG
    distiller = cls(student, teacher, **methods.METHODS[name].resolve({**METHODS_CONFIG[name], **overrides}, 50))
    distiller.attach_data(TRAIN_LABELS, seed)
    return distiller


BATCH_INDICES = torch.tensor([0, 1, 5, 4])  # make_batch's labels: their positions in TRAIN_LABELS


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def plain_resnet18() -> torch.nn.Module:
    return apply_stem(torchvision.models.resnet18(num_classes=NUM_CLASSES), "cifar")


def ce_ref(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_probs = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    return -log_probs[torch.arange(len(y)), y].mean()


def kd_ref(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    p_t = torch.exp(teacher / t) / torch.exp(teacher / t).sum(dim=1, keepdim=True)
    p_s = torch.exp(student / t) / torch.exp(student / t).sum(dim=1, keepdim=True)
    return t * t * (p_t * (torch.log(p_t) - torch.log(p_s))).sum() / student.shape[0]


def record_stages(model: torch.nn.Module, names) -> tuple[dict, list]:
    outputs = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: outputs.__setitem__(n, o)) for n in names]
    return outputs, handles


# ----------------------------------------------------------------------------- registry
def test_methods_registry_and_configs():
    assert set(methods.METHODS) == set(EXPECTED_KEYS)
    assert set(METHODS_CONFIG) == set(methods.METHODS)
    for name, method in methods.METHODS.items():
        assert method.name == name and issubclass(method.distiller, methods.Distiller)
    assert {n for n, m in methods.METHODS.items() if not m.distiller.needs_teacher} == {"Baseline", "DML", "BYOT"}


# ----------------------------------------------------------------------------- one training step
@pytest.mark.parametrize("name", list(EXPECTED_KEYS))
def test_one_training_step(name, method_inputs):
    distiller = make_distiller(name)
    teacher = distiller.teacher
    if methods.METHODS[name].distiller.needs_teacher:
        assert teacher is not None
        teacher_before = snapshot(teacher)  # parameters AND buffers (running stats, num_batches_tracked)
        assert any(k.endswith("num_batches_tracked") for k in teacher_before)
    else:
        assert teacher is None

    student_before = snapshot(distiller.student)
    distiller.train()
    if teacher is not None:
        assert not any(m.training for m in teacher.modules()), "teacher must stay in eval mode"
        assert all(not p.requires_grad for p in teacher.parameters())
    assert distiller.student.training

    params = distiller.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    if teacher is not None:
        teacher_ids = {id(p) for p in teacher.parameters()}
        assert not teacher_ids & {id(p) for p in params}
    student_ids = {id(p) for p in distiller.student.parameters()}
    assert student_ids <= {id(p) for p in params}

    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    images, targets = make_batch()
    logits, losses = distiller.forward_train(images, targets, **method_inputs(distiller, images, BATCH_INDICES))
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert set(losses) == EXPECTED_KEYS[name]
    for key, value in losses.items():
        assert key.startswith("loss_")
        assert value.dim() == 0 and torch.isfinite(value), (key, value)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

    moved = changed(student_before, distiller.student)
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "fc.weight", "fc.bias"):
        assert key in moved, f"student {key} did not change"
    if teacher is not None:
        assert changed(teacher_before, teacher) == set(), "teacher weights or BN buffers changed"
        assert all(p.grad is None for p in teacher.parameters())
        assert not any(m.training for m in teacher.modules())
    # train(False) / train() keep the teacher in eval
    distiller.eval()
    distiller.train()
    if teacher is not None:
        assert not any(m.training for m in teacher.modules())


def test_dml_updates_every_peer():
    distiller = make_distiller("DML")
    assert len(distiller.peers) == 2 and distiller.peers[0] is distiller.student
    before = [snapshot(p) for p in distiller.peers]
    distiller.train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    _, losses = distiller.forward_train(*make_batch())
    sum(losses.values()).backward()
    optimizer.step()
    for snap, peer in zip(before, distiller.peers):
        assert {"conv1.weight", "fc.weight"} <= changed(snap, peer)


def test_byot_trains_heads():
    distiller = make_distiller("BYOT")
    heads_before = snapshot(distiller.heads)
    cls_before = snapshot(distiller.classifiers)
    distiller.train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    _, losses = distiller.forward_train(*make_batch())
    sum(losses.values()).backward()
    optimizer.step()
    assert any(k.endswith("weight") for k in changed(heads_before, distiller.heads))
    assert len(changed(cls_before, distiller.classifiers)) == len(cls_before)


# ----------------------------------------------------------------------------- loss wiring (values)
def test_kd_loss_values():
    distiller = make_distiller("KD").train()
    images, targets = make_batch()
    logits, losses = distiller.forward_train(images, targets)
    with torch.no_grad():
        teacher_logits = distiller.teacher(images)
    cfg = METHODS_CONFIG["KD"]
    assert losses["loss_ce"].item() == pytest.approx(cfg["ce_weight"] * ce_ref(logits, targets).item(), rel=1e-5)
    expected = cfg["kd_weight"] * kd_ref(logits.detach(), teacher_logits, cfg["temperature"])
    assert losses["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_at_loss_values_use_layer1_to_layer4():
    distiller = make_distiller("AT").train()
    images, targets = make_batch()
    s_out, s_handles = record_stages(distiller.student, STAGES)
    t_out, t_handles = record_stages(distiller.teacher, STAGES)
    logits, losses = distiller.forward_train(images, targets)
    for h in s_handles + t_handles:
        h.remove()

    def att(f):
        v = (f.detach() ** 2).mean(dim=1).reshape(f.shape[0], -1)
        return v / torch.sqrt((v * v).sum(dim=1, keepdim=True))

    expected = sum(((att(s_out[n]) - att(t_out[n])) ** 2).mean() for n in STAGES)
    cfg = METHODS_CONFIG["AT"]
    assert losses["loss_at"].item() == pytest.approx(cfg["beta"] * expected.item(), rel=1e-4)
    assert losses["loss_ce"].item() == pytest.approx(cfg["ce_weight"] * ce_ref(logits, targets).item(), rel=1e-5)


def test_fitnets_hint_uses_layer2_and_regressor():
    distiller = make_distiller("FitNets").train()
    reg = distiller.regressor
    assert reg.conv.in_channels == 128 and reg.conv.out_channels == 512  # ResNet18 layer2 -> ResNet50 layer2
    images, targets = make_batch()
    s_out, s_handles = record_stages(distiller.student, ["layer2"])
    t_out, t_handles = record_stages(distiller.teacher, ["layer2"])
    logits, losses = distiller.forward_train(images, targets)
    for h in s_handles + t_handles:
        h.remove()
    with torch.no_grad():
        regressed = reg(s_out["layer2"], t_out["layer2"].shape[-2:])
    cfg = METHODS_CONFIG["FitNets"]
    expected = cfg["beta"] * ((regressed - t_out["layer2"]) ** 2).mean()
    assert losses["loss_hint"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert losses["loss_ce"].item() == pytest.approx(cfg["ce_weight"] * ce_ref(logits, targets).item(), rel=1e-5)


def test_dml_loss_values():
    distiller = make_distiller("DML").train()
    images, targets = make_batch()
    logits, losses = distiller.forward_train(images, targets)
    with torch.no_grad():
        z0, z1 = (peer(images) for peer in distiller.peers)  # train-mode BN: same batch stats, same output
    torch.testing.assert_close(logits.detach(), z0, rtol=1e-4, atol=1e-5)
    cfg = METHODS_CONFIG["DML"]
    t = cfg["temperature"]
    assert losses["loss_ce"].item() == pytest.approx((ce_ref(z0, targets) + ce_ref(z1, targets)).item(), rel=1e-4)
    expected_kl = cfg["kl_weight"] * (kd_ref(z0, z1, t) + kd_ref(z1, z0, t))
    assert losses["loss_kl"].item() == pytest.approx(expected_kl.item(), rel=1e-3, abs=1e-6)


def test_dml_peers_differ_and_peer_gradients_are_independent():
    distiller = make_distiller("DML").train()
    p0, p1 = distiller.peers
    assert not torch.equal(p0.conv1.weight, p1.conv1.weight)
    assert not torch.equal(p0.fc.weight, p1.fc.weight)
    # peer 1's gradient must come only from its own CE + its KL towards a detached peer 0
    images, targets = make_batch()
    _, losses = distiller.forward_train(images, targets)
    sum(losses.values()).backward()
    got = p1.fc.weight.grad.clone()
    distiller.zero_grad(set_to_none=True)
    z0 = p0(images).detach()
    z1 = p1(images)
    (ce_ref(z1, targets) + METHODS_CONFIG["DML"]["kl_weight"] * kd_ref(z1, z0, 1.0)).backward()
    torch.testing.assert_close(got, p1.fc.weight.grad, rtol=1e-3, atol=1e-6)


def test_byot_loss_values():
    distiller = make_distiller("BYOT").train()
    images, targets = make_batch()
    out, handles = record_stages(distiller.student, ["layer1", "layer2", "layer3", "avgpool"])
    logits, losses = distiller.forward_train(images, targets)
    for h in handles:
        h.remove()
    with torch.no_grad():
        feats = [distiller.heads[s](out[s]) for s in ("layer1", "layer2", "layer3")]
        exit_logits = [distiller.classifiers[s](f) for s, f in zip(("layer1", "layer2", "layer3"), feats)]
    assert all(f.shape == (BATCH, 512) for f in feats)
    f_c = out["avgpool"].detach().flatten(1)
    z = [*exit_logits, logits.detach()]
    cfg = METHODS_CONFIG["BYOT"]
    a, t, w = cfg["alpha"], cfg["temperature"], cfg["feat_weight"]
    assert losses["loss_ce"].item() == pytest.approx((1 - a) * sum(ce_ref(zi, targets) for zi in z).item(), rel=1e-4)
    assert losses["loss_kd"].item() == pytest.approx(a * sum(kd_ref(zi, z[-1], t) for zi in z[:-1]).item(),
                                                     rel=1e-3, abs=1e-7)
    feat = sum((((f - f_c) ** 2) * ((f > 0) | (f_c > 0)).float()).sum() for f in feats)
    assert losses["loss_feat"].item() == pytest.approx(w * feat.item(), rel=1e-3)


def test_byot_exit_heads_follow_spec():
    distiller = make_distiller("BYOT")
    strides = {"layer1": 8, "layer2": 4, "layer3": 2}
    in_ch = {"layer1": 64, "layer2": 128, "layer3": 256}
    for stage, k in strides.items():
        convs = [m for m in distiller.heads[stage].modules() if isinstance(m, torch.nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(1, 1), (k, k), (1, 1)]
        assert [c.stride for c in convs] == [(1, 1), (k, k), (1, 1)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [(in_ch[stage], 128), (128, 128), (128, 512)]
        assert distiller.classifiers[stage].in_features == 512
        assert distiller.classifiers[stage].out_features == NUM_CLASSES


# ----------------------------------------------------------------------------- predict / selection
@pytest.mark.parametrize("name", list(EXPECTED_KEYS))
def test_predict_has_student(name):
    distiller = make_distiller(name).eval()
    images, _ = make_batch()
    outputs = distiller.predict(images)
    assert "student" in outputs
    for value in outputs.values():
        assert value.shape == (BATCH, NUM_CLASSES) and not value.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(outputs["student"], distiller.student(images))
    if name in ("Baseline", "KD", "AT", "FitNets"):
        assert set(outputs) == {"student"}
        assert distiller.selection_score({"student": 0.42}) == 0.42


def test_dml_predict_and_mean_selection():
    distiller = make_distiller("DML").eval()
    images, _ = make_batch()
    outputs = distiller.predict(images)
    assert set(outputs) == {"student", "peer0", "peer1"}
    torch.testing.assert_close(outputs["student"], outputs["peer0"])
    with torch.no_grad():
        torch.testing.assert_close(outputs["peer1"], distiller.peers[1](images))
    score = distiller.selection_score({"student": 0.5, "peer0": 0.5, "peer1": 0.9})
    assert score == pytest.approx(0.7)  # the mean over peers, never the max (0.9)


def test_byot_predict_exits_and_ensemble():
    distiller = make_distiller("BYOT").eval()
    images, _ = make_batch()
    outputs = distiller.predict(images)
    assert set(outputs) == {"student", "exit1", "exit2", "exit3", "ensemble"}
    zs = [outputs[k] for k in ("exit1", "exit2", "exit3", "student")]
    probs = [torch.exp(z) / torch.exp(z).sum(dim=1, keepdim=True) for z in zs]
    mean_prob = (probs[0] + probs[1] + probs[2] + probs[3]) / 4
    # argmax is what evaluation uses; the returned values are log of the mean softmax
    assert torch.equal(outputs["ensemble"].argmax(dim=1), mean_prob.argmax(dim=1))
    torch.testing.assert_close(outputs["ensemble"].exp(), mean_prob, rtol=1e-4, atol=1e-6)
    acc = {"student": 0.6, "exit1": 0.1, "exit2": 0.2, "exit3": 0.9, "ensemble": 0.95}
    assert distiller.selection_score(acc) == 0.6  # deepest exit = the deployable ResNet18


# ----------------------------------------------------------------------------- deployable models
@pytest.mark.parametrize("name", list(EXPECTED_KEYS))
def test_deployable_models_load_into_plain_torchvision(name):
    distiller = make_distiller(name)
    deployables = distiller.deployable_models()
    if name == "DML":
        assert set(deployables) == {"_peer0", "_peer1"}
        assert deployables["_peer0"] is distiller.student
    else:
        assert set(deployables) == {""}
        assert deployables[""] is distiller.student
    images, _ = make_batch()
    for model in deployables.values():
        state = model.state_dict()
        assert not any(k.startswith(("heads", "classifiers", "regressor", "teacher")) for k in state)
        plain = plain_resnet18()
        plain.load_state_dict(state, strict=True)
        plain.eval()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(images), model(images))


# ----------------------------------------------------------------------------- FitNets two-stage
def test_fitnets_two_stage_switch():
    distiller = make_distiller("FitNets", two_stage=True)
    images, targets = make_batch()
    distiller.train()
    distiller.start_epoch(0, 10)  # hint_epochs None -> 10% of 10 = 1 epoch of hints
    _, losses = distiller.forward_train(images, targets)
    assert set(losses) == {"loss_hint"}
    distiller.start_epoch(1, 10)
    logits, losses = distiller.forward_train(images, targets)
    assert set(losses) == {"loss_ce", "loss_kd"}
    with torch.no_grad():
        teacher_logits = distiller.teacher(images)
    assert losses["loss_ce"].item() == pytest.approx(0.1 * ce_ref(logits, targets).item(), rel=1e-5)
    assert losses["loss_kd"].item() == pytest.approx(0.9 * kd_ref(logits.detach(), teacher_logits, 4.0).item(),
                                                     rel=1e-4)
    # at least one hint epoch even for short runs; explicit hint_epochs honoured
    distiller.start_epoch(0, 3)
    assert set(distiller.forward_train(images, targets)[1]) == {"loss_hint"}
    explicit = make_distiller("FitNets", two_stage=True, hint_epochs=3)
    explicit.train()
    explicit.start_epoch(2, 10)
    assert set(explicit.forward_train(images, targets)[1]) == {"loss_hint"}
    explicit.start_epoch(3, 10)
    assert set(explicit.forward_train(images, targets)[1]) == {"loss_ce", "loss_kd"}


def test_fitnets_one_stage_ignores_start_epoch():
    distiller = make_distiller("FitNets").train()
    distiller.start_epoch(0, 10)
    assert set(distiller.forward_train(*make_batch())[1]) == {"loss_ce", "loss_hint"}


def test_fitnets_stage1_trains_only_up_to_hint_layer():
    distiller = make_distiller("FitNets", two_stage=True).train()
    distiller.start_epoch(0, 10)
    teacher_before = snapshot(distiller.teacher)
    student = distiller.student
    _, losses = distiller.forward_train(*make_batch())
    sum(losses.values()).backward()
    for module in (student.layer3, student.layer4, student.fc):
        assert all(p.grad is None for p in module.parameters())
    for module in (student.conv1, student.bn1, student.layer1, student.layer2, distiller.regressor):
        assert all(p.grad is not None for p in module.parameters())
        assert any(p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    # an SGD step leaves the post-hint weights untouched (params with no grad are skipped)
    before = snapshot(student)
    torch.optim.SGD(distiller.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4).step()
    moved = {k for k in changed(before, student) if not k.endswith(("running_mean", "running_var",
                                                                    "num_batches_tracked"))}
    assert moved and not any(k.startswith(("layer3", "layer4", "fc")) for k in moved)
    assert changed(teacher_before, distiller.teacher) == set()


# ----------------------------------------------------------------------------- hooks cleanup
def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(EXPECTED_KEYS))
def test_close_removes_every_hook(name):
    # the trainer shares one teacher across methods: a finished method must leave no hooks on it
    distiller = make_distiller(name)
    models = [distiller.student] + ([distiller.teacher] if distiller.teacher is not None else [])
    if name in ("AT", "FitNets", "BYOT"):
        assert _hook_count(distiller.student) > 0
    distiller.close()
    assert all(_hook_count(m) == 0 for m in models)
    distiller.close()  # idempotent

"""Model builders, stems, feature taps, and checkpoints that load without project code."""
from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch import nn

from kd.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json
from kd.errors import UserError
from models import FeatureTap, apply_stem, build_resnet, find_stages, resolve_stem

# --- stems ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["ResNet18", "ResNet50"])
def test_cifar_stem(arch):
    model = build_resnet(arch, 5, "cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert model.conv1.out_channels == 64 and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 5


def test_imagenet_stem_is_torchvision_unchanged():
    model = build_resnet("ResNet18", 7, "imagenet")
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    plain = torchvision.models.resnet18(num_classes=7)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_unknown_stem_is_an_error():
    with pytest.raises(ValueError, match="stem"):
        apply_stem(torchvision.models.resnet18(), "tiny")


@pytest.mark.parametrize("stem,size,expected", [
    ("auto", 8, "cifar"), ("auto", 32, "cifar"), ("auto", 64, "cifar"), ("auto", 65, "imagenet"),
    ("auto", 128, "imagenet"), ("cifar", 224, "cifar"), ("imagenet", 16, "imagenet")])
def test_resolve_stem(stem, size, expected):
    assert resolve_stem(stem, size) == expected


def test_zero_init_residual_is_passed_to_torchvision():
    model = build_resnet("ResNet18", 3, "cifar", zero_init_residual=True)
    assert all(torch.count_nonzero(block.bn2.weight) == 0 for block in model.layer1)
    model = build_resnet("ResNet18", 3, "cifar")
    assert all(torch.count_nonzero(block.bn2.weight) > 0 for block in model.layer1)


# --- feature taps ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,channels", [("ResNet18", (64, 128, 256, 512)),
                                           ("ResNet50", (256, 512, 1024, 2048))])
def test_feature_tap_shapes_at_16px(arch, channels):
    model = build_resnet(arch, 4, "cifar").eval()
    stages = ("layer1", "layer2", "layer3", "layer4")
    assert [(s.module, s.channels) for s in find_stages(model)] == list(zip(stages, channels))
    tap = FeatureTap(model, stages)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 16, 16))
    assert tuple(logits.shape) == (2, 4)
    for stage, width, spatial in zip(stages, channels, (16, 8, 4, 2)):
        assert tuple(tap[stage].shape) == (2, width, spatial, spatial)
    # the hooks leave the model a plain torchvision ResNet
    assert type(model) is torchvision.models.ResNet

    tap.remove()
    before = tap["layer1"]
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    assert tap["layer1"] is before  # no longer updated


def test_feature_tap_outputs_carry_gradients():
    model = build_resnet("ResNet18", 3, "cifar")
    tap = FeatureTap(model, ["layer2"])
    model(torch.randn(2, 3, 8, 8)).sum().backward(retain_graph=True)
    assert tap["layer2"].requires_grad
    tap.remove()


# --- checkpoints -------------------------------------------------------------------------------------------

META = {"arch": "ResNet18", "num_classes": 3, "class_names": ["a", "b", "c"], "image_size": 16,
        "stem": "cifar", "epoch": 2, "best_accuracy": 0.5, "config": {"lr": 0.01, "scheduler": "step"},
        "data_fingerprint": "abc", "mean": [0.1, 0.2, 0.3], "torch_version": str(torch.__version__), "hint": None}
# str(): torch.__version__ is a TorchVersion object, which torch.load(weights_only=True) refuses


def test_checkpoint_loads_into_plain_torchvision(tmp_path):
    torch.manual_seed(0)
    model = build_resnet("ResNet18", 3, "cifar").to(memory_format=torch.channels_last)
    with torch.no_grad():  # make BatchNorm buffers non-default so they are checked too
        model(torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    model.eval()
    path = tmp_path / "ckpt" / "student_best.pth"
    save_checkpoint(path, model, META)

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "meta"} and raw["meta"] == META
    assert all(t.is_contiguous() for t in raw["model"].values())

    plain = apply_stem(torchvision.models.resnet18(num_classes=3), "cifar")
    plain.load_state_dict(raw["model"], strict=True)
    plain.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x.contiguous(memory_format=torch.channels_last)), atol=1e-5)

    assert load_checkpoint(path)["meta"]["class_names"] == ["a", "b", "c"]
    assert os.listdir(path.parent) == ["student_best.pth"]  # no temporary files left behind


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    write_json(tmp_path / "out" / "a.json", {"x": 1})
    write_json(tmp_path / "out" / "a.json", {"x": 2})  # replacing an existing file
    save_checkpoint(tmp_path / "out" / "m.pth", nn.Linear(2, 2), {"epoch": 1})
    assert sorted(os.listdir(tmp_path / "out")) == ["a.json", "m.pth"]
    assert (tmp_path / "out" / "a.json").read_text().strip().endswith("}")
    assert '"x": 2' in (tmp_path / "out" / "a.json").read_text()


def test_failing_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.pth"
    save_checkpoint(path, nn.Linear(2, 2), {"epoch": 1})
    old = path.read_bytes()

    def crash(handle):
        handle.write(b"half a checkpoint")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, crash)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.pth"]

    def disk_full(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError) as info:
        atomic_write(path, disk_full)
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.pth"]
    assert load_checkpoint(path)["meta"] == {"epoch": 1}


def test_disk_full_while_a_checkpoint_streams_is_one_line(tmp_path, monkeypatch):
    """torch.save writes straight into the file; a full disk in the middle must still give the one-line
    error (torch's writer would report it as a RuntimeError) and leave the old file intact."""
    from kd.engine import checkpoint
    path = tmp_path / "model.pth"
    save_checkpoint(path, build_resnet("ResNet18", 3, "cifar"), META)
    old = path.read_bytes()
    real_fdopen = os.fdopen

    class FillsUp:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.written += len(data)
            if self.written > 100_000:
                raise OSError(28, "No space left on device")
            return self.handle.write(data)

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    with pytest.raises(UserError) as info:
        save_checkpoint(path, build_resnet("ResNet18", 3, "cifar"), META)
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["model.pth"]


def test_load_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "teacher_best.pth"
    save_checkpoint(path, build_resnet("ResNet18", 3, "cifar"), META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "--retrain-teacher" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", [
    "text", "binary_garbage", "foreign_pickle", "plain_state_dict", "missing"])
def test_load_non_checkpoint_names_the_file(tmp_path, kind):
    path = tmp_path / "thing.pth"
    if kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif kind == "binary_garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "foreign_pickle":
        torch.save({"model": nn.Linear(2, 2)}, path)  # a whole module: refused by weights_only
    elif kind == "plain_state_dict":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)

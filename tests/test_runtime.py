"""Device and precision decisions, and evaluation that scores the saved checkpoint whatever the precision."""
from __future__ import annotations


import pytest
import torch

import final
from kd.data.load import load_image_data
from kd.engine import runtime
from kd.engine.checkpoint import load_checkpoint
from kd.engine.evaluation import evaluate
from kd.engine.run import RunSpec
from kd.engine.runtime import Runtime, resolve_precision
from kd.engine.trainer import fit
from kd.methods.baseline import Baseline
from kd.results.metrics import prediction_metrics
from models import build_resnet

CUDA0 = torch.device("cuda", 0)


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                   ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_a_gpu_counts_native_bf16_only(monkeypatch, capability, expected):
    # V100 (7.0) and T4 (7.5) only emulate bf16, which torch.cuda.is_bf16_supported() calls support
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", CUDA0) == expected
    assert asked == [CUDA0]  # decided for the device actually used


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "fp32"),  # e.g. AMD Zen 1
                                             ({"avx512f", "avx512bw", "avx512_vnni"}, "fp32"),  # emulated bf16
                                             ({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16", "amx_tile"}, "bf16"),
                                             ({"asimd", "bf16"}, "bf16"), (set(), "fp32")])
def test_auto_precision_on_a_cpu_counts_native_bf16_only(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_explicit_precisions_and_emulated_bf16_warning(monkeypatch, kd_log):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert resolve_precision("bf16", CUDA0) == "bf16"  # asked for: kept, with a warning
    assert "only emulates bf16" in kd_log.text


def test_evaluation_scores_the_checkpoint_in_float32(tmp_path, make_image_folder):
    """Trained under bf16 autocast, the recorded val metrics are those of the saved checkpoint loaded
    and evaluated in float32 (under autocast they would be the bf16 forward's)."""
    root = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 6})
    data = load_image_data(root, 8, hflip=False, num_workers=0)
    cfg = final.create_student_config(epochs=1, batch_size=8)
    torch.manual_seed(0)
    spec = RunSpec("Baseline", cfg, 0, tmp_path / "tb", tmp_path / "ckpt" / "Baseline", {})
    result, _, best_val = fit(Baseline(build_resnet("ResNet18", 3, "cifar")), data, spec,
                           Runtime(torch.device("cpu"), "bf16", channels_last=True))

    plain = build_resnet("ResNet18", 3, "cifar")
    plain.load_state_dict(load_checkpoint(tmp_path / "ckpt" / "Baseline_best.pth")["model"])
    fp32_runtime = Runtime(torch.device("cpu"), "fp32", channels_last=True)  # the same kernels as in training
    fp32 = evaluate(Baseline(fp32_runtime.place(plain)), data, "val", 8, fp32_runtime)
    assert best_val.probs.dtype == torch.float32
    assert torch.allclose(best_val.probs, fp32.probs, rtol=0, atol=1e-5)
    assert result.best_accuracy == fp32.accuracies["student"]
    recorded, reloaded = (prediction_metrics(e.probs, e.labels, None) for e in (best_val, fp32))
    assert recorded.nll == pytest.approx(reloaded.nll, rel=1e-5)
    assert recorded.ece == pytest.approx(reloaded.ece, abs=1e-5)


class _LoggedStopwatch(runtime.Stopwatch):
    def __init__(self, log: list[str]):
        super().__init__(torch.device("cpu"))
        self.log = log

    def start(self) -> None:
        self.log.append("start")
        super().start()

    def stop(self) -> None:
        self.log.append("stop")
        super().stop()

    def seconds(self) -> float:
        self.log.append("read")
        return super().seconds()


class _LoggedRuntime(Runtime):
    """The CPU runtime, writing its device synchronisations and stopwatch uses to one list."""

    def __init__(self, log: list[str]):
        super().__init__(torch.device("cpu"), "fp32", channels_last=False)
        object.__setattr__(self, "log", log)  # a frozen dataclass

    def synchronize(self) -> None:
        self.log.append("sync")

    def stopwatch(self) -> runtime.Stopwatch:
        return _LoggedStopwatch(self.log)


def test_epoch_timing_waits_for_the_device_at_its_boundaries(tmp_path, make_image_folder):
    """Each run's steps are timed by its stopwatch, and the epoch's clock starts and stops on an idle
    device: on a GPU, earlier work stays out of the epoch and its last step is in it."""
    root = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 2})
    data = load_image_data(root, 8, hflip=False, num_workers=0)
    log: list[str] = []
    cfg = final.create_student_config(epochs=1, batch_size=8)
    spec = RunSpec("Baseline", cfg, 0, tmp_path / "tb", tmp_path / "ckpt" / "Baseline", {})
    fit(Baseline(build_resnet("ResNet18", 3, "cifar")), data, spec, _LoggedRuntime(log))
    epoch = log[:log.index("read") + 1]
    assert epoch == ["sync"] + ["start", "stop"] * 3 + ["sync", "read"]  # 24 images, batch 8: 3 steps

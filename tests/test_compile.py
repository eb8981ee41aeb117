"""experiment.compile: the training step through torch.compile trains as the eager step does (on the CPU, with
Inductor), feature hooks included, and leaves the models as plain as ever."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import final
from kd.engine.run import RunSpec
from kd.engine.runtime import Runtime, resolve_compile
from kd.engine.trainer import fit_together
from kd.data.load import load_image_data
from kd.methods.baseline import Baseline
from kd.methods.fitnets import FitNets
from models.cifar import CIFAR_MODELS


def train_two_epochs(data, tmp_path, compiled: bool) -> tuple[list, list[dict]]:
    """Baseline and FitNets (a hook on the teacher and one on the student) trained together, as the
    experiment trains teacher-based methods, from the same start in both modes."""
    torch.manual_seed(0)
    teacher = CIFAR_MODELS["resnet8"](num_classes=3).eval()
    students = [CIFAR_MODELS["resnet8"](num_classes=3) for _ in range(2)]
    students[1].load_state_dict(students[0].state_dict())
    distillers = [Baseline(students[0]), FitNets(students[1], teacher, **final.METHODS_CONFIG["FitNets"])]
    cfg = final.create_student_config(epochs=2, batch_size=8, lr=0.05)
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=False, compile=compiled)
    jobs = [(d, RunSpec(name, cfg, 0, tmp_path / f"tb_{compiled}_{name}", None, {}))
            for d, name in zip(distillers, ("Baseline", "FitNets"))]
    outcomes = fit_together(jobs, data, runtime)
    return [d.student.state_dict() for d in distillers], [outcome[1].history for outcome in outcomes]


def test_compiled_steps_train_as_the_eager_ones(tmp_path, make_image_folder, one_thread):
    root = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 3}, size=8)
    data = load_image_data(root, 8, hflip=True, num_workers=0)
    counters.clear()
    eager_states, eager = train_two_epochs(data, tmp_path, compiled=False)
    assert counters["stats"]["unique_graphs"] == 0
    compiled_states, compiled = train_two_epochs(data, tmp_path, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 2  # each method's step was captured (not run eagerly)
    for eager_history, compiled_history in zip(eager, compiled):
        for a, b in zip(eager_history, compiled_history):
            assert a["first_batch_sha256"] == b["first_batch_sha256"]  # the same batches
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-3)
            assert b["val"] == a["val"]
    assert set(compiled[1][0]["train_loss"]) == {"loss_ce", "loss_hint"}  # the hooks' features reached the loss
    for eager_state, compiled_state in zip(eager_states, compiled_states):
        assert list(compiled_state) == list(eager_state)  # plain keys: no "_orig_mod." in a saved student
        for key, value in eager_state.items():
            if value.is_floating_point():
                torch.testing.assert_close(compiled_state[key], value, rtol=1e-3, atol=1e-4)


def test_auto_compiles_nowhere_until_a_measurement_shows_a_gain():
    assert resolve_compile("auto") is False
    assert resolve_compile(True) is True and resolve_compile(False) is False

"""Training the teacher-based methods together (one teacher forward per batch) changes nothing in the
results: same seed, same records as training them one by one (methods of every kind: logits, stage maps,
pooled features with CRD's memory banks, ReviewKD's pre-activations, the warm-ups of DKD and ReviewKD); only
the teacher's work is done once, for all sixteen teacher-based methods, whose hooks all fill from that forward."""
from __future__ import annotations

import math

import pytest
import torch

import final
from kd.data.load import load_image_data
from kd.engine import run
from kd.engine.run import RunSpec
from kd.engine.runtime import Runtime
from kd.engine.trainer import fit_together
from kd.experiment.plan import method_groups
from kd.methods import METHODS
from models import build_resnet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

# the records test: KD, AT, FitNets, and newer methods of each kind (logits with a warm-up, pooled features
# with memory banks and per-image indices, pre-activation stage inputs with a warm-up)
TEACHER_BASED = ["KD", "AT", "FitNets", "DKD", "CRD", "ReviewKD"]
# the forward count: every teacher-based method, each with its own hooks on the one teacher
ALL_TEACHER_BASED = [name for name, method in METHODS.items() if method.distiller.needs_teacher]
CRD_NCE_K = 16  # negatives per anchor: no more than the other classes' images (16 here), none repeated
COMPARED = ("method", "seed", "best_accuracy", "final_accuracy", "best_epoch", "student_init_sha256",
            "first_batch_sha256", "nll", "ece")


def _essentials(records: list[dict]) -> list[dict]:
    return [{key: r[key] for key in COMPARED} | {"losses": [h["train_loss"] for h in r["history"]],
                                                  "scores": [h["val"] for h in r["history"]],
                                                  "weights": [h.get("loss_weights") for h in r["history"]]}
            for r in records if r["method"] != "Teacher"]


def test_shared_teacher_gives_the_same_records_as_one_by_one(tiny_config, make_image_folder, tmp_path):
    make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 4})
    config = tiny_config
    config["student"].update(epochs=2)
    config["methods"]["FitNets"].update(two_stage=True)  # a stage switch must not break the lockstep
    config["methods"]["CRD"].update(nce_k=CRD_NCE_K)
    config["methods"]["DKD"].update(warmup_epochs=2)  # DKD changes its loss weight between epochs
    config["experiment"].update(methods=["Baseline"] + TEACHER_BASED, share_teacher=False)
    one_by_one = final.main(config)  # also trains the teacher that the second run reuses
    config["experiment"]["share_teacher"] = True
    shared = final.main(config)

    assert next(r for r in shared if r["method"] == "Teacher")["reused"] is True
    assert [r["method"] for r in shared] == ["Teacher", "Baseline"] + TEACHER_BASED
    assert _essentials(shared) == _essentials(one_by_one)
    assert all(r["status"] == "ok" and r["protocol"] == "common" for r in shared)  # all in the shared group
    weights = {r["method"]: [h.get("loss_weights") for h in r["history"]] for r in shared[1:]}
    # ReviewKD's warm-up unset: its share of 2 epochs rounds to 0, so the warm-up is the least, 1 epoch
    assert weights["DKD"] == [{"dkd": 0.5}, {"dkd": 1.0}] and weights["ReviewKD"] == [{"reviewkd": 1.0}] * 2
    assert [r["warmup_epochs"] for r in shared if r["method"] in ("DKD", "ReviewKD")] == [2, 1]


def test_teacher_runs_once_per_batch_for_all_methods_together(tmp_path, make_image_folder, monkeypatch):
    root = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 2})
    data = load_image_data(root, 8, hflip=False, num_workers=0)
    teacher = build_resnet("ResNet18", 3, "cifar")
    cfg = final.create_student_config(epochs=1, batch_size=8)
    settings = final.default_config()["methods"]
    settings["CRD"].update(nce_k=CRD_NCE_K)
    monkeypatch.setattr(run, "_save", lambda *args: None)  # no checkpoints: not what is counted here
    assert len(ALL_TEACHER_BASED) == 18
    jobs = []
    for name in ALL_TEACHER_BASED:
        distiller = METHODS[name].distiller(build_resnet("ResNet18", 3, "cifar"), teacher,
                                            **METHODS[name].resolve(settings[name], 1))
        jobs.append((distiller, RunSpec(name, cfg, 0, tmp_path / "tb" / name, tmp_path / "ckpt" / name, {})))
    calls = []  # counted from here: building the feature methods probed the teacher's stages once
    teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        outcomes = fit_together(jobs, data, Runtime(torch.device("cpu"), "fp32", channels_last=False))
    finally:
        for distiller, _ in jobs:
            distiller.close()

    batches = 3  # 24 training images, batch size 8
    # one forward of each batch for all 18 methods, and one of its strong view for MLKD, which steps after the
    # others (their cached forward is not replaced before they read it); evaluation never runs the teacher here
    assert len(calls) == 2 * batches
    assert [log.history[0]["images"] for _, log, _ in outcomes] == [24] * len(ALL_TEACHER_BASED)
    losses = {name: log.history[0]["train_loss"] for name, (_, log, _) in zip(ALL_TEACHER_BASED, outcomes)}
    # every method's own term was computed from that one forward (its hooks on the teacher all filled)
    assert {"loss_crd", "loss_reviewkd", "loss_sp", "loss_rkd", "loss_pkt", "loss_dkd", "loss_dist"} <= set().union(
        *(set(loss) for loss in losses.values()))
    assert all(len(loss) >= 2 and all(map(math.isfinite, loss.values())) for loss in losses.values()), losses


def test_method_groups_keep_order_and_the_switch():
    methods = ["Baseline", "KD", "DML", "AT", "BYOT", "FitNets"]
    assert method_groups(methods, share_teacher=True) == [["Baseline"], ["KD", "AT", "FitNets"], ["DML"], ["BYOT"]]
    assert method_groups(methods, share_teacher=False) == [[m] for m in methods]

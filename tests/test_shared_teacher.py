"""Training the teacher-based methods together (one teacher forward per batch) changes nothing in the
results: same seed, same records as training them one by one; only the teacher's work is done once."""
from __future__ import annotations

import torch

import final
from kd.at import AT
from kd.data import load_image_data
from kd.experiment import method_groups
from kd.fitnets import FitNets
from kd.hinton import KD
from kd.runtime import Runtime
from kd.trainer import RunSpec, fit_together
from models import build_resnet

TEACHER_BASED = ["KD", "AT", "FitNets"]
COMPARED = ("method", "seed", "best_accuracy", "final_accuracy", "best_epoch", "student_init_sha256",
            "first_batch_sha256", "nll", "ece")


def _essentials(records: list[dict]) -> list[dict]:
    return [{key: r[key] for key in COMPARED} | {"losses": [h["train_loss"] for h in r["history"]],
                                                  "scores": [h["val"] for h in r["history"]]}
            for r in records if r["method"] != "Teacher"]


def test_shared_teacher_gives_the_same_records_as_one_by_one(tiny_config, make_image_folder, tmp_path):
    make_image_folder(tmp_path / "data", per_class={"train": 10, "val": 4})
    config = tiny_config
    config["student"].update(epochs=2)
    config["methods"]["FitNets"].update(two_stage=True)  # a stage switch must not break the lockstep
    config["experiment"].update(methods=["Baseline"] + TEACHER_BASED, share_teacher=False)
    one_by_one = final.main(config)  # also trains the teacher that the second run reuses
    config["experiment"]["share_teacher"] = True
    shared = final.main(config)

    assert next(r for r in shared if r["method"] == "Teacher")["reused"] is True
    assert [r["method"] for r in shared] == ["Teacher", "Baseline"] + TEACHER_BASED
    assert _essentials(shared) == _essentials(one_by_one)
    assert all(r["status"] == "ok" for r in shared)


def test_teacher_runs_once_per_batch_for_all_methods_together(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 2})
    data = load_image_data(root, 8, hflip=False, num_workers=0)
    teacher = build_resnet("ResNet18", 3, "cifar")
    cfg = final.create_student_config(epochs=1, batch_size=8)
    settings = final.default_config()["methods"]
    jobs = []
    for cls in (KD, AT, FitNets):
        name = cls.__name__
        distiller = cls(build_resnet("ResNet18", 3, "cifar"), teacher, **settings[name])
        jobs.append((distiller, RunSpec(name, cfg, 0, tmp_path / "tb" / name, tmp_path / "ckpt" / name, {})))
    calls = []  # counted from here: building AT and FitNets probed the teacher's stages once
    teacher.register_forward_hook(lambda *_: calls.append(1))
    outcomes = fit_together(jobs, data, Runtime(torch.device("cpu"), "fp32", channels_last=False))

    batches = 3  # 24 training images, batch size 8
    assert len(calls) == batches  # not 3 methods x 3 batches: evaluation never runs the teacher here
    assert [result["history"][0]["images"] for result, _ in outcomes] == [24, 24, 24]


def test_method_groups_keep_order_and_the_switch():
    methods = ["Baseline", "KD", "DML", "AT", "BYOT", "FitNets"]
    assert method_groups(methods, share_teacher=True) == [["Baseline"], ["KD", "AT", "FitNets"], ["DML"], ["BYOT"]]
    assert method_groups(methods, share_teacher=False) == [[m] for m in methods]

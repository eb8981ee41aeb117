"""Fair comparison: within a seed every method starts from the same student weights and sees the same
data in the same order; another seed changes both. Also every method runs end to end through main."""
from __future__ import annotations

import json

import pytest
import torch

import final
from kd.experiment.plan import method_groups
from kd.methods import METHODS
from models import build_model, build_resnet, model_spec


@pytest.fixture(scope="module")
def two_seed_records(module_dir, make_image_folder):
    base = module_dir
    # 24 images: whole batches of 8. With 18 the last batch holds 2 images, whose BatchNorm statistics at
    # layer4's 1x1 make features ~1e8, and SP's and PKT's students turn non-finite (recorded as failed)
    make_image_folder(base / "data", per_class={"train": 8, "val": 2})
    # The teacher's lr 0.01: after one epoch at 0.1 its eval-mode BatchNorm statistics lag its weights and its
    # logits reach ~1e8, and NormKD's loss, which grows with the square of their spread, is no longer finite
    config = final.default_config()
    config["teacher"].update(model="ResNet18", epochs=1, batch_size=8, lr=0.01)
    config["student"].update(epochs=1, batch_size=8)
    config["experiment"].update(data_dir=str(base / "data"), methods=list(METHODS), seeds=[0, 1],
                                image_size=8, device="cpu", precision="fp32", num_workers=0,
                                logs_dir=str(base / "logs"), checkpoints_dir=str(base / "checkpoints"))
    return final.main(config), base


def test_every_method_runs_and_writes_a_record(two_seed_records):
    records, base = two_seed_records
    # in training order: the teacher-based methods train together where the first of them (KD) stands
    order = [m for group in method_groups(list(METHODS), share_teacher=True) for m in group]
    assert sorted(order) == sorted(METHODS) and order[:2] == ["Baseline", "KD"] and order[-2:] == ["DML", "BYOT"]
    ran = [(r["method"], r["seed"]) for r in records if r["method"] != "Teacher"]
    assert ran == [(m, s) for s in (0, 1) for m in order]
    assert all(r["status"] == "ok" for r in records)
    stored = json.loads(next((base / "logs").glob("final_experiment_*/comparison_results.json")).read_text())
    assert [r["method"] for r in stored] == ["Teacher"] + order * 2


def test_same_seed_same_start_and_same_first_batch(two_seed_records):
    records, _ = two_seed_records
    for seed in (0, 1):
        runs = [r for r in records if r["method"] != "Teacher" and r["seed"] == seed]
        assert len({r["student_init_sha256"] for r in runs}) == 1
        assert len({r["first_batch_sha256"] for r in runs}) == 1


def test_another_seed_starts_elsewhere(two_seed_records):
    records, _ = two_seed_records
    baseline = {r["seed"]: r for r in records if r["method"] == "Baseline"}
    assert baseline[0]["student_init_sha256"] != baseline[1]["student_init_sha256"]
    assert baseline[0]["first_batch_sha256"] != baseline[1]["first_batch_sha256"]


def test_teacher_column_and_saved_students(two_seed_records):
    records, base = two_seed_records
    columns = {r["method"]: r["teacher"] for r in records}
    without_teacher = {"Teacher": "None", "Baseline": "None", "DML": "None (mutual)", "BYOT": "None (self)"}
    assert columns == {**{m: "ResNet18" for m in METHODS}, **without_teacher}
    students = {p.name for p in (base / "checkpoints" / "students").glob("*_best.pth")}
    assert "KD_ResNet18_seed1_best.pth" in students
    assert {"DML_ResNet18_seed0_peer0_best.pth", "DML_ResNet18_seed0_peer1_best.pth"} <= students
    byot = next(r for r in records if r["method"] == "BYOT")
    assert len(byot["exit_accuracies"]) == 4 and byot["exit_accuracies"][-1] == byot["best_accuracy"]
    dml = next(r for r in records if r["method"] == "DML")
    assert len(dml["peer_accuracies"]) == 2


def test_pretrained_students_start_alike_per_seed_with_a_new_head(tmp_path, make_image_folder):
    # starting weights from a file (a 1000-class CIFAR-stem ResNet18): every method of a seed starts from
    # them with the same new classifier; another seed draws another classifier, never other weights
    make_image_folder(tmp_path / "data", per_class={"train": 6, "val": 2})
    torch.manual_seed(123)
    pretrained = build_resnet("ResNet18", 1000, "cifar").state_dict()
    torch.save(pretrained, tmp_path / "start.pth")
    config = final.default_config()
    config["teacher"].update(model="ResNet18", epochs=1, batch_size=8)
    config["student"].update(epochs=1, batch_size=8, weights=str(tmp_path / "start.pth"))
    config["experiment"].update(data_dir=str(tmp_path / "data"), methods=["Baseline", "KD", "DML"], seeds=[0, 1],
                                image_size=8, stem="cifar", device="cpu", precision="fp32", num_workers=0)
    records = [r for r in final.main(config) if r["method"] != "Teacher"]
    for seed in (0, 1):
        assert len({r["student_init_sha256"] for r in records if r["seed"] == seed}) == 1
    assert len({r["student_init_sha256"] for r in records}) == 2

    spec = model_spec(config["student"], 8, "cifar")
    starts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        starts.append(build_model(spec, 3).state_dict())
    for key, value in starts[0].items():
        if key.startswith("fc."):
            assert value.shape[0] == 3 and not torch.equal(value, starts[1][key])
        else:
            assert torch.equal(value, pretrained[key]) and torch.equal(value, starts[1][key])

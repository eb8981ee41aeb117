"""Fair comparison: within a seed every method starts from the same student weights and sees the same
data in the same order; another seed changes both. Also every method runs end to end through main."""
from __future__ import annotations

import json

import pytest

import final
from kd import METHODS


@pytest.fixture(scope="module")
def two_seed_records(tmp_path_factory, make_image_folder):
    base = tmp_path_factory.mktemp("fairness")
    make_image_folder(base / "data", per_class={"train": 6, "val": 2})
    config = final.default_config()
    config["teacher"].update(model="ResNet18", epochs=1, batch_size=8)
    config["student"].update(epochs=1, batch_size=8)
    config["experiment"].update(data_dir=str(base / "data"), methods=list(METHODS), seeds=[0, 1],
                                image_size=8, device="cpu", precision="fp32", num_workers=0,
                                logs_dir=str(base / "logs"), checkpoints_dir=str(base / "checkpoints"))
    return final.main(config), base


def test_every_method_runs_and_writes_a_record(two_seed_records):
    records, base = two_seed_records
    ran = [(r["method"], r["seed"]) for r in records if r["method"] != "Teacher"]
    assert ran == [(m, s) for s in (0, 1) for m in METHODS]
    assert all(r["status"] == "ok" for r in records)
    stored = json.loads(next((base / "logs").glob("final_experiment_*/comparison_results.json")).read_text())
    assert [r["method"] for r in stored] == ["Teacher"] + list(METHODS) * 2


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
    assert columns == {"Teacher": "None", "Baseline": "None", "KD": "ResNet18", "AT": "ResNet18",
                       "FitNets": "ResNet18", "DML": "None (mutual)", "BYOT": "None (self)"}
    students = {p.name for p in (base / "checkpoints" / "students").glob("*_best.pth")}
    assert "KD_ResNet18_seed1_best.pth" in students
    assert {"DML_ResNet18_seed0_peer0_best.pth", "DML_ResNet18_seed0_peer1_best.pth"} <= students
    byot = next(r for r in records if r["method"] == "BYOT")
    assert len(byot["exit_accuracies"]) == 4 and byot["exit_accuracies"][-1] == byot["best_accuracy"]
    dml = next(r for r in records if r["method"] == "DML")
    assert len(dml["peer_accuracies"]) == 2

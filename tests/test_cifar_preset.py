"""--preset cifar100 (final.CIFAR100_PRESET, kd/experiment/presets.py): an end-to-end run of every method on two zoo
models, the tables' per-pair settings (and the user's --set winning over them), --demo with it refused, the
step_size list (MultiStepLR's milestones), and a teacher checkpoint in the layout RepDistiller and mdistiller
publish. Tiny data (tests/test_cifar.py's 4-class file): well under a minute on a
2-core CPU."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_cifar import CLASSES, write_cifar100

import final
import run_experiment
from kd.data.cifar import load_cifar
from kd.engine.run import lr_factor
from kd.errors import UserError
from kd.experiment.presets import describe_pair_settings
from kd.methods import METHODS
from models.cifar import CIFAR_MODELS

VAL_IMAGES = 8
TINY = ["--seeds", "0", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
        "--set", f"experiment.cifar_val_images={VAL_IMAGES}"]


def _folder(root: Path) -> Path:
    folders = list((root / "logs").glob("final_experiment_*"))
    assert len(folders) == 1, folders
    return folders[0]


def _error_line(err: str) -> str:
    """The one line of a refused run (logged warnings aside, e.g. that the tiny file is not the official one)."""
    lines = [line for line in err.splitlines() if line.strip() and not re.match(r"\d\d:\d\d:\d\d WARNING ", line)]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _config(*argv: str) -> dict:
    """The config a command line gives (preset, the pair's settings, --set), validated, without running."""
    return final.validate_config(run_experiment.config_from_args(run_experiment.build_parser().parse_args(list(argv))))


# --- 1. every method end to end on two zoo models ----------------------------------------------------------------

def test_every_method_runs_under_the_preset_on_zoo_models(tmp_path, capsys):
    root = write_cifar100(tmp_path / "c100")
    code = run_experiment.cli(["--preset", "cifar100", "--data", f"cifar100:{root}", "--methods", "all",
                               "--teacher-epochs", "1", "--student-epochs", "1", *TINY,
                               "--set", "teacher.model=resnet20", "--set", "student.model=resnet8",
                               "--set", "methods.CRD.nce_k=16"])  # 30 other-class images to draw 16 from
    out = capsys.readouterr().out
    assert code == 0, out
    folder = _folder(tmp_path)
    records = json.loads((folder / "comparison_results.json").read_text())
    assert sorted(r["method"] for r in records) == sorted(["Teacher", *METHODS]) and len(METHODS) == 21
    assert {r["method"]: r["status"] for r in records} == {m: "ok" for m in ["Teacher", *METHODS]}
    assert all(r["epochs"] == 1 for r in records)

    config = json.loads((folder / "experiment_summary.json").read_text())["config"]
    for role, model in (("teacher", "resnet20"), ("student", "resnet8")):  # the tables' recipe, epochs overridden
        assert {key: config[role][key] for key in ("model", "epochs", "lr", "momentum", "weight_decay", "scheduler",
                                                   "step_size", "gamma", "warmup_epochs", "batch_size")} == {
            "model": model, "epochs": 1, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "scheduler": "step",
            "step_size": [150, 180, 210], "gamma": 0.1, "warmup_epochs": 0, "batch_size": 8}
    assert config["experiment"]["preset"] == "cifar100" and config["experiment"]["seeds"] == [0]
    assert config["experiment"]["image_size"] == 32 and config["experiment"]["hflip"] is True
    # resnet20 -> resnet8 is none of the tables' pairs: the methods keep their defaults
    assert config["methods"]["DKD"]["nckd_weight"] == 8.0 and config["methods"]["ReviewKD"]["beta"] == 5.0

    # the plan: which split trains, which selects, which reports
    assert "training on the CIFAR training set less 8 images (stratified, seed 0) (40)" in out
    assert "selection (best epoch) on those 8" in out and "reporting on the test set (12)" in out
    # parameter counts at 4 classes: the 100-class counts (tests/test_cifar_zoo.py) less the classifier's
    # 64 x 100 weights + 100 biases, plus 64 x 4 + 4
    resnet8 = 83_892 - (64 * 100 + 100) + (64 * 4 + 4)
    resnet20 = 278_324 - (64 * 100 + 100) + (64 * 4 + 4)
    assert (resnet8, resnet20) == (77_652, 272_084)
    assert sum(p.numel() for p in CIFAR_MODELS["resnet8"](num_classes=4).parameters()) == resnet8
    assert "teacher: resnet20 (cifar resnet20, library stem, 0.27M parameters)" in out
    assert "students: resnet8 (cifar resnet8, library stem, 0.08M parameters)" in out


# --- 2. the tables' settings for a pair, and the user's own ------------------------------------------------------

def test_check_shows_the_pairs_settings_and_the_users_own(tmp_path, capsys, one_thread):
    root = write_cifar100(tmp_path / "c100")
    pair = ["--set", "teacher.model=resnet56", "--set", "student.model=resnet20"]
    told = describe_pair_settings(_config("--preset", "cifar100", *pair))
    assert told == ("preset cifar100: the tables' settings for resnet56 -> resnet20: methods.DKD.nckd_weight 2.0, "
                    "methods.ReviewKD.beta 0.6, methods.CTKD_DKD.nckd_weight 2.0")
    code = run_experiment.cli(["--preset", "cifar100", "--data", f"cifar100:{root}", "--check", "--methods", "DKD",
                               *TINY, *pair, "--set", "methods.DKD.nckd_weight=3",
                               "--batch-size", "2"])  # the estimate's timed steps: cheaper
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("preset cifar100:")]
    assert lines == [("preset cifar100: the tables' settings for resnet56 -> resnet20: "
                      "methods.DKD.nckd_weight 2.0 (you set 3), methods.ReviewKD.beta 0.6, "
                      "methods.CTKD_DKD.nckd_weight 2.0")]
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--set", "teacher.model=resnet56", "--set", "student.model=resnet20"],
     {"teacher.lr": 0.05, "student.lr": 0.05, "DKD.nckd_weight": 2.0, "ReviewKD.beta": 0.6}),
    (["--set", "teacher.model=resnet56", "--set", "student.model=resnet20", "--set", "methods.DKD.nckd_weight=3"],
     {"DKD.nckd_weight": 3, "ReviewKD.beta": 0.6}),
    (["--set", "teacher.model=cifar/vgg13", "--set", "student.model=MobileNetV2"],
     {"teacher.lr": 0.05, "student.lr": 0.01, "DKD.nckd_weight": 6.0, "ReviewKD.beta": 5.0}),
    (["--set", "teacher.model=cifar/vgg13", "--set", "student.model=MobileNetV2", "--set", "student.lr=0.02"],
     {"teacher.lr": 0.05, "student.lr": 0.02, "DKD.nckd_weight": 6.0}),
    # under the preset, bare vgg13 (elsewhere torchvision's) is the tables' model: the tables' pair
    (["--set", "teacher.model=vgg13", "--set", "student.model=MobileNetV2"],
     {"teacher.model": "cifar/vgg13", "student.lr": 0.01, "DKD.nckd_weight": 6.0}),
    (["--set", "student.model=ShuffleV1"], {"teacher.lr": 0.05, "student.lr": 0.01, "DKD.nckd_weight": 8.0}),
    (["--set", "teacher.model=ShuffleV2", "--set", "student.model=resnet8"], {"teacher.lr": 0.01, "student.lr": 0.05}),
    ([], {"teacher.lr": 0.05, "student.lr": 0.05, "DKD.nckd_weight": 8.0, "ReviewKD.beta": 5.0}),  # 32x4 -> 8x4
    (["--set", "teacher.model=resnet32x4", "--set", "student.model=ShuffleV2"],
     {"student.lr": 0.01, "ReviewKD.beta": 8.0, "DKD.nckd_weight": 8.0}),
], ids=["resnet56-resnet20", "user-dkd", "vgg13-mv2", "user-lr", "bare-vgg13", "shufflev1", "shufflev2-teacher",
        "default-pair", "resnet32x4-shufflev2"])
def test_the_preset_gives_a_pair_the_tables_settings_where_the_user_leaves_them(argv, expected):
    config = _config("--preset", "cifar100", *argv)
    got = {}
    for key in expected:
        section, name = key.split(".")
        got[key] = config[section][name] if section in ("teacher", "student") else config["methods"][section][name]
    assert got == expected
    assert config["experiment"]["preset"] == "cifar100"


def test_without_the_preset_the_pair_keeps_the_defaults():
    config = _config("--set", "teacher.model=resnet56", "--set", "student.model=MobileNetV2")
    assert config["student"]["lr"] == 0.01 == final.STUDENT_CONFIG["lr"]  # the default's own 0.01, not the table's
    assert config["teacher"]["lr"] == final.TEACHER_CONFIG["lr"] == 0.1
    assert config["methods"]["DKD"]["nckd_weight"] == 8.0 and config["experiment"]["preset"] is None
    assert config["student"]["step_size"] == 30 and config["student"]["epochs"] == 50


def test_bare_vgg_names_are_torchvision_s_outside_the_preset_and_the_tables_under_it():
    assert _config("--set", "teacher.model=vgg13")["teacher"]["model"] == "vgg13"
    assert _config("--preset", "cifar100", "--set", "teacher.model=VGG13")["teacher"]["model"] == "cifar/VGG13"
    # the preset named by its key alone gives the pair its settings too, as the plan then says
    config = _config("--set", "experiment.preset=cifar100", "--set", "teacher.model=resnet56",
                     "--set", "student.model=resnet20")
    assert config["methods"]["DKD"]["nckd_weight"] == 2.0 and config["methods"]["ReviewKD"]["beta"] == 0.6


def test_library_weights_for_a_zoo_model_are_one_line(tmp_path, capsys):
    root = write_cifar100(tmp_path / "c100")
    code = run_experiment.cli(["--preset", "cifar100", "--data", f"cifar100:{root}", "--check", *TINY,
                               "--set", "student.weights=true"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [(
        "error: resnet8x4 has no library weights (weights: True): set weights to a checkpoint file "
        "(RepDistiller's or mdistiller's {\"model\": ...} files load) or null")]


def test_demo_with_the_preset_is_refused(capsys):
    code = run_experiment.cli(["--demo", "--preset", "cifar100"])
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and "--demo" in line and "--preset cifar100" in line
    assert not Path("data").exists()  # the digits were not exported


# --- 4. step_size as a list of epochs ----------------------------------------------------------------------------

def _factors(step_size, epochs: int = 5, steps_per_epoch: int = 3, warmup: int = 0) -> list[float]:
    cfg = {"scheduler": "step", "step_size": step_size, "gamma": 0.1, "warmup_epochs": warmup, "epochs": epochs}
    factor = lr_factor(cfg, steps_per_epoch)
    return [factor(step) for step in range(epochs * steps_per_epoch)]


@pytest.mark.parametrize("step_size, expected", [
    ([2, 4], [1.0] * 6 + [0.1] * 6 + [0.01] * 3),
    (2, [1.0] * 6 + [0.1] * 6 + [0.01] * 3),
    ([1, 4], [1.0] * 3 + [0.1] * 9 + [0.01] * 3),  # a list is not "every step_size epochs"
    (1, [1.0] * 3 + [0.1] * 3 + [0.01] * 3 + [0.001] * 3 + [0.0001] * 3),
    ([4, 1], [1.0] * 3 + [0.1] * 9 + [0.01] * 3),  # milestones in any order, as MultiStepLR
    ([7], [1.0] * 15),  # past the last epoch: never
])
def test_step_factors(step_size, expected):
    assert _factors(step_size) == pytest.approx(expected, rel=1e-12)


def test_step_list_matches_multisteplr():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1, 3], gamma=0.1)
    per_epoch = []
    for _ in range(5):
        per_epoch.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert _factors([1, 3], steps_per_epoch=2) == pytest.approx([f for f in per_epoch for _ in range(2)], rel=1e-12)


def test_warmup_then_the_list():
    # 1 warm-up epoch of 2 steps: 1/2, 2/2; then x0.1 from epoch 2
    assert _factors([2], epochs=3, steps_per_epoch=2, warmup=1) == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.1, 0.1])


@pytest.mark.parametrize("value", ["[0,3]", "[]", "[2.5]", "0", "[-1]"])
def test_bad_step_sizes_are_refused(value, capsys):
    with pytest.raises(UserError, match="step_size"):
        _config("--preset", "cifar100", "--set", f"student.step_size={value}")
    code = run_experiment.cli(["--preset", "cifar100", "--check", "--set", f"student.step_size={value}"])
    assert code == 2 and "step_size" in _error_line(capsys.readouterr().err)


# --- 5. a teacher checkpoint in the published layout -------------------------------------------------------------

def _normalized(images: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """uint8 images scaled by the train split's per-channel mean and (sample) std."""
    pixels = train.double().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = pixels.mean(dim=1).view(1, 3, 1, 1), pixels.std(dim=1).view(1, 3, 1, 1)
    return ((images.double() / 255 - mean) / std).float()


def _published_teacher(path: Path, root: Path) -> torch.nn.Module:
    """A resnet8 trained a few steps on the file's training split (6 of 8 val images right, 8 of 12 test images:
    neither chance nor perfect), saved as RepDistiller's train_teacher.py saves (epoch, model, best_acc, optimizer)."""
    data = load_cifar(f"cifar100:{root}", "auto", False, VAL_IMAGES)
    train = data.splits["train"]
    torch.manual_seed(0)
    model = CIFAR_MODELS["resnet8"](num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = _normalized(train.images, train.images)
    for _ in range(9):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), train.labels).backward()
        optimizer.step()
    assert optimizer.state_dict()["state"][0]["momentum_buffer"] is not None
    torch.save({"epoch": 240, "model": model.state_dict(), "best_acc": torch.tensor(71.2),
                "optimizer": optimizer.state_dict()}, path)
    return model


def _run_with_published_teacher(tmp_path: Path, teacher_model: str) -> tuple[int, Path, Path]:
    """(exit code, data root, checkpoint) of a KD run under the preset whose teacher is a published-layout file
    of a resnet8, read as `teacher_model`."""
    root = write_cifar100(tmp_path / "c100")
    path = tmp_path / "ckpt_epoch_240.pth"
    _published_teacher(path, root)
    code = run_experiment.cli(["--preset", "cifar100", "--data", f"cifar100:{root}", "--methods", "KD",
                               "--teacher-checkpoint", str(path), "--teacher-epochs", "0", "--student-epochs", "1",
                               *TINY, "--set", f"teacher.model={teacher_model}", "--set", "student.model=resnet8"])
    return code, root, path


def test_a_published_teacher_checkpoint_is_used_as_it_is(tmp_path, capsys, one_thread):
    code, root, path = _run_with_published_teacher(tmp_path, "resnet8")
    out = capsys.readouterr().out
    assert code == 0, out
    records = {r["method"]: r for r in json.loads((_folder(tmp_path) / "comparison_results.json").read_text())}
    assert sorted(records) == ["KD", "Teacher"] and records["KD"]["status"] == "ok"
    teacher = records["Teacher"]
    assert teacher["status"] == "ok" and teacher["epochs"] == 0 and teacher["checkpoint"] == str(path)

    # the same weights, evaluated here: a fresh resnet8 from the file, in eval mode
    fresh = CIFAR_MODELS["resnet8"](num_classes=4)
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"], strict=True)
    fresh.eval()
    data = load_cifar(f"cifar100:{root}", "auto", False, VAL_IMAGES)
    train = data.splits["train"].images
    with torch.no_grad():
        logits = {split: fresh(_normalized(data.splits[split].images, train)) for split in ("val", "test")}
    predicted = {split: z.argmax(dim=1) for split, z in logits.items()}
    labels = {split: data.splits[split].labels for split in ("val", "test")}
    for z in logits.values():  # no near-tie that float rounding (channels_last, batching) could flip
        top = z.topk(2, dim=1).values
        assert (top[:, 0] - top[:, 1]).min() > 1e-3
    val_accuracy = (predicted["val"] == labels["val"]).sum().item() / len(labels["val"])
    test_accuracy = (predicted["test"] == labels["test"]).sum().item() / len(labels["test"])
    # neither one class for all nor all right, and the splits differ: the comparison tells something
    assert 0.25 < val_accuracy < 1 and 0.25 < test_accuracy < 1 and val_accuracy != test_accuracy
    assert teacher["best_accuracy"] == pytest.approx(val_accuracy, abs=1e-9)
    assert teacher["test_accuracy"] == pytest.approx(test_accuracy, abs=1e-9)
    confusion = [[0] * len(CLASSES) for _ in CLASSES]
    for label, guess in zip(labels["val"].tolist(), predicted["val"].tolist()):
        confusion[label][guess] += 1
    assert teacher["confusion_matrix"] == confusion


def test_a_published_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys, one_thread):
    code, _, path = _run_with_published_teacher(tmp_path, "resnet14")
    line = _error_line(capsys.readouterr().err)
    assert code == 2
    # resnet14 has two blocks per stage, resnet8 one: the file lacks the second ones
    assert "missing key(s) (e.g. layer1.1." in line and str(path) in line and "resnet14" in line
    assert not (tmp_path / "logs").exists()

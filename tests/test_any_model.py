"""Any torchvision / timm model as teacher or student: every method on pairs across model families (the
saved students load into the plain library models), starting weights without a network, your own teacher
checkpoint, per-method student settings, and unknown model names."""
from __future__ import annotations

import csv
import json
import os
import urllib.error
import urllib.parse
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import final
import run_experiment
from kd.engine.checkpoint import save_checkpoint
from kd.errors import UserError
from kd.methods import METHODS
from models import build_model, model_spec, num_outputs
from models.weights import input_stats

SIZE = 32  # ImageNet-stride models (stride 32) keep a 1x1 deepest map at 32 px
LR = 1e-4  # the one training step's
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

PAIRS = [("resnet50", "mobilenet_v3_small"), ("convnext_tiny", "resnet18"),
         ("efficientnet_b0", "shufflenet_v2_x0_5"), ("timm/test_convnext", "timm/test_efficientnet")]
VIT_TEACHER = "timm/test_vit"
# they read the teacher's feature maps, which a ViT does not have (SP its last stage, ReviewKD every stage)
FEATURE_METHODS = ("AT", "FitNets", "SP", "ReviewKD")
CASES = ([pytest.param(t, s, m, id=f"{t}->{s}-{m}") for t, s in PAIRS for m in METHODS]
         + [pytest.param(VIT_TEACHER, "resnet18", m, id=f"{VIT_TEACHER}->resnet18-{m}")
            for m in METHODS if m not in FEATURE_METHODS])
TRAIN_LABELS = torch.arange(12) % 3  # the training set CRD's memory and negatives are drawn from
INDICES = torch.tensor([0, 1, 5, 4])  # the batch's positions in it: labels 0, 1, 2, 1 as its targets
CRD_NCE_K = 8  # the other classes' 8 images: drawn without replacement


# --- helpers -------------------------------------------------------------------------------------------------

def _spec(name: str, weights=None, size: int = SIZE):
    return model_spec({"model": name, "weights": weights}, size, "auto")


def _plain_library_model(name: str, stem: str, num_classes: int = 3) -> nn.Module:
    """The unmodified library model, with the small-image ResNet stem done by hand as README shows."""
    if name.startswith("timm/"):
        return timm.create_model(name.removeprefix("timm/"), num_classes=num_classes)
    model = torchvision.models.get_model(name, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _error_line(err: str) -> str:
    """The single non-empty stderr line of a refused run (the contract: one line, no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _argv(data: Path, logs: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--methods", "Baseline", "--teacher-epochs", "1", "--student-epochs", "1",
            "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--set", "teacher.model=ResNet18",
            "--set", "experiment.image_size=8", "--set", "experiment.num_workers=0",
            "--logs-dir", str(logs), "--checkpoints-dir", str(ckpt), *extra]


def _experiment(logs: Path) -> Path:
    dirs = list(Path(logs).glob("final_experiment_*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def _records(logs: Path) -> list[dict]:
    return json.loads((_experiment(logs) / "comparison_results.json").read_text())


def _nothing_written(*folders: Path) -> None:
    for folder in folders:
        assert not Path(folder).exists(), sorted(Path(folder).rglob("*"))


def _small_config(tmp_path: Path, **experiment) -> dict:
    config = final.default_config()
    config["teacher"].update(model="ResNet18", epochs=1, batch_size=8)
    config["student"].update(epochs=1, batch_size=8)
    config["experiment"].update(data_dir=str(tmp_path / "data"), methods=["Baseline"], image_size=8, device="cpu",
                                precision="fp32", num_workers=0, logs_dir=str(tmp_path / "logs"),
                                checkpoints_dir=str(tmp_path / "checkpoints"))
    config["experiment"].update(experiment)
    return config


# --- 1. every method on teacher/student pairs across families ------------------------------------------------

@pytest.fixture(scope="module")
def teachers():
    """One randomly initialised teacher per name, built once for the module."""
    built: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in built:
            torch.manual_seed(0)
            built[name] = build_model(_spec(name), 3)
        return built[name]
    return get




def test_feature_methods_are_those_that_read_the_teachers_stages():
    assert set(FEATURE_METHODS) == {m for m, method in METHODS.items() if "teacher" in method.distiller.needs_stages}


@pytest.mark.parametrize("teacher_name, student_name, method", CASES)
def test_method_trains_any_pair_and_saves_a_plain_library_model(tmp_path, teachers, one_thread, method_inputs,
                                                                   teacher_name, student_name, method):
    teacher = teachers(teacher_name)
    torch.manual_seed(1)
    spec = _spec(student_name)
    student = build_model(spec, 3)
    distiller_cls = METHODS[method].distiller
    settings = METHODS[method].resolve(final.METHODS_CONFIG[method], 1)
    if method == "CRD":
        settings["nce_k"] = CRD_NCE_K
    distiller = distiller_cls(student, teacher if distiller_cls.needs_teacher else None, **settings)
    distiller.attach_data(TRAIN_LABELS, 0)  # CRD's memory banks: one row per training image
    start = {k: v.clone() for k, v in student.state_dict().items()}
    memory = {k: v.clone() for k, v in distiller.named_buffers() if k.startswith("memory_")}
    images, targets = torch.randn(4, 3, SIZE, SIZE), TRAIN_LABELS[INDICES]
    batch = method_inputs(distiller, images, INDICES)
    try:
        distiller.train()
        # a small lr: at random inputs with batch statistics of 4 images, gradients can be large (shufflenet's
        # first convolution: ~1e5 under PKT's beta 30000 or DKD_LS's weights), and after a step at lr 0.01 the
        # model's eval outputs overflow to NaN
        optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=LR, momentum=0.9)
        logits, losses = distiller.forward_train(images, targets, **batch)
        assert tuple(logits.shape) == (4, 3)
        assert losses and all(key.startswith("loss_") for key in losses)
        loss = sum(losses.values())
        assert torch.isfinite(loss), losses
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    finally:
        distiller.close()
    if distiller_cls.needs_teacher:  # frozen: eval mode, no gradients
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(start[k], v) for k, v in student.named_parameters()), "the step changed nothing"
    if distiller_cls.needs_index:  # the batch's rows of both memory banks moved (unit rows now), no others
        assert sorted(memory) == ["memory_s", "memory_t"]
        for name, before in memory.items():
            after = getattr(distiller, name)
            moved = (after != before).any(dim=1)
            assert moved.nonzero().flatten().tolist() == sorted(INDICES.tolist()), name
            assert torch.allclose(after[INDICES].norm(dim=1), torch.ones(4), atol=1e-5)
    assert not any(k.startswith("memory_") for k in student.state_dict())  # never saved with the student

    deployable = distiller.deployable_models()
    assert sorted(deployable) == (["_peer0", "_peer1"] if method == "DML" else [""])
    probe = torch.randn(2, 3, SIZE, SIZE)
    for suffix, model in deployable.items():
        path = tmp_path / f"{method}_{student_name.replace('/', '-')}{suffix}_best.pth"
        save_checkpoint(path, model, {"builder": spec.builder, "stem": spec.stem, "num_classes": 3})
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        plain = _plain_library_model(student_name, checkpoint["meta"]["stem"])
        assert type(plain) is type(model)
        plain.load_state_dict(checkpoint["model"], strict=True)
        plain.eval(), model.eval()
        with torch.no_grad():
            assert torch.allclose(plain(probe), model(probe), atol=1e-5)


def test_vit_teacher_with_a_feature_method_is_refused_naming_the_working_methods(tmp_path, make_image_folder):
    make_image_folder(tmp_path / "data", size=16)
    config = _small_config(tmp_path, image_size=SIZE, methods=["AT"])
    config["teacher"]["model"] = VIT_TEACHER
    with pytest.raises(UserError) as info:
        final.main(config)
    message = str(info.value)
    assert "\n" not in message and "AT" in message and VIT_TEACHER in message
    for working in ("Baseline", "KD", "DML", "BYOT"):  # BYOT needs only the student's stages
        assert working in message, message
    _nothing_written(tmp_path / "logs", tmp_path / "checkpoints")


def test_vit_teacher_passes_check_with_the_methods_that_work(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "data", size=16)
    code = run_experiment.cli(_argv(data, tmp_path / "logs", tmp_path / "ckpt", "--methods", "Baseline,KD,DML,BYOT",
                                    "--set", f"teacher.model={VIT_TEACHER}", "--set", f"experiment.image_size={SIZE}",
                                    "--check"))
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "check passed" in out and "teacher stages: none" in out
    _nothing_written(tmp_path / "logs", tmp_path / "ckpt")


def test_vit_teacher_with_fitnets_exits_2_and_writes_nothing(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "data", size=16)
    code = run_experiment.cli(_argv(data, tmp_path / "logs", tmp_path / "ckpt", "--methods", "KD,FitNets",
                                    "--set", f"teacher.model={VIT_TEACHER}", "--set", f"experiment.image_size={SIZE}"))
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and "FitNets" in line and VIT_TEACHER in line and "--methods" in line
    _nothing_written(tmp_path / "logs", tmp_path / "ckpt")


# --- 2. starting weights without a network ----------------------------------------------------------------------

MOBILENET_WEIGHTS = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
MOBILENET_FILE = os.path.basename(urllib.parse.urlparse(MOBILENET_WEIGHTS.url).path)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> dict:
    """TORCH_HOME in tmp_path and every download refused (and counted): no network is ever used."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    attempts = []

    def no_network(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return {"folder": home / "hub" / "checkpoints", "attempts": attempts}


def _cache_mobilenet(folder: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    state = torchvision.models.mobilenet_v3_small().state_dict()  # 1000 classes, like the real file
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / MOBILENET_FILE)
    return state


def test_torchvision_weights_load_from_the_cache_with_a_new_classifier(offline_hub):
    saved = _cache_mobilenet(offline_hub["folder"])
    spec = _spec("mobilenet_v3_small", weights="DEFAULT")
    torch.manual_seed(7)
    state = build_model(spec, 3).state_dict()
    assert set(state) == set(saved)
    classifier = {"classifier.3.weight", "classifier.3.bias"}
    for key in set(saved) - classifier:
        assert torch.equal(state[key], saved[key]), key
    assert tuple(state["classifier.3.weight"].shape) == (3, 1024) and tuple(state["classifier.3.bias"].shape) == (3,)
    assert offline_hub["attempts"] == []

    stats = input_stats(spec)
    assert stats.mean == pytest.approx(IMAGENET_MEAN) and stats.std == pytest.approx(IMAGENET_STD)
    assert "MobileNet_V3_Small_Weights" in stats.origin
    assert input_stats(_spec("mobilenet_v3_small")) is None  # from scratch: the data's own statistics


def test_run_with_a_pretrained_student_uses_the_weights_normalisation(tmp_path, offline_hub, make_image_folder):
    _cache_mobilenet(offline_hub["folder"])
    make_image_folder(tmp_path / "data", per_class={"train": 4, "val": 2}, size=16)
    config = _small_config(tmp_path, image_size=SIZE)
    config["teacher"]["model"] = "timm/test_efficientnet"
    config["student"].update(model="mobilenet_v3_small", weights="DEFAULT")
    records = final.main(config)

    assert [(r["method"], r["status"]) for r in records] == [("Teacher", "ok"), ("Baseline", "ok")]
    summary = json.loads((_experiment(tmp_path / "logs") / "experiment_summary.json").read_text())
    assert "MobileNet_V3_Small_Weights" in summary["data"]["normalization"]
    assert summary["data"]["image_size"] == SIZE
    student = torch.load(tmp_path / "checkpoints" / "students" / "Baseline_mobilenet_v3_small_best.pth",
                         weights_only=True)
    assert student["meta"]["mean"] == pytest.approx(IMAGENET_MEAN)
    assert student["meta"]["std"] == pytest.approx(IMAGENET_STD)
    assert offline_hub["attempts"] == []


def test_missing_pretrained_file_is_one_line_naming_file_and_folder(tmp_path, offline_hub, make_image_folder,
                                                                    capsys):
    data = make_image_folder(tmp_path / "data", size=16)
    code = run_experiment.cli(_argv(data, tmp_path / "logs", tmp_path / "ckpt", "--set",
                                    "student.model=mobilenet_v3_small", "--set", "student.weights=DEFAULT",
                                    "--set", "teacher.model=timm/test_efficientnet",
                                    "--set", f"experiment.image_size={SIZE}"))
    err = capsys.readouterr().err
    assert code == 2
    _nothing_written(tmp_path / "logs", tmp_path / "ckpt")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and MOBILENET_FILE in errors[0] and str(offline_hub["folder"]) in errors[0], err
    assert _error_line(err) == errors[0]  # and nothing else on stderr


def test_timm_weights_from_a_file_load_with_a_new_head(tmp_path):
    torch.manual_seed(11)
    saved = timm.create_model("test_efficientnet").state_dict()
    path = tmp_path / "test_efficientnet.pth"
    torch.save(saved, path)
    torch.manual_seed(12)
    model = build_model(_spec("timm/test_efficientnet", weights=str(path)), 3)
    state = model.state_dict()
    assert set(state) == set(saved) and num_outputs(model) == 3
    assert tuple(saved["classifier.weight"].shape)[0] == 1000 and tuple(state["classifier.weight"].shape)[0] == 3
    for key in set(saved) - {"classifier.weight", "classifier.bias"}:
        assert torch.equal(state[key], saved[key]), key


# --- 3. bring your own teacher --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def own_teacher(module_dir, make_image_folder) -> dict:
    """A first experiment that trains a ResNet18 teacher (2 epochs); its best checkpoint is "your" teacher."""
    base = module_dir
    make_image_folder(base / "data", per_class={"train": 6, "val": 4})
    config = _small_config(base)
    config["teacher"]["epochs"] = 2
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        records = final.main(config)
    best = base / "checkpoints" / "teachers" / "ResNet18_teacher_best.pth"
    return {"base": base, "data": base / "data", "best": best, "teacher": records[0], "bytes": best.read_bytes()}


@pytest.mark.parametrize("form", ["checkpoint", "plain_state_dict"])
def test_own_teacher_is_used_as_it_is(tmp_path, own_teacher, capsys, form):
    given = own_teacher["best"]
    if form == "plain_state_dict":
        given = tmp_path / "my_teacher_state.pth"
        torch.save(torch.load(own_teacher["best"], weights_only=True)["model"], given)
    logs, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    code = run_experiment.cli(_argv(own_teacher["data"], logs, ckpt, "--teacher-checkpoint", str(given),
                                    "--teacher-epochs", "0"))
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]

    teacher = _records(logs)[0]
    assert teacher["method"] == "Teacher" and teacher["reused"] is True
    assert teacher["training_time"] == 0
    # the very same weights on the very same val images: accuracy and (continuous) NLL as when it was trained
    assert teacher["best_accuracy"] == pytest.approx(own_teacher["teacher"]["best_accuracy"], abs=1e-9)
    assert teacher["nll"] == pytest.approx(own_teacher["teacher"]["nll"], rel=1e-5)
    assert teacher["checkpoint"] == str(given)
    assert not (ckpt / "teachers").exists() or not list((ckpt / "teachers").iterdir())
    assert not (logs / "teachers").exists()  # no teacher training run
    assert own_teacher["best"].read_bytes() == own_teacher["bytes"]
    summary = json.loads((_experiment(logs) / "experiment_summary.json").read_text())
    assert summary["teacher"]["reused"] is True
    warned = "no class names" in err
    assert warned == (form == "plain_state_dict"), err


def _other_classes(tmp_path, own_teacher, make_image_folder) -> tuple[Path, Path, str]:
    return own_teacher["best"], make_image_folder(tmp_path / "other", classes=("x", "y", "z")), "classes"


def _truncated(tmp_path, own_teacher, make_image_folder) -> tuple[Path, Path, str]:
    path = tmp_path / "half_teacher.pth"
    path.write_bytes(own_teacher["bytes"][: len(own_teacher["bytes"]) // 2])
    return path, own_teacher["data"], "not a readable"


def _other_architecture(tmp_path, own_teacher, make_image_folder) -> tuple[Path, Path, str]:
    path = tmp_path / "mobilenet_state.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), path)
    return path, own_teacher["data"], "ResNet18"


@pytest.mark.parametrize("broken", [_other_classes, _truncated, _other_architecture],
                         ids=["other class names", "truncated", "other architecture"])
def test_unusable_own_teacher_exits_2_and_writes_nothing(tmp_path, own_teacher, make_image_folder, capsys, broken):
    path, data, needle = broken(tmp_path, own_teacher, make_image_folder)
    logs, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    code = run_experiment.cli(_argv(data, logs, ckpt, "--teacher-checkpoint", str(path), "--teacher-epochs", "0"))
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and str(path) in line and needle in line, line
    _nothing_written(logs, ckpt)
    assert own_teacher["best"].read_bytes() == own_teacher["bytes"]


# --- 4. per-method student settings ---------------------------------------------------------------------------

def test_create_at_config_accepts_student_keys():
    cfg = final.create_at_config(model="ResNet18", epochs=50, lr=0.01)
    expected = {"p": 2.0, "ce_weight": 1.0, "beta": 1000.0, "model": "ResNet18", "epochs": 50, "lr": 0.01}
    assert expected.items() <= cfg.items()
    with pytest.raises(UserError, match="lr"):
        final.create_at_config(lr=0)


def test_method_with_its_own_lr_is_reported_outside_the_common_protocol(tmp_path, own_teacher):
    config = _small_config(tmp_path, methods=["Baseline", "KD"], seeds=[0, 1], data_dir=str(own_teacher["data"]))
    config["teacher"].update(checkpoint=str(own_teacher["best"]), epochs=0)  # no teacher training here
    config["methods"]["KD"]["lr"] = 0.05  # the common student trains at 0.01
    records = final.main(config)

    runs = {(r["method"], r["seed"]): r for r in records if r["method"] != "Teacher"}
    assert set(runs) == {("Baseline", 0), ("Baseline", 1), ("KD", 0), ("KD", 1)}
    for seed in (0, 1):
        kd, baseline = runs[("KD", seed)], runs[("Baseline", seed)]
        assert kd["status"] == "ok" and kd["protocol"].startswith("own:") and "lr=0.05" in kd["protocol"]
        assert baseline["protocol"] == "common"
        assert kd["history"][0]["lr"] == pytest.approx(0.05)
        assert baseline["history"][0]["lr"] == pytest.approx(0.01)

    exp = _experiment(tmp_path / "logs")
    with open(exp / "comparison_results.csv", newline="") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert rows["KD"]["p_value_vs_baseline"] == "" and rows["KD"]["gain_vs_baseline"] != ""
    summary = json.loads((exp / "experiment_summary.json").read_text())
    assert summary["methods"]["KD"]["p_value_vs_baseline"] is None and summary["methods"]["KD"]["n"] == 2


# --- 5. unknown model names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key, typo, suggestion", [
    ("student", "model", "mobilenetv3_small", "mobilenet_v3_small"),
    ("teacher", "model", "convnexttiny", "convnext_tiny"),
    ("methods", "KD", "mobilenetv3_small", "mobilenet_v3_small"),
    ("student", "model", "timm/test_vitt", "timm/test_vit"),
], ids=["student", "teacher", "method's own student", "timm"])
def test_unknown_model_name_suggests_the_closest(tiny_config, section, key, typo, suggestion):
    if section == "methods":
        tiny_config["methods"][key]["model"] = typo
    else:
        tiny_config[section][key] = typo
    with pytest.raises(UserError) as info:
        final.validate_config(tiny_config)
    message = str(info.value)
    assert typo.removeprefix("timm/") in message and suggestion in message and "\n" not in message


def test_unknown_model_name_exits_2_on_the_command_line(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "data")
    code = run_experiment.cli(_argv(data, tmp_path / "logs", tmp_path / "ckpt",
                                    "--set", "student.model=mobilenetv3_small"))
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and "mobilenet_v3_small" in line
    _nothing_written(tmp_path / "logs", tmp_path / "ckpt")


def test_own_teacher_to_fine_tune_is_checked_before_anything_is_written(tmp_path, own_teacher, make_image_folder,
                                                                        capsys):
    # teacher.epochs > 0 fine-tunes the file, but a file of another architecture is refused first, at --check too
    path, data, needle = _other_architecture(tmp_path, own_teacher, make_image_folder)
    logs, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    for extra in (["--check"], []):
        code = run_experiment.cli(_argv(data, logs, ckpt, "--teacher-checkpoint", str(path), "--teacher-epochs", "1",
                                        *extra))
        line = _error_line(capsys.readouterr().err)
        assert code == 2 and str(path) in line and needle in line, line
        _nothing_written(logs, ckpt)


def test_baseline_with_its_own_settings_gives_no_p_values(tmp_path, own_teacher):
    config = _small_config(tmp_path, methods=["Baseline", "KD"], seeds=[0, 1], data_dir=str(own_teacher["data"]))
    config["teacher"].update(checkpoint=str(own_teacher["best"]), epochs=0)
    config["methods"]["Baseline"]["lr"] = 0.05  # the reference itself leaves the common protocol
    final.main(config)
    summary = json.loads((_experiment(tmp_path / "logs") / "experiment_summary.json").read_text())
    assert summary["methods"]["KD"]["p_value_vs_baseline"] is None  # KD is common, Baseline is not
    assert summary["best_method"] == "KD"  # the best method is chosen among the common protocol's


@pytest.mark.parametrize("name, needle", [("squeezenet1_0", "no single Linear classifier"),
                                          ("inception_v3", "needs feature maps of the student")])
def test_models_the_methods_cannot_use_are_refused_in_one_line(tmp_path, make_image_folder, capsys, name, needle):
    data = make_image_folder(tmp_path / "data", per_class={"train": 4, "val": 2})
    logs, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    argv = _argv(data, logs, ckpt, "--set", f"student.model={name}", "--set", "experiment.image_size=75",
                 "--methods", "BYOT", "--check")
    assert run_experiment.cli(argv) == 2
    assert needle in _error_line(capsys.readouterr().err)
    _nothing_written(logs, ckpt)

"""Resume after kill -9: finished runs are kept, interrupted runs continue from their last epoch (KD and
AT train together, sharing the teacher: both continue; so do CRD, with its memory banks and seeded negatives,
and DKD in its warm-up), and the records equal those of an uninterrupted run (same settings, same machine)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_experiment
from conftest import in_one_thread
from kd.engine import run, runtime
from kd.engine.checkpoint import load_state

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("method", "seed", "best_accuracy", "final_accuracy", "best_epoch", "test_accuracy",
            "student_init_sha256", "first_batch_sha256")


def _argv(base: Path, data: Path) -> list[str]:
    return ["--data", str(data), "--methods", "Baseline,KD,AT", "--teacher-epochs", "1", "--student-epochs", "3",
            "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--set", "teacher.model=ResNet18",
            "--set", "experiment.image_size=8", "--logs-dir", str(base / "logs"),
            "--checkpoints-dir", str(base / "checkpoints")]


def _records(base: Path) -> list[dict]:
    exp_dir = next((base / "logs").glob("final_experiment_*"))
    return json.loads((exp_dir / "comparison_results.json").read_text())


def _essentials(records: list[dict]) -> list[dict]:
    return [{key: r.get(key) for key in COMPARED} | {"scores": [h["score"] for h in r.get("history", [])]}
            for r in records]


def _start(argv: list[str], cwd: Path, driver: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = driver or "import sys, run_experiment; sys.exit(run_experiment.cli(sys.argv[1:]))"
    # Ctrl-C must reach the child as KeyboardInterrupt even when pytest itself runs with SIGINT ignored
    # (a background job of a non-interactive shell), which the child would inherit
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _cli_one_thread(argv: list[str], cwd: Path) -> int:
    return in_one_thread(lambda: run_experiment.cli(argv), cwd)


def _signal_when_state_exists(argv: list[str], base: Path, run: str, signum: int = signal.SIGKILL,
                              timeout: float = 180.0) -> subprocess.Popen:
    """Start the experiment and send it `signum` as soon as `run` has saved its state after an epoch."""
    process = _start(argv, base)
    deadline = time.monotonic() + timeout
    while not any((base / "logs").glob(f"final_experiment_*/resume/{run}_seed0.pt")):
        assert process.poll() is None, f"the run ended before the signal: {process.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the run to reach the signal point"
        time.sleep(0.02)
    process.send_signal(signum)
    return process


@pytest.fixture(scope="module")
def reference(module_dir, make_image_folder):
    """An uninterrupted run with the same settings (in this process, with one thread like the subprocesses)."""
    base = module_dir / "reference"
    data = make_image_folder(base / "data", per_class={"train": 8, "val": 3, "test": 2})
    assert _cli_one_thread(_argv(base, data), base) == 0
    return data, _essentials(_records(base))


def test_sigkill_during_a_student_run_then_resume(tmp_path, reference, capsys):
    data, expected = reference
    argv = _argv(tmp_path, data)
    _signal_when_state_exists(argv, tmp_path, "KD").wait()
    interrupted = _records(tmp_path)
    assert [r["method"] for r in interrupted] == ["Teacher", "Baseline"]  # KD was cut off mid-run

    assert _cli_one_thread([*argv, "--resume"], tmp_path) == 0
    assert _essentials(_records(tmp_path)) == expected
    assert not list((tmp_path / "logs").glob("final_experiment_*/resume"))  # nothing left to resume
    assert len(list((tmp_path / "logs").glob("final_experiment_*"))) == 1  # continued, not restarted
    capsys.readouterr()
    assert _cli_one_thread([*argv, "--resume"], tmp_path) == 2
    err = capsys.readouterr().err
    assert "no unfinished experiment" in err and "Traceback" not in err and err.count("\n") == 1


# Dies exactly as kill -9 would (no cleanup) in the middle of writing the KD run's state file.
MID_WRITE_DRIVER = """
import os, sys
from kd.engine import checkpoint
original = checkpoint.atomic_write
def dying_write(path, write, mode="wb"):
    if str(path).endswith("KD_seed0.pt") and os.path.exists(path):
        def half(handle):
            class Half:
                def write(self, data):
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    os._exit(9)
            write(Half())
        return original(path, half, mode)
    return original(path, write, mode)
checkpoint.atomic_write = dying_write
import run_experiment
sys.exit(run_experiment.cli(sys.argv[1:]))
"""


def _argv_crd_dkd(base: Path, data: Path) -> list[str]:
    """CRD and DKD trained together (one teacher), 3 epochs: CRD's memory banks, Z constants and step counter
    (which seeds its negatives) and DKD's warm-up (1/3, 2/3, 1 with warmup_epochs 3) all span the cut."""
    return [*_argv(base, data), "--methods", "CRD,DKD", "--teacher-epochs", "1", "--student-epochs", "3",
            "--set", "methods.CRD.nce_k=16", "--set", "methods.DKD.warmup_epochs=3"]  # later flags win


def _essentials_with_losses(records: list[dict]) -> list[dict]:
    """_essentials plus each epoch's loss terms and loss weights."""
    return [essentials | {"losses": [h["train_loss"] for h in r.get("history", [])],
                          "weights": [h.get("loss_weights") for h in r.get("history", [])]}
            for essentials, r in zip(_essentials(records), records)]


@pytest.fixture(scope="module")
def reference_crd_dkd(module_dir, make_image_folder):
    """An uninterrupted CRD + DKD experiment (in this process, with one thread)."""
    base = module_dir / "reference_crd_dkd"
    data = make_image_folder(base / "data", per_class={"train": 8, "val": 3, "test": 2})
    assert _cli_one_thread(_argv_crd_dkd(base, data), base) == 0
    return data, _essentials_with_losses(_records(base))


def test_sigkill_during_crd_and_dkd_then_resume(tmp_path, reference_crd_dkd):
    data, expected = reference_crd_dkd
    assert [r["method"] for r in expected] == ["Teacher", "CRD", "DKD"]
    assert expected[2]["weights"] == [{"dkd": 1 / 3}, {"dkd": 2 / 3}, {"dkd": 1.0}]  # the warm-up spans the cut
    assert {"loss_ce", "loss_crd"} <= set(expected[1]["losses"][0])

    argv = _argv_crd_dkd(tmp_path, data)
    _signal_when_state_exists(argv, tmp_path, "DKD").wait()  # DKD saves after CRD: both have an epoch saved
    assert [r["method"] for r in _records(tmp_path)] == ["Teacher"]  # both were cut off mid-run
    resume_dir = next((tmp_path / "logs").glob("final_experiment_*/resume"))
    states = {method: load_state(resume_dir / f"{method}_seed0.pt") for method in ("CRD", "DKD")}
    for state in states.values():
        assert 1 <= len(state["progress"]["history"]) < 3  # cut after its first epoch, before its last
    crd = states["CRD"]["distiller"]  # the memory banks and the step counter are part of the saved state
    assert {"memory_s", "memory_t", "z_s", "z_t", "steps"} <= set(crd)
    assert int(crd["steps"]) == 3 * len(states["CRD"]["progress"]["history"])  # 24 images, batch 8
    assert float(crd["z_s"]) > 0 and float(crd["z_t"]) > 0  # fixed on the first step, kept across the cut

    assert _cli_one_thread([*argv, "--resume"], tmp_path) == 0  # the killed process's epochs, continued here
    assert _essentials_with_losses(_records(tmp_path)) == expected
    assert not list((tmp_path / "logs").glob("final_experiment_*/resume"))


def test_sigkill_while_a_checkpoint_is_written_then_resume(tmp_path, reference):
    data, expected = reference
    argv = _argv(tmp_path, data)
    process = _start(argv, tmp_path, MID_WRITE_DRIVER)
    process.wait(timeout=300)
    assert process.returncode == 9
    exp_dir = next((tmp_path / "logs").glob("final_experiment_*"))
    assert list((exp_dir / "resume").glob(".KD_seed0.pt.*.tmp"))  # the half-written temporary file
    json.loads((exp_dir / "comparison_results.json").read_text())  # results files are whole

    assert _cli_one_thread([*argv, "--resume", str(exp_dir)], tmp_path) == 0
    assert _essentials(_records(tmp_path)) == expected


def test_resume_refuses_changed_settings(tmp_path, reference, capsys):
    data, _ = reference
    argv = _argv(tmp_path, data)
    _signal_when_state_exists(argv, tmp_path, "Baseline").wait()
    assert run_experiment.cli([*argv, "--resume", "--student-epochs", "7"]) == 2
    err = capsys.readouterr().err
    assert "student.epochs was 3, now 7" in err and "Traceback" not in err and err.count("\n") == 1


def test_ctrl_c_prints_the_resume_command(tmp_path, reference):
    data, _ = reference
    argv = _argv(tmp_path, data)
    process = _signal_when_state_exists(argv, tmp_path, "Baseline", signal.SIGINT)
    _, err = process.communicate(timeout=120)
    exp_dir = next((tmp_path / "logs").glob("final_experiment_*"))
    assert process.returncode == 130
    assert f"python run_experiment.py --resume {exp_dir}" in err and "Traceback" not in err
    assert (exp_dir / "resume" / "Baseline_seed0.pt").exists()  # saved: --resume continues from here


CHEAP = ["--precision", "auto", "--methods", "KD", "--student-epochs", "2"]  # later flags win


def _interrupted_after_first_epoch(argv: list[str], monkeypatch, method: str = "KD") -> Path:
    """Run the experiment in this process and stop it (as Ctrl-C would) once `method` saved its first epoch."""
    original = run.TrainingRun.end_epoch

    def end_epoch(self, epoch, *args):
        original(self, epoch, *args)
        if self.spec.name == method and epoch == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(run.TrainingRun, "end_epoch", end_epoch)
        assert run_experiment.cli(argv) == 130
    return next(Path(argv[argv.index("--logs-dir") + 1]).glob("final_experiment_*"))


def test_resume_keeps_the_precision_it_started_in(tmp_path, make_image_folder, monkeypatch):
    """Begun where "auto" meant fp32 and resumed where it means bf16 (another device): the runs go on in
    fp32, with the records of an uninterrupted fp32 experiment."""
    data = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 3})
    argv = [*_argv(tmp_path / "whole", data), *CHEAP]
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert run_experiment.cli(argv) == 0
    expected = _essentials(_records(tmp_path / "whole"))

    argv = [*_argv(tmp_path / "stopped", data), *CHEAP]
    exp_dir = _interrupted_after_first_epoch(argv, monkeypatch)
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)  # "auto" now resolves to bf16
    assert run_experiment.cli([*argv, "--resume"]) == 0
    assert json.loads((exp_dir / "experiment_summary.json").read_text())["environment"]["precision"] == "fp32"
    assert _essentials(_records(tmp_path / "stopped")) == expected


def test_resume_an_experiment_begun_before_the_newer_keys(tmp_path, make_image_folder, monkeypatch):
    """A folder written before tuning, CIFAR, presets, compiling and the 2023-2024 methods existed (no tune
    section, none of their experiment keys, no entries for those methods) resumes, with the records of an
    uninterrupted experiment."""
    data = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 3})
    argv = [*_argv(tmp_path / "whole", data), *CHEAP]
    assert run_experiment.cli(argv) == 0
    expected = _essentials(_records(tmp_path / "whole"))

    argv = [*_argv(tmp_path / "stopped", data), *CHEAP]
    exp_dir = _interrupted_after_first_epoch(argv, monkeypatch)
    summary_file = exp_dir / "experiment_summary.json"
    summary = json.loads(summary_file.read_text())
    del summary["config"]["tune"]
    for key in ("tune", "cifar_val_images", "preset", "compile"):
        del summary["config"]["experiment"][key]
    for method in ("WTTM", "CTKD", "CTKD_DKD", "NormKD"):
        del summary["config"]["methods"][method]
    summary_file.write_text(json.dumps(summary))
    assert run_experiment.cli([*argv, "--resume"]) == 0
    assert _essentials(_records(tmp_path / "stopped")) == expected


def _refused(argv: list[str], exp_dir: Path, capsys, untouched: bool = True) -> str:
    """Resume, expecting exit 2 with one line (and every file of the experiment untouched); the line."""
    before = {p: p.read_bytes() for p in exp_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_experiment.cli([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert not untouched or {p: p.read_bytes() for p in exp_dir.rglob("*") if p.is_file()} == before
    return errors[0]


def test_resume_refuses_a_precision_this_device_cannot_run(tmp_path, make_image_folder, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 3})
    argv = [*_argv(tmp_path, data), *CHEAP]
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)  # begun where auto meant bf16
    exp_dir = _interrupted_after_first_epoch(argv, monkeypatch)
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)  # resumed where bf16 is emulated
    assert "trains in bf16, which cpu cannot run (or only emulates)" in _refused(argv, exp_dir, capsys)

    summary_file = exp_dir / "experiment_summary.json"
    summary = json.loads(summary_file.read_text())
    summary["environment"]["precision"] = "fp16"  # as if begun on a GPU without native bf16
    summary_file.write_text(json.dumps(summary))
    assert "trains in fp16, which cpu cannot run" in _refused(argv, exp_dir, capsys)

    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    summary["environment"]["precision"] = "fp32"  # the summary disagrees with the run's own saved state,
    summary_file.write_text(json.dumps(summary))  # which is checked when the run is restored (the log has grown)
    assert "was trained in bf16, this run is set up for fp32" in _refused(argv, exp_dir, capsys, untouched=False)

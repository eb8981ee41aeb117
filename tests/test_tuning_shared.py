"""--tune under torchrun with --parallel runs (CPU, gloo, one thread per process): the two processes share
each study's trial budget, through the journal file in the experiment folder or through a real PostgreSQL
server, so that every study runs exactly tune.trials trials, none twice; then the final runs are queued
from what tuning chose.

The PostgreSQL test starts its own server (initdb, postgres on a free port as the postgres user, a new
database) and stops it afterwards. Without PostgreSQL's binaries it fails under CI (CI set; .ci/run installs
Debian's postgresql package) and is skipped elsewhere."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRIALS = 3        # tune.trials: per study (stage 1 "recipe" on Baseline, stage 2 "KD")
FINAL_SEEDS = 2   # tune.final_seeds: the final runs' seeds are then 1 and 2 (0 is the trials' seed)

# Every process notes which trials it trained (stage and Optuna's number) in its own file.
TRACE_TRIALS = """
import os
from kd.tuning import stages
original = stages._train_trial
def _train_trial(setup, teacher, folder, stage, trial, **options):
    with open(f"trained_by_rank{os.environ['RANK']}", "a") as out:
        out.write(f"{stage.name} {trial.number}\\n")
    return original(setup, teacher, folder, stage, trial, **options)
stages._train_trial = _train_trial
"""


def _argv(base: Path, data: Path, *extra: str) -> list[str]:
    return ["--tune", "--parallel", "runs", "--data", str(data), "--methods", "Baseline,KD",
            "--teacher-epochs", "1", "--student-epochs", "2", "--batch-size", "8", "--device", "cpu",
            "--precision", "fp32", "--set", "teacher.model=ResNet18", "--set", "teacher.lr=0.01",
            "--set", "experiment.image_size=8", "--set", f"tune.trials={TRIALS}",
            "--set", f"tune.final_seeds={FINAL_SEEDS}",
            "--logs-dir", str(base / "logs"), "--checkpoints-dir", str(base / "checkpoints"), *extra]


def _launch_two(base: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """run_experiment.py's command line under torchrun, two processes of one thread each."""
    (base / "driver.py").write_text(TRACE_TRIALS + "\nimport sys, run_experiment\n"
                                    "sys.exit(run_experiment.cli(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(base / "driver.py"), *argv], check=False, cwd=base, env=env, capture_output=True,
                          text=True, timeout=600)


def _why(done: subprocess.CompletedProcess) -> str:
    """A failed job's one-line errors (each process writes its own), then the end of its output."""
    errors = dict.fromkeys(line for line in done.stderr.splitlines() if line.startswith("error:"))
    return "\n".join([*errors, "...", done.stderr[-2500:]])


def _check_shared_tuning(base: Path) -> tuple[Path, dict[str, list[dict]]]:
    """What both storages must show after a two-process tuned run: every study ran exactly TRIALS trials, each
    once, by the processes together, the defaults first; the final runs are those that tuning's choice asks
    for. Returns the experiment folder and each study's rows of tuning_trials.csv."""
    (exp_dir,) = (base / "logs").glob("final_experiment_*")
    tuning = json.loads((exp_dir / "experiment_summary.json").read_text())["tuning"]
    studies = tuning["studies"]
    assert list(studies) == ["recipe", "KD"]
    assert tuning["trials_per_study"] == TRIALS and tuning["final_seeds"] == [1, 2]

    with open(exp_dir / "tuning_trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_study = {"recipe": [r for r in rows if r["stage"] == "1"], "KD": [r for r in rows if r["stage"] == "2"]}
    assert len(rows) == 2 * TRIALS, rows
    assert {r["method"] for r in by_study["recipe"]} == {"Baseline"} and {r["method"] for r in by_study["KD"]} == {"KD"}

    trained = Counter()  # (stage, Optuna number) -> how many times a process trained it
    per_rank = {}
    for rank in (0, 1):
        trace = base / f"trained_by_rank{rank}"
        lines = trace.read_text().split() if trace.exists() else []
        per_rank[rank] = len(lines) // 2
        trained.update(zip(lines[::2], map(int, lines[1::2]), strict=True))
    assert all(times == 1 for times in trained.values()), f"a trial trained twice: {trained}"
    assert per_rank[0] >= 1 and per_rank[1] >= 1, f"one process took every trial: {per_rank}"

    for stage, mine in by_study.items():
        numbers = [int(r["optuna_number"]) for r in mine]
        assert len(mine) == TRIALS, (stage, mine)
        assert len(set(numbers)) == TRIALS, f"{stage}: an Optuna number twice: {numbers}"
        assert [int(r["trial"]) for r in mine] == list(range(TRIALS))
        assert len({r["settings"] for r in mine}) == TRIALS, f"{stage}: the same settings twice: {mine}"
        assert {number for s, number in trained if s == stage} == set(numbers)  # each counted trial trained once
        assert all(r["state"] in ("complete", "pruned") and r["seed"] == "0" for r in mine), mine
        assert all(1 <= int(r["epochs"]) <= 2 for r in mine)
        # the defaults are the first trial (Optuna's number 0, enqueued before any process asked)
        first = next(r for r in mine if r["optuna_number"] == "0")
        assert json.loads(first["settings"]) == studies[stage]["defaults"]
        assert studies[stage]["trials"] == TRIALS
        # chosen: the best completed trial, the earliest on a tie
        complete = [r for r in mine if r["state"] == "complete"]
        best = max(complete, key=lambda r: (float(r["best_val"]), -int(r["optuna_number"])))
        assert studies[stage]["chosen"] == json.loads(best["settings"])

    # the final runs: every method tuned on each final seed; at its defaults too where tuning chose otherwise
    # (Baseline's defaults are the recipe: it runs at them where stage 1 chose another lr or weight decay)
    records = json.loads((exp_dir / "comparison_results.json").read_text())
    assert [r["method"] for r in records].count("Teacher") == 1
    expected = [("Baseline", "tuned"), ("KD", "tuned")]
    if studies["KD"]["chosen"] != studies["KD"]["defaults"]:
        expected.append(("KD", "default"))
    if studies["recipe"]["chosen"] != studies["recipe"]["defaults"]:
        expected.append(("Baseline", "default"))
    runs = sorted((r["method"], r["variant"], r["seed"]) for r in records if r["method"] != "Teacher")
    assert runs == sorted((method, variant, seed) for method, variant in expected for seed in (1, 2)), (
        runs, studies)
    assert all(r["status"] == "ok" for r in records), [(r["method"], r["status"]) for r in records]
    return exp_dir, by_study


def test_two_processes_share_each_studys_trials_through_the_journal(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 3})
    done = _launch_two(tmp_path, _argv(tmp_path, data))
    assert done.returncode == 0, _why(done)
    exp_dir, _ = _check_shared_tuning(tmp_path)
    assert (exp_dir / "tuning.journal").is_file()


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL


def _postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries: Debian's newest /usr/lib/postgresql/<version>/bin, else the
    one on PATH."""
    def version(initdb: Path) -> int:
        name = initdb.parents[1].name
        return int(name) if name.isdigit() else 0

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _no_postgres(reason: str) -> None:
    """Under CI (.ci/run installs PostgreSQL) a missing server fails the test; elsewhere it is skipped."""
    message = (f"PostgreSQL test server unavailable: {reason}. Install Debian's postgresql package "
               "(apt-get install postgresql; .ci/run does so)")
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of its own (a new data folder, a free port, a database), stopped and removed
    afterwards, even when the test fails. The server refuses to run as root: under root it runs as postgres."""
    bin_dir = _postgres_bin()
    tools = ("initdb", "postgres", "pg_isready", "createdb", "pg_ctl")
    if bin_dir is None or any(not (bin_dir / tool).is_file() for tool in tools):
        _no_postgres(f"no {', '.join(tools)} under /usr/lib/postgresql/*/bin or on PATH")
    as_server: list[str] = []
    if os.geteuid() == 0:
        try:
            import pwd
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _no_postgres("running as root, and there is no user 'postgres' to run the server as")
        if shutil.which("runuser") is None:
            _no_postgres("running as root without runuser to start the server as user 'postgres'")
        as_server = ["runuser", "-u", "postgres", "--"]

    root = Path(tempfile.mkdtemp(prefix="kd-pg-"))  # short: the socket path must stay under 108 bytes
    if as_server:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port, server = root / "data", _free_port(), None
    log_file = root / "server.log"
    try:
        subprocess.run([*as_server, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True, text=True,
                       timeout=120)
        with open(log_file, "w") as log:
            if as_server:
                os.chown(log_file, owner.pw_uid, owner.pw_gid)
            server = subprocess.Popen(
                [*as_server, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                             check=False).returncode:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not start on port {port}:\n{log_file.read_text()[-2000:]}")
            time.sleep(0.2)
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "kd_tuning"], check=True, capture_output=True, text=True, timeout=60)
        yield f"postgresql://postgres@127.0.0.1:{port}/kd_tuning"
    except subprocess.CalledProcessError as err:
        pytest.fail(f"{' '.join(map(str, err.cmd))} failed: {err.stderr or err.stdout}")
    finally:
        if server is not None and server.poll() is None:
            # fast shutdown: open client connections (the test's own) are closed, not waited for
            subprocess.run([*as_server, str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w",
                            "-t", "30"], check=False, capture_output=True, timeout=60)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_two_processes_share_each_studys_trials_through_postgresql(tmp_path, make_image_folder, postgres_url):
    import optuna
    from optuna.trial import TrialState

    data = make_image_folder(tmp_path / "data", per_class={"train": 8, "val": 3})
    done = _launch_two(tmp_path, _argv(tmp_path, data, "--set", f"tune.storage={postgres_url}"))
    assert done.returncode == 0, _why(done)
    exp_dir, by_study = _check_shared_tuning(tmp_path)
    assert not (exp_dir / "tuning.journal").exists()  # the database holds the studies
    summary = json.loads((exp_dir / "experiment_summary.json").read_text())
    assert summary["tuning"]["storage"] == "database (tune.storage)"

    storage = optuna.storages.RDBStorage(postgres_url)
    try:
        assert sorted(s.study_name for s in optuna.get_all_study_summaries(storage)) == sorted(
            f"{exp_dir.name}/{stage}" for stage in by_study)
        for stage, rows in by_study.items():
            study = optuna.load_study(study_name=f"{exp_dir.name}/{stage}", storage=storage)
            trials = study.get_trials(deepcopy=False)
            # nothing left running or waiting, nothing failed: exactly the counted trials, as the CSV has them
            assert [t.state for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)] == []
            assert len(trials) == TRIALS
            assert sorted(t.number for t in trials) == sorted(int(r["optuna_number"]) for r in rows)
            from_csv = {int(r["optuna_number"]): r for r in rows}
            for trial in trials:
                row = from_csv[trial.number]
                assert trial.params == json.loads(row["settings"])
                assert trial.state.name.lower() == row["state"]
                assert [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)] == json.loads(
                    row["val_per_epoch"])
    finally:
        storage.engine.dispose()

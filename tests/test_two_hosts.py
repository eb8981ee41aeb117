"""Two machines without a shared disk, as two network namespaces joined by a veth pair (CPU, gloo, one thread
per process): one torchrun per namespace (`--nnodes 2`, c10d rendezvous at the first host's address), each in
a working folder of its own.

What only several machines can show: a run's checkpoints and TensorBoard events stay on the machine that
trained it (README's rsync gathers them), rank 0's machine alone holds the experiment folder, and a machine
can be lost in ways torchrun's agent on the other cannot see (its link down, or all its processes killed): the
job then has to end by the project's own watch (kd/experiment/sweep.py, SILENCE_LIMIT_SECONDS), and `--resume`
on the remaining machine has to train only what was lost.

The hosts themselves (namespaces, torchrun per host, cleanup) are tests/netns_hosts.py.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import experiment_argv, experiment_records
from netns_hosts import (JOB_SECONDS, Host, copy_data, gather, link_down, power_off, require_namespaces, start,
                         start_job, stderr_of, two_hosts, wait_for, why)
from kd.experiment.sweep import HEARTBEAT_SECONDS, SILENCE_LIMIT_SECONDS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from compare_records import untimed  # noqa: E402  (clocks and paths aside)

# Rank 0 notices a silent process within SILENCE_LIMIT_SECONDS and one heartbeat, then torchrun ends.
ENDS_WITHIN = 60.0

# Installed on the second host only: its second unit starts (a marker file says so) and then trains slowly,
# so that the test can cut the host off in the middle of that unit; a second marker says if it ever finished.
SLOW_SECOND_UNIT = """
import time
from kd.engine import run as engine_run
from kd.experiment import sweep
original_unit, original_step, taken = sweep.run_methods, engine_run.TrainingRun.step, []
def step(self, *args, **kwargs):
    if len(taken) == 2:
        open("unit_started", "a").close()
        time.sleep(10)
    return original_step(self, *args, **kwargs)
def run_methods(*args):
    taken.append(1)
    records = original_unit(*args)
    if len(taken) == 2:
        open("unit_finished", "w").close()
    return records
engine_run.TrainingRun.step = step
sweep.run_methods = run_methods
"""


@pytest.fixture(scope="session")  # before the session's reference run, which is wasted if the module skips
def namespaces() -> None:
    """Root and `ip`, or the module fails under CI (is skipped elsewhere) with the reason."""
    require_namespaces()


def experiment_dirs(host: Host) -> list[Path]:
    return sorted((host.folder / "logs").glob("final_experiment_*"))


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def expected_checkpoints(records: list[dict]) -> set[str]:
    """checkpoints/students/ of every run (README, Outputs): best and final, one per peer for DML."""
    names = set()
    for record in records:
        if record["method"] == "Teacher":
            continue
        stem = f"{record['method']}_{record['model']}_seed{record['seed']}"
        peers = [f"_peer{k}" for k in range(2)] if record["method"] == "DML" else [""]
        names |= {f"students/{stem}{peer}_{tag}.pth" for peer in peers for tag in ("best", "final")}
    return names


def tensorboard_runs(logs: Path) -> set[str]:
    """The TensorBoard runs under logs/ that hold an events file: method and seed of each."""
    runs = set()
    for events in logs.rglob("events.out.tfevents.*"):
        runs.add(events.parent.name)
    return runs


def test_parallel_runs_on_two_hosts_give_one_process_records_and_gather(tmp_path, namespaces, one_process):
    """Whole runs spread over two machines reproduce one process's records, rank 0's machine writes all of
    them, and README's gather brings every run's checkpoints and TensorBoard events to rank 0's machine."""
    data, expected = one_process
    with two_hosts(tmp_path, 1) as (a, b):
        copy_data(data, a, b)
        job_a, job_b = start_job(a, b, [*experiment_argv(None, Path("data")), "--parallel", "runs"])
        codes = wait_for(job_a, a), wait_for(job_b, b)
        assert codes == (0, 0), why(a, b)
    records = experiment_records(a.folder)
    assert [(r["method"], r["seed"]) for r in records] == [(r["method"], r["seed"]) for r in expected]
    assert untimed(records) == untimed(expected)
    (exp_dir,) = experiment_dirs(a)
    log = (exp_dir / "final_experiment.log").read_text()
    assert "finished on process 0" in log and "finished on process 1" in log  # both machines trained
    assert not any((d / "comparison_results.json").exists() for d in experiment_dirs(b))  # rank 0 alone writes

    wanted = expected_checkpoints(expected)
    on_a, on_b = files_under(a.folder / "checkpoints"), files_under(b.folder / "checkpoints")
    assert wanted - on_a and wanted - on_a <= on_b  # what B trained is on B's disk alone, until gathered
    runs_before = tensorboard_runs(a.folder / "logs")
    how = gather(a, b)
    print(f"gather: {how}")
    on_a = files_under(a.folder / "checkpoints")
    assert wanted <= on_a, f"missing after the gather ({how}): {sorted(wanted - on_a)}"
    assert {"teachers/ResNet18_teacher_best.pth", "teachers/ResNet18_teacher_final.pth"} <= on_a
    runs = tensorboard_runs(a.folder / "logs")
    stamp = exp_dir.name.removeprefix("final_experiment_")
    students = {f"{r['method']}_{r['model']}_Final_{stamp}_seed{r['seed']}" for r in expected
                if r["method"] != "Teacher"}
    assert students - runs_before and students <= runs, f"TensorBoard runs after the gather ({how}): {sorted(runs)}"
    assert f"ResNet18_Teacher_Final_{stamp}" in runs
    assert untimed(experiment_records(a.folder)) == untimed(expected)  # the gather left rank 0's results alone


def test_data_parallel_on_two_hosts_writes_one_experiment_folder_on_rank_0(tmp_path, namespaces, one_process):
    """DDP over two machines: every process trains every run, rank 0 alone writes (the other machine has no
    experiment folder), and the run is one job of two processes. Twice: the first job trains the teacher, which
    only rank 0's machine then has, and the second reuses it (every process used to read, or look for, the
    teacher's file on its own disk)."""
    data, _ = one_process
    argv = [*experiment_argv(None, Path("data"), "Baseline,KD", "0"), "--parallel", "data"]
    with two_hosts(tmp_path, 2) as (a, b):
        copy_data(data, a, b)
        for job in range(2):
            job_a, job_b = start_job(a, b, argv)
            codes = wait_for(job_a, a), wait_for(job_b, b)
            assert codes == (0, 0), f"job {job + 1}: {why(a, b)}"
    assert experiment_dirs(b) == [] and not (b.folder / "checkpoints").exists()
    assert len(experiment_dirs(a)) == 2
    for exp_dir, reused in zip(experiment_dirs(a), (False, True)):
        summary = (exp_dir / "experiment_summary.json").read_text()
        assert '"processes": 2' in summary and '"backend": "gloo"' in summary
        records = json.loads((exp_dir / "comparison_results.json").read_text())
        assert [(r["method"], r["status"]) for r in records] == [("Teacher", "ok"), ("Baseline", "ok"), ("KD", "ok")]
        assert records[0]["reused"] is reused


# --- a host lost in the middle of a unit ---------------------------------------------------------------------

Run = tuple[str, int]  # (method, seed)


@dataclass
class Cut:
    """One way to lose host B while it trains its (slowed) second unit, and what the test saw of it: the
    moment of the cut, what was finished then on each host, and when host A's torchrun ended."""
    name: str
    lose: Callable[[Host], list[int]]  # cuts host B off; returns the pids it killed (none for a link)
    a: Host
    b: Host
    job_a: subprocess.Popen
    job_b: subprocess.Popen
    cut_at: float | None = None                     # time.monotonic() of the cut
    exited_at: float | None = None                  # time.monotonic() when A's torchrun was seen ended
    on_a_at_cut: set[Run] = field(default_factory=set)   # records in rank 0's comparison_results.json
    on_b_at_cut: set[Run] = field(default_factory=set)   # runs whose final checkpoints B had written
    killed: list[int] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        assert self.cut_at is not None and self.exited_at is not None
        return self.exited_at - self.cut_at


def records_on(host: Host) -> list[dict]:
    """Rank 0's records so far ([] before its experiment folder exists); the file is replaced atomically."""
    folders = experiment_dirs(host)
    results = folders[0] / "comparison_results.json" if folders else None
    if results is None or not results.exists():
        return []
    return json.loads(results.read_text())


def runs_of(records: list[dict]) -> set[Run]:
    return {(r["method"], r["seed"]) for r in records if r["method"] != "Teacher"}


def finished_on(host: Host, expected: list[dict]) -> set[Run]:
    """The runs whose checkpoints (the final ones included, written at a run's end) are on the host's disk."""
    on_disk = files_under(host.folder / "checkpoints") if (host.folder / "checkpoints").exists() else set()
    return runs_of([r for r in expected if expected_checkpoints([r]) <= on_disk])


def trained_where(log: str) -> dict[Run, int]:
    """From rank 0's log ("DML seed 1 finished on process 1: DML ok"): the process that trained each run."""
    where = {}
    for methods, seed, process in re.findall(r"(\S+) seed (\d+) finished on process (\d+)", log):
        for method in methods.split("+"):
            where[(method, int(seed))] = int(process)
    return where


def cut_when_mid_unit(cuts: list[Cut], expected: list[dict]) -> None:
    """Cut each pair as soon as B is inside its slowed second unit and rank 0 has written a unit's records
    besides the teacher's (earlier units finished), noting what each host had finished at that moment."""
    deadline = time.monotonic() + JOB_SECONDS
    waiting = list(cuts)
    while waiting:
        for cut in list(waiting):
            for job, host in ((cut.job_a, cut.a), (cut.job_b, cut.b)):
                if job.poll() is not None:
                    pytest.fail(f"{cut.name}: {host.namespace}'s torchrun ended (code {job.returncode}) before "
                                f"the cut:\n{why(cut.a, cut.b)}")
            records = records_on(cut.a)
            if (cut.b.folder / "unit_started").exists() and len(records) >= 2:
                cut.on_b_at_cut = finished_on(cut.b, expected)
                cut.on_a_at_cut = runs_of(records)
                assert not (cut.b.folder / "unit_finished").exists(), f"{cut.name}: B's unit ended before the cut"
                cut.killed = cut.lose(cut.b)
                cut.cut_at = time.monotonic()
                print(f"[{cut.name}] cut at: rank 0 had {sorted(cut.on_a_at_cut)}, B had finished "
                      f"{sorted(cut.on_b_at_cut)}")
                waiting.remove(cut)
        if time.monotonic() > deadline:
            pytest.fail(f"no moment to cut within {JOB_SECONDS} s: {[c.name for c in waiting]}\n"
                        + "\n".join(why(c.a, c.b) for c in waiting))
        time.sleep(0.1)


def wait_for_host_a(cuts: list[Cut]) -> None:
    """Note when each host A's torchrun ends (polled every 0.1 s); a generous limit past ENDS_WITHIN, so that
    a slow end is measured and reported rather than cut short."""
    deadline = max(cut.cut_at for cut in cuts) + 2 * ENDS_WITHIN
    while any(cut.exited_at is None for cut in cuts):
        for cut in cuts:
            if cut.exited_at is None and cut.job_a.poll() is not None:
                cut.exited_at = time.monotonic()
        if time.monotonic() > deadline:
            late = [cut for cut in cuts if cut.exited_at is None]
            pytest.fail(f"host A's torchrun still runs {2 * ENDS_WITHIN:.0f} s after the cut: "
                        f"{[c.name for c in late]}\n" + "\n".join(why(c.a, c.b) for c in late))
        time.sleep(0.1)


def test_a_lost_host_ends_the_job_within_a_minute_and_resume_trains_only_what_it_lost(tmp_path, namespaces,
                                                                                      one_process):
    """A machine lost mid-unit, by its link going down or by all its processes killed: torchrun's agent on
    rank 0's machine sees neither, so the project's silence watch must end the job (within a minute, not
    torchrun's 30-minute timeouts), with its message and the resume command; what finished before the cut
    must be on disk (the records on rank 0's machine, the checkpoints on the machine that trained each run),
    and `--resume` by one plain process on rank 0's machine must train only the runs that were lost and give
    the records one process gives. The two cuts run side by side: most of their time is the silence limit."""
    data, expected = one_process
    argv = [*experiment_argv(None, Path("data")), "--parallel", "runs"]
    with ExitStack() as stack:
        cuts = []
        for number, (name, lose) in enumerate((("link down", link_down), ("SIGKILL", power_off)), start=3):
            a, b = stack.enter_context(two_hosts(tmp_path / name.replace(" ", "_"), number))
            copy_data(data, a, b)
            cuts.append(Cut(name, lose, a, b, *start_job(a, b, argv, patch_b=SLOW_SECOND_UNIT)))
        cut_when_mid_unit(cuts, expected)
        wait_for_host_a(cuts)
        times = ", ".join(f"{cut.name} {cut.seconds:.1f} s" for cut in cuts)
        print(f"cut to the end of host A's torchrun: {times} (silence limit {SILENCE_LIMIT_SECONDS:.0f} s, "
              f"heartbeat {HEARTBEAT_SECONDS:.0f} s)")
        assert all(cut.seconds < ENDS_WITHIN for cut in cuts), f"cut to exit: {times}\n" + "\n".join(
            why(cut.a, cut.b) for cut in cuts)

        resumes = {}
        for cut in cuts:
            a, b = cut.a, cut.b
            assert cut.job_a.returncode != 0, f"{cut.name}: {why(a, b)}"
            if cut.name == "SIGKILL":
                assert len(cut.killed) >= 2, f"SIGKILL: only {cut.killed} in {b.namespace} (agent and worker)"
            (exp_dir,) = experiment_dirs(a)
            ends = [line for line in stderr_of(a).splitlines()
                    if line.startswith("error: process 1 has not been heard from")]
            hint = re.search(r"continue with: python run_experiment\.py --resume (\S+)$", ends[0] if ends else "")
            assert len(ends) == 1 and hint and (a.folder / hint[1]).resolve() == exp_dir.resolve(), (
                f"{cut.name}: rank 0's one-line end with the resume command for {exp_dir}?\n{why(a, b)}")
            # what finished before the cut: the records on rank 0's disk, B's runs included (they came
            # through the store), and each run's checkpoints on the machine that trained it
            finished = runs_of(records_on(a))
            assert cut.on_b_at_cut and cut.on_a_at_cut, f"{cut.name}: nothing finished before the cut?"
            assert cut.on_a_at_cut | cut.on_b_at_cut <= finished < runs_of(expected), (
                f"{cut.name}: at the cut rank 0 had {sorted(cut.on_a_at_cut)}, B {sorted(cut.on_b_at_cut)}; "
                f"after it rank 0 wrote {sorted(finished)}")
            where = trained_where((exp_dir / "final_experiment.log").read_text())
            assert set(where) == finished, f"{cut.name}: rank 0's log {where} against its records {finished}"
            for run, process in where.items():
                trainer = (a, b)[process]
                assert run in finished_on(trainer, expected), (
                    f"{cut.name}: {run}, trained on process {process}, has no checkpoints on {trainer.namespace}")
            assert {run for run, process in where.items() if process == 1} >= cut.on_b_at_cut, (
                f"{cut.name}: B had finished {sorted(cut.on_b_at_cut)}, rank 0 collected from it {where}")
            # one plain process on host A, no torchrun: the other machine may be gone for good
            resume = start(a, [sys.executable, "driver.py", *argv, "--resume"], name="resume")
            resumes[cut.name] = finished, resume

        for cut in cuts:
            a, (finished, resume) = cut.a, resumes[cut.name]
            assert wait_for(resume, a) == 0, f"{cut.name}: {stderr_of(a, 'resume')[-3000:]}"
            log = stderr_of(a, "resume")
            trained = [(m, int(seed)) for m, seed in re.findall(r"student (\w+) with .* \(seed (\d+)\)", log)]
            lost = runs_of(expected) - finished
            assert sorted(trained) == sorted(lost), f"{cut.name}: the resume trained {trained}, lost were {lost}"
            assert not set(trained) & cut.on_b_at_cut, f"{cut.name}: B's finished runs trained again: {trained}"
            assert untimed(experiment_records(a.folder)) == untimed(expected), cut.name
            only_on_b = sorted(finished_on(cut.b, expected) & finished - finished_on(a, expected))
            print(f"[{cut.name}] resume on A trained {sorted(trained)}; runs B finished before the cut "
                  f"{only_on_b} kept their records and were not retrained: their checkpoints are on B's disk "
                  "alone (README's gather)")

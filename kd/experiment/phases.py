"""The phases of an experiment, in the order final.main runs them: resume checks, the plan, the start (the
experiment folder), training (the teacher, then every run) and the finish. Each phase gets what it needs and
returns what the next one uses (`Resumed`, `Plan`, `Progress`)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kd.engine import distributed
from kd.errors import UserError
from kd.experiment.estimate import StepTimes, describe_estimate, estimate_seconds, time_steps
from kd.experiment.logs import setup_logging
from kd.experiment.plan import describe_plan, groups_to_train
from kd.experiment.resume import first_difference, kept_precision
from kd.experiment.runs import Teacher, run_methods
from kd.experiment.setup import Setup
from kd.experiment.sweep import StoppedByTorchrun, Unit, queue_described, stop_on_sigterm, train_spread
from kd.experiment.teacher import TeacherSource, find_teacher, obtain_teacher
from kd.results.files import ExperimentFolder, create_experiment_dir, experiment_summary, write_records, write_results
from kd.results.record import TEACHER, RunRecord, run_name
from kd.results.table import format_table
from kd.tuning.outcome import Tuned
from kd.tuning.plan import check_tuning_runtime, describe_tuning
from kd.tuning.records import tuning_summary, write_trials_csv
from kd.tuning.stages import tune

log = logging.getLogger("kd")


@dataclass
class Resumed:
    """An unfinished experiment to continue: its folder, its finished runs and its summary so far."""
    folder: ExperimentFolder
    records: list[RunRecord]
    summary: dict


def check_resume(setup: Setup, exp_dir: Path, records: list[RunRecord], summary: dict) -> tuple[Setup, Resumed]:
    """Refuse to continue an experiment whose settings or images changed; continue it in the precision it
    started in. Its failed runs are tried again."""
    difference = first_difference(summary["config"], setup.config)
    if summary["data"]["fingerprint"] != setup.data.fingerprint:
        difference = f"the images in {setup.data.root} changed"
    if difference:
        raise UserError(f"cannot resume {exp_dir}: {difference}; resume with the same settings or start "
                        "a new experiment without --resume")
    setup = setup.on(kept_precision(setup.runtime, summary["environment"]["precision"], exp_dir))
    return setup, Resumed(ExperimentFolder(exp_dir, summary["stamp"]), [r for r in records if r.ok], summary)


@dataclass
class Plan:
    """What the experiment will do, settled before anything is written."""
    teacher: TeacherSource | None  # None on the processes that get the teacher from rank 0 (--parallel runs)
    times: StepTimes | None        # timed training steps (--check's estimate, the --parallel runs queue)
    units: list[Unit] | None       # the --parallel runs queue (made after tuning when tuned); None: one process


def make_plan(setup: Setup, resumed: Resumed | None, check_only: bool) -> Plan:
    """Print the plan; find the teacher; time a few steps and queue the runs where they are needed."""
    if distributed.is_main():
        print(describe_plan(setup))
    spread = distributed.spreads_runs()
    tuning = setup.config["experiment"]["tune"]
    if tuning:
        check_tuning_runtime(setup)
    finished = resumed.records if resumed else None
    # only rank 0 looks for a saved teacher, so that on other machines the file need not exist: spread over
    # processes, the others get the teacher itself from rank 0 later; data-parallel, they get its source now
    teacher = find_teacher(setup, finished) if distributed.is_main() else None
    if not spread:
        teacher = distributed.broadcast_object(teacher)
    timed = distributed.is_main() and (check_only or spread)
    times = time_steps(setup, train_teacher=teacher.checkpoint is None) if timed else None
    if tuning and distributed.is_main():  # its stages and budget (with --check, their cost too)
        print(describe_tuning(setup, times))
    units = None
    if spread and not tuning:  # a tuned experiment's runs are known once tuning has chosen: queued then
        units, described = queue_described(setup, finished or [], times)
        if described:  # also when training: the queue and its estimate are part of the plan
            print(described)
    return Plan(teacher, times, units)


def report_check(setup: Setup, plan: Plan) -> None:
    """--check: the time estimate (the spread's and the tuning's are in the plan), and that nothing was trained."""
    if distributed.is_main() and plan.units is None and not setup.config["experiment"]["tune"]:
        print(describe_estimate(estimate_seconds(setup, plan.times), setup))
    print("check passed: data and config are valid; nothing was trained")


@dataclass
class Progress:
    """The experiment as it trains: its folder, the records so far (rewritten to disk after every run) and
    its summary."""
    setup: Setup
    folder: ExperimentFolder
    records: list[RunRecord]
    summary: dict
    started: float = field(default_factory=time.perf_counter)  # the clock, less the time before a resume

    @property
    def resume_hint(self) -> str:
        return f"Finished runs are saved; continue with: python run_experiment.py --resume {self.folder.path}"

    def teacher_done(self, record: RunRecord) -> None:
        if not self.records:  # a resumed experiment keeps its teacher's first record
            self.records.append(record)
            teacher_file = record.teacher_file
            self.summary["teacher"] = {"path": teacher_file.checkpoint, "sha256": teacher_file.sha256,
                                       "accuracy": record.result.best_accuracy, "reused": teacher_file.reused}
        self.runs_done([TEACHER], self.records[0].seed)

    def unit_done(self, unit: Unit, records: list[RunRecord], process: int) -> None:
        log.info("%s finished on process %d: %s", unit, process, ", ".join(f"{r.method} {r.status}" for r in records))
        self.records.extend(records)
        self.runs_done([], unit.seed)

    def save(self) -> None:
        write_records(self.folder.path, self.records)
        write_results(self.folder.path, self.records, self.summary)

    def tuned(self, tuned: Tuned, rows: list[dict]) -> None:
        """Tuning chose: the runs from here on train in its variants, and the summary tells what it did (from
        the trials' `rows`, which rank 0 has)."""
        self.setup = self.setup.with_tuned(tuned)
        self.summary["tuning"] = tuning_summary(self.setup, self.folder, tuned, rows)
        self.save()

    def runs_done(self, names: list[str], seed: int) -> None:
        """Rewrite the comparison files (an interrupted experiment shows its finished runs), then drop the
        runs' resume state (`names` are run names): from here on they count as finished."""
        self.summary["total_time"] = time.perf_counter() - self.started
        # in plan order, however the runs were spread over processes or interrupted and resumed
        self.records.sort(key=_plan_order(self.setup))
        self.save()
        for name in names:
            self.folder.resume_path(name, seed).unlink(missing_ok=True)


def _plan_order(setup: Setup) -> Callable[[RunRecord], int]:
    """Sort key of records: the teacher, then seed by seed the methods in training order (a resumed tuned
    experiment's runs, before its tuning is read back, at the end as they were)."""
    order = {(method, group.variant, group.seed): i for i, (group, method) in enumerate(
        (group, method) for group in groups_to_train(setup) for method in group.methods)}
    return lambda record: -1 if record.method == TEACHER else order.get(
        (record.method, record.variant, record.seed), len(order))


def start(setup: Setup, resumed: Resumed | None) -> Progress:
    """A new experiment folder with its empty results (from then on it can be resumed), or the resumed one;
    its log file."""
    setup.planned()
    if resumed is None:
        folder = create_experiment_dir(setup.logs)
        progress = Progress(setup, folder, [], experiment_summary(setup, folder))
        progress.save()
    else:
        progress = Progress(setup, resumed.folder, resumed.records, resumed.summary,
                            time.perf_counter() - resumed.summary.get("total_time", 0.0))
    setup_logging(progress.folder.path / "final_experiment.log")
    log.info("Experiment folder: %s%s", progress.folder.path, " (resumed)" if resumed else "")
    return progress


def train(progress: Progress, plan: Plan) -> None:
    """The teacher, then every run still to train: in this process (seed by seed, methods together), or
    spread over the processes of a torchrun job (--parallel runs)."""
    setup, folder = progress.setup, progress.folder
    tune_first = (lambda teacher: _tune(progress, teacher)) if setup.config["experiment"]["tune"] else None
    try:
        if distributed.spreads_runs():
            stop_on_sigterm(progress.resume_hint)
            train_spread(setup, plan.teacher, plan.units, folder, progress.resume_hint, progress.teacher_done,
                         progress.unit_done, plan.times, progress.records, tune_first)
            return
        teacher, record = obtain_teacher(setup, plan.teacher, folder)
        progress.teacher_done(record)
        if tune_first is not None:
            setup = tune_first(teacher)
        for group in groups_to_train(setup, progress.records):  # runs finished before a stop are kept
            progress.records.extend(run_methods(group.methods, group.seed, setup, teacher, folder, group.variant))
            progress.runs_done([run_name(method, group.variant) for method in group.methods], group.seed)
    except KeyboardInterrupt as interruption:
        if not isinstance(interruption, StoppedByTorchrun):  # that one told the hint as it came
            log.error("Interrupted. %s", progress.resume_hint)
        raise


def _tune(progress: Progress, teacher: Teacher) -> Setup:
    """Both tuning stages (finished studies are read back on resume); the setup of the final runs."""
    setup, folder = progress.setup, progress.folder
    rows: list[dict] = []

    def stage_done() -> None:  # rank 0 rewrites tuning_trials.csv after every study; the last one's rows stay
        rows[:] = write_trials_csv(setup, folder)
    tuned = tune(setup, teacher, folder, stage_done)
    if distributed.is_main() and not rows:  # no study ran: the file still says so, with its header alone
        stage_done()
    progress.tuned(tuned, rows)
    return progress.setup


def finish(progress: Progress) -> list[RunRecord]:
    """The final results, plots and report.md (rank 0 writes them), the table, and the failed runs named."""
    if distributed.spreads_runs() and not distributed.is_main():
        return progress.records  # rank 0 has every record and writes the results
    summary, folder = progress.summary, progress.folder
    summary["finished"] = True
    leftover = folder.path / "resume"
    if distributed.is_main() and leftover.is_dir() and not any(leftover.iterdir()):
        leftover.rmdir()  # every run finished: nothing left to resume
    table = write_results(folder.path, progress.records, summary, final=True)
    if distributed.is_main():
        print(format_table(table))
    log.info("Total time %.1f s; results in %s", summary["total_time"], folder.path)
    failed = [r for r in progress.records if not r.ok]
    if failed:
        log.error("%d run(s) failed: %s", len(failed),
                  "; ".join(f"{r.method} seed {r.seed}: {r.reason}" for r in failed))
    return progress.records

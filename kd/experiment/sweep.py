"""--parallel runs: the runs of an experiment spread over the processes of a torchrun job.

Every process trains whole runs by itself, under `distributed.alone()`, exactly as a one-process experiment
trains them, so their records are the same. The runs form units: one method and seed or, with
share_teacher, the teacher-based methods of a seed together (one teacher forward per batch). Rank 0 first
obtains the teacher as a single process would (trains it alone, or reuses one) while the others wait: a
teacher trained data-parallel would be another teacher, and every distilled record would differ from a
single process's. The teacher reaches the others through the job's store (torchrun's), so no file needs to
be shared. Then the units are queued, the most expensive first, and a process that is free takes the next
one from a counter in the store. Every process posts its units' records there, and rank 0 alone writes the
experiment's files, as the records arrive.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch

from kd.engine import distributed
from kd.engine.checkpoint import load_checkpoint
from kd.experiment.estimate import StepTimes, as_minutes, group_seconds, teacher_seconds
from kd.experiment.plan import groups_to_train
from kd.experiment.runs import Teacher, run_methods
from kd.experiment.setup import Setup
from kd.experiment.teacher import TeacherSource, build_teacher, obtain_teacher, teacher_path
from kd.results.files import ExperimentFolder
from kd.results.record import RunRecord, run_name

log = logging.getLogger("kd")

HEARTBEAT_SECONDS = 5.0
# A process not heard from for this long is gone: killed, or its node lost (torchrun's agent on another
# node cannot see that), so rank 0 ends the job.
SILENCE_LIMIT_SECONDS = 45.0
TEACHER_WAIT = timedelta(days=30)  # a teacher may train for days while the others wait for it
STORE_PIECE = 4 << 20


@dataclass(frozen=True)
class Unit:
    """Runs trained together by one process: methods of one seed (in one variant of a tuned experiment)."""
    seed: int
    methods: tuple[str, ...]
    seconds: float  # estimated
    variant: str = ""

    def __str__(self) -> str:
        return f"{'+'.join(run_name(m, self.variant) for m in self.methods)} seed {self.seed}"


def plan_units(setup: Setup, records: list[RunRecord], times: StepTimes) -> list[Unit]:
    """The runs that `records` do not hold yet, as units in queue order: the most expensive first (a long
    unit started last would keep the job waiting on one process)."""
    units = [Unit(group.seed, tuple(group.methods), group_seconds(setup, times, group.methods), group.variant)
             for group in groups_to_train(setup, records)]
    return sorted(units, key=lambda unit: -unit.seconds)


def queue(setup: Setup, records: list[RunRecord], times: StepTimes | None) -> list[Unit]:
    """The units still to train, ordered by rank 0 from its timed steps (`times`), the same on every process."""
    units = None
    if distributed.is_main():
        with distributed.alone():  # a unit's cost as one process trains it: all of each split
            units = plan_units(setup, records, times)
    return distributed.broadcast_object(units)


def queue_described(setup: Setup, records: list[RunRecord], times: StepTimes | None) -> tuple[list[Unit], str]:
    """`queue`, and on rank 0 the plan's lines on how it spreads over the processes' devices ("" elsewhere)."""
    units = queue(setup, records, times)
    devices = distributed.gather_objects(device_text(setup.runtime.device))
    return units, describe_spread(setup, units, times, devices) if distributed.is_main() else ""


def describe_spread(setup: Setup, units: list[Unit], times: StepTimes, devices: list[str]) -> str:
    """--check's lines on how the runs will be spread: processes, devices, the queue, the wall time."""
    with distributed.alone():
        teacher = teacher_seconds(setup, times)
    alone_total = teacher + sum(unit.seconds for unit in units)
    counts = {device: devices.count(device) for device in devices}
    lines = [f"parallel runs: {len(devices)} processes on " + ", ".join(
                 f"{device} (x{count})" for device, count in counts.items()),
             f"  teacher: {'trained by process 0 (' + as_minutes(teacher) + ')' if teacher else 'reused'}; "
             f"queue, first taken first: " + ", ".join(f"{unit} (~{as_minutes(unit.seconds)})" for unit in units),
             f"estimated wall time: ~{as_minutes(spread_seconds(units, len(devices), teacher))} on {len(devices)} "
             f"processes against ~{as_minutes(alone_total)} in one process, from timed training steps on "
             f"{setup.runtime.device} ({setup.runtime.precision}); processes sharing a device or the CPU's cores "
             "slow each other, which the estimate does not model"]
    return "\n".join(lines)


def spread_seconds(units: list[Unit], processes: int, teacher: float) -> float:
    """The wall time of the queue on `processes` processes, after the `teacher` seconds: each unit goes to
    the process that is free first."""
    free = [teacher] * processes
    for unit in units:
        free[free.index(min(free))] += unit.seconds
    return max(free)


def device_text(device: torch.device) -> str:
    """A process's device for the plan (on the CPU with its thread count: processes share the cores)."""
    return f"{device}, {torch.get_num_threads()} thread(s)" if device.type == "cpu" else str(device)


def _put(store, key: str, data: bytes) -> None:
    """Store `data` under `key` in pieces (the store takes at most 8 MiB a message); `key` itself, written
    last, says how many, so that a reader who sees it finds them all."""
    pieces = [data[start:start + STORE_PIECE] for start in range(0, len(data), STORE_PIECE)] or [b""]
    for number, piece in enumerate(pieces):
        store.set(f"{key}/{number}", piece)
    store.set(key, str(len(pieces)))


def _get(store, key: str) -> bytes:
    return b"".join(store.get(f"{key}/{number}") for number in range(int(store.get(key))))


def _tensors_to_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


class _Watch:
    """Liveness across nodes: every process counts up its own key in the store every few seconds, and rank 0
    ends the job when another process's count stands still for SILENCE_LIMIT_SECONDS. A process that loses
    the store (rank 0's node gone) stops as well."""

    def __init__(self, store, resume_hint: str):
        self.store, self.resume_hint = store, resume_hint
        self.rank, self.size = distributed.job_rank(), distributed.job_size()
        self.stopped = threading.Event()
        self.heard: dict[int, tuple[int, float]] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            silent = None
            try:
                self.store.add(f"beat/{self.rank}", 1)
                silent = self._silent() if self.rank == 0 else None
            except Exception:  # noqa: BLE001 - the store's host is gone, whatever the error type says
                self._end(f"process {self.rank} lost contact with rank 0 (its node stopped?)")
            if silent is not None:
                self._end(f"process {silent} has not been heard from for {SILENCE_LIMIT_SECONDS:.0f} s (it died, "
                          "or its node was lost)")

    def _silent(self) -> int | None:
        now = time.monotonic()
        for other in range(1, self.size):
            if self.store.check([f"left/{other}"]):
                continue
            count = self.store.add(f"beat/{other}", 0)
            last_count, since = self.heard.get(other, (-1, now))
            if count != last_count:
                self.heard[other] = (count, now)
            elif now - since > SILENCE_LIMIT_SECONDS:
                return other
        return None

    def _end(self, why: str) -> None:
        sys.stderr.write(f"error: {why}: the job ends. {self.resume_hint}\n")
        sys.stderr.flush()
        os._exit(1)

    def stop(self) -> None:
        self.stopped.set()
        self.store.set(f"left/{self.rank}", "1")


def _receive_teacher(setup: Setup, store) -> Teacher:
    """The teacher rank 0 obtained, built here from its checkpoint (no file needs to be shared)."""
    store.wait(["teacher"], TEACHER_WAIT)
    shipped = torch.load(io.BytesIO(_get(store, "teacher")), map_location="cpu", weights_only=True)
    return Teacher(build_teacher(setup, shipped["checkpoint"]).eval(), shipped["predictions"])


def train_spread(setup: Setup, source: TeacherSource | None, units: list[Unit] | None, folder: ExperimentFolder,
                 resume_hint: str, teacher_done: Callable[[RunRecord], None],
                 unit_done: Callable[[Unit, list[RunRecord], int], None], times: StepTimes | None = None,
                 finished: list[RunRecord] | None = None, tune_first: Callable[[Teacher], Setup] | None = None
                 ) -> None:
    """Train the teacher (rank 0) and `units` over the job's processes. On rank 0, `teacher_done` gets the
    teacher's record and `unit_done` every unit's records and the process that trained it, in the order
    they finish. With `tune_first`, every process takes trials of the studies first, and the units (None
    until then) are queued from what tuning chose, less the `finished` runs, by rank 0's `times`."""
    store, rank = distributed.store(), distributed.job_rank()
    watch = _Watch(store, resume_hint)
    if rank == 0:
        with distributed.alone():
            teacher, record = obtain_teacher(setup, source, folder)
        checkpoint = source.checkpoint or load_checkpoint(teacher_path(setup))
        _put(store, "teacher", _tensors_to_bytes({"checkpoint": checkpoint, "predictions": teacher.predictions}))
        teacher_done(record)
    else:
        teacher = _receive_teacher(setup, store)
    if tune_first is not None:
        setup = tune_first(teacher)
        units, described = queue_described(setup, finished or [], times)
        if described:
            log.info("%s", described)
    arrived: set[int] = set()

    def collect(wait: bool) -> None:
        """Hand the units other processes finished to `unit_done` (on rank 0; `wait`: until all are in)."""
        while rank == 0 and len(arrived) < len(units):
            ready = [i for i in range(len(units)) if i not in arrived and store.check([f"done/{i}"])]
            for index in ready:
                arrived.add(index)
                process, records = pickle.loads(_get(store, f"done/{index}"))
                unit_done(units[index], records, process)
            if not wait:
                return
            if not ready:
                time.sleep(0.5)

    while (index := store.add("next", 1) - 1) < len(units):
        unit = units[index]
        log.info("Process %d trains %s", rank, unit)
        with distributed.alone():
            records = run_methods(list(unit.methods), unit.seed, setup, teacher, folder, unit.variant)
            for method in unit.methods:  # the run's state lives where it trained
                folder.resume_path(run_name(method, unit.variant), unit.seed).unlink(missing_ok=True)
        _put(store, f"done/{index}", pickle.dumps((rank, records)))
        collect(wait=False)
    collect(wait=True)
    watch.stop()


class StoppedByTorchrun(KeyboardInterrupt):
    """An interruption whose resume hint was told as it came: torchrun kills the process (SIGKILL) if it does
    not end soon after its SIGTERM, which may be before the interruption reaches the code that tells it."""


def stop_on_sigterm(resume_hint: str) -> None:
    """torchrun stops the other processes with SIGTERM when one fails: on rank 0 that is an interruption,
    which says at once where the finished runs are and how to continue (the others end silently)."""
    def stopped(_signum: int, _frame) -> None:
        log.error("Stopped by torchrun: another process of this job ended (torchrun's report below names it). %s",
                  resume_hint)
        raise StoppedByTorchrun

    if distributed.job_rank() == 0:
        signal.signal(signal.SIGTERM, stopped)

"""The Optuna side of tuning: where a study lives, its sampler and pruner, which trials count, and how the
processes of a job share one study's trial budget.

A trial counts when it completed, was pruned, or failed by itself (its loss diverged: user attribute
"failure"). A trial left running by a stop (kill -9, a lost machine) does not: `reopen` marks it failed and
queues its settings again, so that `--resume` runs it once more and no trial is lost or counted twice.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from kd.engine import distributed
from kd.errors import UserError

log = logging.getLogger("kd")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the project logs each trial itself

FAILURE = "failure"  # user attribute of a trial that failed by itself, with the reason


def counts(trial: FrozenTrial) -> bool:
    """Whether a trial uses up one of its study's budget (see the module's docstring)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and FAILURE in trial.user_attrs)


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's counted trials, in the order they were asked for."""
    return [trial for trial in study.get_trials(deepcopy=False) if counts(trial)]


@functools.cache  # one storage per process for all studies: opening replays a journal, or starts an engine
def open_storage(url: str | None, journal: Path) -> optuna.storages.BaseStorage:
    """Optuna's journal file `journal` (safe for several processes on one machine), or the database at `url`
    (any RDB URL Optuna takes, such as PostgreSQL's, for several machines)."""
    if url is None:
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's and the drivers' errors alike: say why, in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        shown = _without_password(url)
        raise UserError(f"cannot reach tune.storage '{shown}' ({reason[:200]}): start the database, fix the URL, "
                        "or set tune.storage to null (a journal file in the experiment folder)") from None


def _without_password(url: str) -> str:
    """The URL as an error message may show it."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:  # not a URL at all: nothing to hide
        return url


class _CountedTrialsOnly(optuna.Study):
    """The study as a pruner should see it: without the trials a stop interrupted (their retries stand in for
    them), so that a resumed study prunes exactly as an uninterrupted one."""

    def __init__(self, study: optuna.Study):
        super().__init__(study_name=study.study_name, storage=study._storage)

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return [trial for trial in super().get_trials(deepcopy=deepcopy, states=states)
                if trial.state != TrialState.FAIL or counts(trial)]


class CountedPruner(optuna.pruners.BasePruner):
    """Successive halving (Optuna's) over the counted trials only."""

    def __init__(self, min_epochs: int, reduction: int):
        self.pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=reduction)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.pruner.prune(_CountedTrialsOnly(study), trial)


def make_pruner(tune_cfg: dict) -> optuna.pruners.BasePruner:
    if tune_cfg["pruner"] == "none":
        return optuna.pruners.NopPruner()
    return CountedPruner(tune_cfg["pruner_min_epochs"], tune_cfg["pruner_reduction"])


def reseed(study: optuna.Study, trial: optuna.Trial, seed: int, trials: int) -> None:
    """Give the trial just asked for a sampler seeded by its place among the study's trials, interrupted ones
    not counted: each trial draws with its own seed, also when several processes ask at once, and a resumed
    study draws what an uninterrupted one would. TPE models the results after half the budget (random before)."""
    place = sum(1 for other in study.get_trials(deepcopy=False)
                if other.number < trial.number and (other.state != TrialState.FAIL or counts(other)))
    study.sampler = optuna.samplers.TPESampler(seed=seed + place, n_startup_trials=max(1, trials // 2))


def reopen(study: optuna.Study, first: dict | None) -> int:
    """Prepare a study (one process does, before the others join): a new one gets `first` as its first trial;
    trials a stop left running are marked failed and their settings queued again. Returns how many trials
    count already."""
    trials = study.get_trials(deepcopy=False)
    if not trials and first is not None:
        study.enqueue_trial(first)
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            log.info("%s: trial %d was interrupted; its settings run again", study.study_name, trial.number)
            study.enqueue_trial(trial.params)
            study.tell(trial.number, state=TrialState.FAIL)
    return len(counted_trials(study))


class Claims:
    """A study's remaining trials, taken one at a time by the processes that share it (through the torchrun
    store when runs are spread over processes), so that exactly as many run as the budget asks."""

    def __init__(self, key: str, remaining: int):
        self.key, self.remaining, self.taken = key, remaining, 0

    def take(self) -> bool:
        if distributed.spreads_runs():
            return distributed.store().add(self.key, 1) <= self.remaining
        self.taken += 1
        return self.taken <= self.remaining


def all_finished(key: str) -> None:
    """Wait until every process of the job has finished its share of a study (trials may run far longer than
    a collective's timeout; a lost process ends the job through the heartbeat instead)."""
    if not distributed.spreads_runs():
        return
    store = distributed.store()
    store.add(key, 1)
    while store.add(key, 0) < distributed.job_size():
        time.sleep(0.5)

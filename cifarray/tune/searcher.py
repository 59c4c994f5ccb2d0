"""The sweep's searcher: Optuna TPE with its study stored in OUT/optuna.journal, behind a concurrency limit that a
resumed sweep takes from the allocation it resumes on.

Tune restores an experiment's searcher, scheduler and concurrency limit from what it pickled when the sweep began,
and takes no new spec on restore (by design: ray-project/ray#33495). A sweep resumed on a bigger or smaller Slurm
allocation would then run as many trials at once as the first one did, and one resumed from a folder mounted at
another path would look for its study where it was. So what Tune pickles here leaves out where it runs: a process
that builds or restores a Tuner first says where (`bind`: the sweep folder, the trials at once its cluster holds),
and an unpickled searcher or limiter takes both from it.

- `StoredOptunaSearch` is Ray's `OptunaSearch` with an Optuna storage in OUT: the journal file (OUT/optuna.journal,
  Optuna's storage for NFS, with its open(O_EXCL) lock; sweeps begun before it keep SQLite, OUT/optuna.db). The
  study is on disk while the sweep runs, so `optuna-dashboard OUT/optuna.journal` shows every trial, its parameters,
  value, intermediate values and feasibility (the budget constraint), and Optuna's own API reads it after. Each
  Optuna trial carries the Tune trial's id and parameter count as user attributes; the sweep's [baseline] is
  enqueued as its first trial (Ray's points_to_evaluate) and marked `baseline`, in the study and in its Tune
  config. Pickled (Tune's checkpoints of it), it keeps its sampler's state and which Optuna trial each Tune trial
  is, by number: never the storage.
- `AllocationLimiter` is Tune's `ConcurrencyLimiter` whose limit, once restored, is the bound allocation's.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from cifarray.tune.layout import LEGACY_STUDY_DB, STUDY_DB
from cifarray.tune.trial import BASELINE

DASHBOARD_CONSTRAINTS = "constraints"  # optuna.study._constrained_optimization._CONSTRAINTS_KEY, the list form


@dataclass(frozen=True)
class Binding:
    out: Path  # the sweep folder, as this process reaches it
    concurrent: int  # trials at once on the cluster this process runs the sweep on, when it started
    study: str = STUDY_DB  # the study's file in OUT (optuna.journal; optuna.db in sweeps from before it)
    live: Any = None  # cifarray.tune.planning.Live: trials at once as nodes join and leave (None: fixed)

    def current(self) -> int:
        return self.live.concurrent() if self.live is not None else self.concurrent


_BOUND: Binding | None = None


def bind(out: str | Path, concurrent: int, study: str = STUDY_DB, live: Any = None) -> Binding:
    """Where this process runs the sweep; set before a Tuner is built or restored."""
    global _BOUND
    _BOUND = Binding(Path(out), int(concurrent), study, live)
    return _BOUND


def bound() -> Binding:
    if _BOUND is None:
        raise RuntimeError("cifarray.tune.searcher.bind(out, concurrent) must run before the sweep's searcher is "
                           "built or unpickled")
    return _BOUND


def storage_url(out: str | Path) -> str:
    """The legacy SQLite study's URL (sweeps begun before the journal)."""
    return f"sqlite:///{Path(out).resolve() / LEGACY_STUDY_DB}"


def open_storage(out: str | Path, study: str = STUDY_DB):
    """The study's storage in OUT: the journal file, or SQLite for a sweep that began with it."""
    import optuna

    if study == LEGACY_STUDY_DB:
        # SQLite waits up to 60 s for a lock (an optuna-dashboard reading the study) instead of failing at once.
        return optuna.storages.RDBStorage(storage_url(out), engine_kwargs={"connect_args": {"timeout": 60}})
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(Path(out).resolve() / study)
    # JournalFileOpenLock: the lock Optuna documents for NFS (open with O_CREAT|O_EXCL, atomic there since NFSv3).
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _storage(out: Path):
    return open_storage(out, bound().study)


class StoredOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, its study in OUT (see the module's docstring)."""

    def __init__(self, *, study_name: str, **kwargs: Any):
        super().__init__(study_name=study_name, storage=_storage(bound().out), **kwargs)
        with warnings.catch_warnings():  # "set_metric_names is experimental": the name is only a label
            warnings.simplefilter("ignore")
            self._ot_study.set_metric_names([self._metric])  # the dashboard's axis: val_acc, not "Objective 0"

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        stored = self._stored_id(ot_trial.number)
        if config is not None and self._storage.get_trial_system_attrs(stored).get("fixed_params"):
            # the enqueued [baseline] (points_to_evaluate), not a sampled configuration
            config[BASELINE] = True
            ot_trial.set_user_attr(BASELINE, True)
        # What the dashboard shows beside Optuna's own number: the Tune trial (OUT/trials/<id>, trials.csv).
        ot_trial.set_user_attr("trial_id", trial_id)
        if config and "params" in config:
            ot_trial.set_user_attr("params", config["params"])
        # optuna-dashboard (0.21) reads a trial's feasibility from the list form of its constraints, which
        # Trial.set_constraint no longer writes: the same values, mirrored. TPE sees each constraint twice, which
        # ranks infeasible trials as before (by the sum of violations) and keeps the feasible ones feasible.
        constraints = ot_trial.constraints
        if constraints:
            self._storage.set_trial_system_attr(stored, DASHBOARD_CONSTRAINTS,
                                                [constraints[k] for k in sorted(constraints)])
        return config

    def _stored_id(self, number: int) -> int:
        """The storage's id of the study's trial `number` (what the storage's own setters take)."""
        study_id = self._storage.get_study_id_from_name(self._study_name)
        return self._storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._metric not in result:  # a drained trial's checkpoint report: nothing was evaluated at that step
            return
        # Intermediate values at the trial's own step (what ASHA's rungs and the curves use), not Tune's count of
        # reports: the dashboard's intermediate-value plot then reads in steps.
        if "step" in result:
            # A trial restored from a checkpoint (a node lost) reports its steps since then again: Optuna keeps
            # the first value of a step and warns of each repeat in the job log.
            reported = self.__dict__.setdefault("_steps_reported", {})
            if result["step"] <= reported.get(trial_id, -1):
                return
            reported[trial_id] = result["step"]
            result = {**result, TRAINING_ITERATION: result["step"]}
        super().on_trial_result(trial_id, result)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_storage", None)
        state.pop("_ot_study", None)
        state["_ot_trials"] = {tid: t.number for tid, t in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        import optuna

        numbers = state.pop("_ot_trials")
        self.__dict__.update(state)
        self._storage = _storage(bound().out)
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler)
        self._ot_trials = {tid: optuna.trial.Trial(self._ot_study, self._stored_id(number))
                           for tid, number in numbers.items()}

    # Tune checkpoints a searcher through save/restore (OptunaSearch's pickle its whole __dict__, storage included).
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__getstate__(), fh)

    def restore(self, checkpoint_path: str) -> None:
        # Tune's own checkpoint in its experiment folder, not a data file: Tune itself unpickles the same folder's
        # tuner.pkl and searcher state (cloudpickle), so the sweep folder is trusted as the code that wrote it is.
        with open(checkpoint_path, "rb") as fh:
            self.__setstate__(pickle.load(fh))
        self._fail_lost()

    def _fail_lost(self) -> None:
        """Optuna trials asked after the newest checkpoint of a killed sweep: Tune restores without them and asks
        again, so they would show as running for ever. They end as failed, marked lost."""
        from optuna.trial import TrialState

        known = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:
                self._storage.set_trial_user_attr(self._stored_id(t.number), "lost",
                                                  "asked by a run killed before its checkpoint")
                self._ot_study.tell(t.number, state=TrialState.FAIL)


class AllocationLimiter(ConcurrencyLimiter):
    """ConcurrencyLimiter at the bound allocation's trials at once (see the module's docstring), worked out again
    from the live cluster before each suggestion (`Binding.live`): nodes that join raise it, nodes that leave or
    drain lower it.

    Tune brings it back twice on a resume: unpickled from the Tuner's pickle, then its state (the limit and the
    trials it counts as running) set from the newest experiment checkpoint. Either way the limit is the bound one;
    the running trials are the checkpoint's, which Tune requeues."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.max_concurrent = bound().concurrent

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.max_concurrent = bound().concurrent

    def suggest(self, trial_id: str) -> dict | None:
        self.max_concurrent = bound().current()
        return super().suggest(trial_id)

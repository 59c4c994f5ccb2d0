"""The sweep's searcher as Tune pickles and restores it (cifarray/tune/searcher.py), without Ray running."""

from __future__ import annotations

import pickle
import shutil
import warnings

import optuna
import pytest

from cifarray.tune import searcher


def space(trial):
    trial.suggest_float("lr", 0.01, 1.0, log=True)
    return {"params": 123}


# The journal file (Optuna's storage for NFS), and SQLite: a sweep begun before the journal resumes with its optuna.db.
@pytest.mark.parametrize("study", [searcher.STUDY_DB, searcher.LEGACY_STUDY_DB])
def test_a_restored_study_lives_where_the_sweep_now_is_and_ends_what_the_killed_run_lost(tmp_path, study):
    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    searcher.bind(first, 2, study)
    search = searcher.StoredOptunaSearch(space=space, metric="val_acc", mode="max", study_name="s",
                                         sampler=optuna.samplers.TPESampler(seed=0))
    a = search.suggest("aaaa")
    search.on_trial_result("aaaa", {"val_acc": 0.1, "step": 20, "training_iteration": 1})
    search.save(str(first / "searcher.pkl"))  # Tune's checkpoint ...
    search.suggest("bbbb")  # ... and an ask after it, lost when the run is killed
    del search
    shutil.move(first, moved)  # the sweep folder, mounted elsewhere for the resumed job
    searcher.bind(moved, 2, study)
    restored = searcher.StoredOptunaSearch.__new__(searcher.StoredOptunaSearch)  # as Tune's unpickled copy
    restored.restore(str(moved / "searcher.pkl"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns of each value at a step it already holds
        restored.on_trial_result("aaaa", {"val_acc": 0.15, "step": 20, "training_iteration": 1})  # retrained after
        restored.on_trial_result("aaaa", {"val_acc": 0.2, "step": 40, "training_iteration": 2})  # a node's loss
    restored.on_trial_complete("aaaa", {"val_acc": 0.3})
    assert (moved / study).is_file()
    stored = optuna.load_study(study_name="s", storage=searcher.open_storage(moved, study))
    by_number = {t.number: t for t in stored.trials}
    assert by_number[0].user_attrs == {"trial_id": "aaaa", "params": 123} and by_number[0].params["lr"] == a["lr"]
    assert by_number[0].state == optuna.trial.TrialState.COMPLETE and by_number[0].value == 0.3
    assert by_number[0].intermediate_values == {20: 0.1, 40: 0.2}  # at the trial's step, not Tune's count
    assert by_number[1].state == optuna.trial.TrialState.FAIL and "lost" in by_number[1].user_attrs
    assert not (first / study).exists()  # nothing written where the folder was


def test_a_restored_limiter_runs_at_the_bound_allocations_concurrency(tmp_path):
    searcher.bind(tmp_path, 1)
    base = searcher.StoredOptunaSearch(space=space, metric="val_acc", mode="max", study_name="s")
    limiter = searcher.AllocationLimiter(base, max_concurrent=1)
    limiter.suggest("aaaa")
    assert limiter.suggest("bbbb") is None  # one at a time on the first allocation
    saved = limiter.get_state()  # what Tune's experiment checkpoint keeps of it
    pickled = pickle.dumps(limiter)  # and the Tuner's pickle
    searcher.bind(tmp_path, 3)  # resumed on an allocation that holds three
    again = pickle.loads(pickled)
    again.set_state(saved)
    assert again.max_concurrent == 3 and again.live_trials == {"aaaa"}
    assert again.suggest("bbbb") is not None and again.suggest("cccc") is not None
    assert again.suggest("dddd") is None


def test_the_limiter_follows_the_live_cluster_under_the_cap(tmp_path):
    from cifarray.tune.planning import Live, Plan

    live = Live(Plan(1, cpus_per_worker=2, gpus_per_trial=0), workers=1, max_concurrent=3, trials=10)
    one, three, big = [{"CPU": 2}], [{"CPU": 2}, {"CPU": 4}], [{"CPU": 64}]
    assert live.compute(one) == 1 and live.compute(three) == 3 and live.compute(big) == 3  # --max-concurrent caps
    assert live.compute([{"CPU": 0}]) == 1  # none fits yet (a driver-only head): one waits to be placed
    assert Live(Plan(1, 1, 0), workers=2, max_concurrent=None, trials=10).compute([{"CPU": 1}] * 5) == 2  # DDP pairs
    nodes = [one]
    live = Live(Plan(1, cpus_per_worker=2, gpus_per_trial=0), workers=1, max_concurrent=None, trials=10, every=0)
    live.compute = lambda found, compute=live.compute: compute(nodes[0])  # the cluster as it is when asked
    searcher.bind(tmp_path, 1, live=live)
    limiter = searcher.AllocationLimiter(searcher.StoredOptunaSearch(space=space, metric="val_acc", mode="max",
                                                                     study_name="s"), max_concurrent=1)
    import cifarray.tune.planning as planning

    planning_nodes, planning.trial_nodes = planning.trial_nodes, lambda: []
    try:
        assert limiter.suggest("aaaa") is not None and limiter.suggest("bbbb") is None
        nodes[0] = three  # two nodes joined
        assert limiter.suggest("bbbb") is not None and limiter.suggest("cccc") is not None
        assert limiter.suggest("dddd") is None
        nodes[0] = one  # they left: no new trial until the running ones end
        assert limiter.suggest("dddd") is None
    finally:
        planning.trial_nodes = planning_nodes

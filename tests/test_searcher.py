"""The sweep's searcher as Tune pickles and restores it (cifarray/tune/searcher.py), without Ray running."""

from __future__ import annotations

import pickle
import shutil

import optuna

from cifarray.tune import searcher


def space(trial):
    trial.suggest_float("lr", 0.01, 1.0, log=True)
    return {"params": 123}


def test_a_restored_study_lives_where_the_sweep_now_is_and_ends_what_the_killed_run_lost(tmp_path):
    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    searcher.bind(first, 2)
    search = searcher.StoredOptunaSearch(space=space, metric="val_acc", mode="max", study_name="s",
                                         sampler=optuna.samplers.TPESampler(seed=0))
    a = search.suggest("aaaa")
    search.on_trial_result("aaaa", {"val_acc": 0.1, "step": 20, "training_iteration": 1})
    search.save(str(first / "searcher.pkl"))  # Tune's checkpoint ...
    search.suggest("bbbb")  # ... and an ask after it, lost when the run is killed
    del search
    shutil.move(first, moved)  # the sweep folder, mounted elsewhere for the resumed job
    searcher.bind(moved, 2)
    restored = searcher.StoredOptunaSearch.__new__(searcher.StoredOptunaSearch)  # as Tune's unpickled copy
    restored.restore(str(moved / "searcher.pkl"))
    restored.on_trial_complete("aaaa", {"val_acc": 0.3})
    study = optuna.load_study(study_name="s", storage=searcher.storage_url(moved))
    by_number = {t.number: t for t in study.trials}
    assert by_number[0].user_attrs == {"trial_id": "aaaa", "params": 123} and by_number[0].params["lr"] == a["lr"]
    assert by_number[0].state == optuna.trial.TrialState.COMPLETE and by_number[0].value == 0.3
    assert by_number[0].intermediate_values == {20: 0.1}  # at the trial's step, not Tune's report count
    assert by_number[1].state == optuna.trial.TrialState.FAIL and "lost" in by_number[1].user_attrs
    assert not (first / searcher.STUDY_DB).exists()  # nothing written where the folder was


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

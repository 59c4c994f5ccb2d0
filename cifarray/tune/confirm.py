"""Confirmation (`--confirm K:S`): the search's top K configurations and its baseline, retrained with S fresh seeds.

A sweep's best trial is the maximum of many noisy draws: its validation value is biased upward, and its margin over
the runner-up or the baseline may be seed noise. After the search, this retrains each of the top K searched
configurations (`ranked`: the furthest step ASHA let them reach, then their validation value there) and the baseline
with S seeds that the search never used, to the sweep's full step count, as a second Tune experiment on the same cluster (OUT/confirm/tune; runs in OUT/confirm/trials/<id>), which
resumes like the search. The winner is the configuration with the best mean validation value over its seeds.

The test split is evaluated once per confirmed run, after every run has trained (the search never reads it): each
evaluation is written to the run's test.json and appended to OUT/confirm/test_evaluations.jsonl, and a run that has
its test.json is never evaluated again. Means come with a 95 % t interval, and the winner's margins over the
runner-up and the baseline with a 95 % Welch interval (unequal variances, few seeds): a margin whose interval holds 0
is reported as within noise.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from cifarray.errors import UserError
from cifarray.tune.layout import EXPERIMENT, trial_dir
from cifarray.tune.sweep import Confirm
from cifarray.tune.trial import BASELINE, CONFIRMED, INFEASIBLE, sampled_values

CONFIRM = "confirm"  # OUT/confirm: the confirmation's Tune experiment, runs, plan and test evaluations
PLAN = "plan.json"  # which configurations, which seeds: fixed once, so that a resume confirms the same ones
TESTS = "test_evaluations.jsonl"  # one line per evaluation of the test split
TEST_RESULT = "test.json"  # in a confirmed run's folder: its one test evaluation
FIGURE = "confirmation.png"
LEVEL = 0.95


def folder(out: Path) -> Path:
    return Path(out) / CONFIRM


# ----- the plan: which configurations, with which seeds
def ranked(out: Path, records: list[dict[str, Any]], metric: str, mode: str) -> list[tuple[int, float, dict]]:
    """The search's trained trials, best first, by the evidence ASHA had: the furthest step reached (a complete
    trial before one stopped at a rung), then the validation value there. (step, value, record) each."""
    from cifarray.rundir import RunDir

    lasts = ((RunDir(trial_dir(out, r["trial_id"])).last_measured(metric), r) for r in records
             if r["status"] in ("complete", "early-stopped"))
    found = [(*last, r) for last, r in lasts if last]
    sign = 1.0 if mode == "max" else -1.0
    return sorted(found, key=lambda f: (-f[0], -sign * f[1]))


def make_plan(out: Path, sweep: Any, metric: str, mode: str, confirm: Confirm) -> dict[str, Any]:
    """The search's top K trials other than the baseline (`ranked`), and the baseline trial, each with S seeds the
    search did not use (the search trained every trial with the config's seed)."""
    from cifarray.tune import results

    trials = {t.trial_id: t for t in results.load_trials(out)}
    records = results.trial_records(out, sweep, list(trials.values()), metric, mode, exact=True)
    order = ranked(out, records, metric, mode)
    chosen = [(f"top{i + 1}", f) for i, f in enumerate(f for f in order if not f[2][BASELINE])][:confirm.configs]
    chosen += [(BASELINE, f) for f in order if f[2][BASELINE]]
    if not chosen:
        raise UserError(f"{out}: no trial of the search reached a validation result, so there is nothing to confirm; "
                        "rerun it with more trials (or a longer grace period)")
    first_seed = sweep.base.seed + 1  # the search's seed is the config's; confirmation draws fresh ones
    configs = []
    for i, (name, (step, value, r)) in enumerate(chosen):
        config = dict(trials[r["trial_id"]].config)
        configs.append({"name": name, "trial_id": r["trial_id"], BASELINE: r[BASELINE], "params": r["params"],
                        "search_value": value, "search_steps": step, "values": sampled_values(config),
                        "seeds": [first_seed + i * confirm.seeds + j for j in range(confirm.seeds)]})
    return {"confirm": str(confirm), "metric": metric, "mode": mode, "configs": configs}


def points(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The confirmation's Tune configs, one per (configuration, seed), in the plan's order."""
    return [{**c["values"], "params": c["params"], INFEASIBLE: "", BASELINE: c[BASELINE], CONFIRMED: c["name"],
             "seed": seed} for c in plan["configs"] for seed in c["seeds"]]


def fixed_configs(configs: list[dict[str, Any]]):
    """A Tune searcher that hands out `configs` in order, then FINISHED (Tune's BasicVariantGenerator takes preset
    configs only for keys its space declares, and the block layouts of two configurations may differ in keys)."""
    from ray.tune.search import Searcher

    class FixedConfigs(Searcher):
        def __init__(self, configs: list[dict[str, Any]]):
            super().__init__()
            self.configs, self.given = configs, 0

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            if self.given >= len(self.configs):
                return Searcher.FINISHED
            self.given += 1
            return dict(self.configs[self.given - 1])

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            pass

        def save(self, checkpoint_path: str) -> None:
            Path(checkpoint_path).write_text(json.dumps({"given": self.given}))

        def restore(self, checkpoint_path: str) -> None:
            self.given = json.loads(Path(checkpoint_path).read_text())["given"]

    return FixedConfigs(configs)


def plan_for(out: Path, sweep: Any, metric: str, mode: str, confirm: Confirm) -> dict[str, Any]:
    """OUT/confirm/plan.json, made once: a resumed or repeated confirmation confirms what the first one chose (the
    tuner refuses another K:S before Ray starts)."""
    from cifarray.rundir import RunDir

    where = RunDir(folder(out))
    plan = where.read_json(PLAN)
    if plan is None:
        plan = make_plan(out, sweep, metric, mode, confirm)
        where.path.mkdir(exist_ok=True)
        where.write_json(PLAN, plan)
    return plan


# ----- statistics over seeds
def _t(df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + LEVEL / 2, df))


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation (n - 1) and the 95 % t interval of the mean, over seeds."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = _t(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "interval": [mean - half, mean + half], "values": values}


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95 % Welch interval (Welch-Satterthwaite degrees of freedom)."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1) / len(a)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, ma - mb, ma - mb
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0) + (vb ** 2 / (len(b) - 1) if vb else 0))
    half = _t(df) * se
    return ma - mb, ma - mb - half, ma - mb + half


def margin(winner: list[float], other: list[float], mode: str) -> dict[str, Any]:
    """How much better the winner is (positive: better, whichever way the metric goes), with its interval and a
    verdict: beyond noise only when the whole interval is on one side of 0."""
    sign = 1.0 if mode == "max" else -1.0
    diff, lo, hi = welch(winner, other)
    diff, lo, hi = sign * diff, *sorted((sign * lo, sign * hi))
    verdict = ("better beyond seed noise" if lo > 0 else "worse beyond seed noise" if hi < 0 else
               "within noise (not distinguishable with these seeds)")
    return {"margin": diff, "interval": [lo, hi], "verdict": verdict, "within_noise": lo <= 0 <= hi}


# ----- the runs' results
def evaluate_test_once(out: Path, sweep: Any, context: Any, trial_id: str, name: str, seed: int) -> dict[str, Any]:
    """The run's test metrics: read from its test.json, else evaluated now (the one read of the test split for
    this run) and recorded there and in OUT/confirm/test_evaluations.jsonl."""
    from cifarray.config import from_dict
    from cifarray.rundir import RunDir

    run = RunDir(trial_dir(folder(out), trial_id))
    done = run.read_json(TEST_RESULT)
    if done is not None:
        return done
    metrics = sweep.family.sweep.test_metrics(run, from_dict(sweep.cls, run.read_json("config.json")), context)
    record = {"run": trial_id, "config": name, "seed": seed, "evaluated": time.time(), **metrics}
    with open(folder(out) / TESTS, "a") as fh:  # before test.json: a kill between the two shows as a second line
        fh.write(json.dumps(record) + "\n")
    run.write_json(TEST_RESULT, record)
    return record


def _test_key(record: dict[str, Any]) -> str | None:
    return next((k for k, v in record.items() if k.startswith("test_") and isinstance(v, (int, float))), None)


def conclude(out: Path, sweep: Any, context: Any, plan: dict[str, Any], trials: list, label: str) -> dict[str, Any]:
    """summary.json's `confirmation`: each configuration's spread over seeds (validation, test), the winner by mean
    validation, its margins over the runner-up and the baseline, and confirmation.png. Test metrics are evaluated
    only once every confirmed run has trained."""
    from cifarray.rundir import RunDir
    from cifarray.tune.layout import DONE
    from cifarray.tune.results import trial_status

    metric, mode = plan["metric"], plan["mode"]
    by_key = {(t.config.get(CONFIRMED), t.config.get("seed")): t for t in trials}
    runs, missing = [], 0
    for c in plan["configs"]:
        for seed in c["seeds"]:
            t = by_key.get((c["name"], seed))
            status = trial_status(t, sweep.steps) if t is not None else "pending"
            if status != "complete":
                missing += status not in DONE
                continue
            last = RunDir(trial_dir(folder(out), t.trial_id)).last_measured(metric)  # its validation at the end
            runs.append((c, seed, t.trial_id, last and last[1]))
    failed = len(points(plan)) - len(runs) - missing
    result: dict[str, Any] = {"confirm": plan["confirm"], "objective": metric, "mode": mode, "label": label,
                              "steps": sweep.steps,
                              "status": "interrupted" if missing else "complete", "unfinished_runs": missing,
                              "failed_runs": failed, "selection": "mean validation value over seeds"}
    if missing:
        return result
    tests: dict[str, dict[str, Any]] = {}
    for c, seed, trial_id, _ in runs:
        tests[trial_id] = evaluate_test_once(out, sweep, context, trial_id, c["name"], seed)
    configs = []
    for c in plan["configs"]:
        mine = [r for r in runs if r[0] is c]
        vals = [v for *_, v in mine if v is not None and math.isfinite(v)]
        test_values = [tests[tid][k] for _, _, tid, _ in mine
                       if (k := _test_key(tests[tid])) is not None and math.isfinite(tests[tid][k])]
        key = next((k for _, _, tid, _ in mine if (k := _test_key(tests[tid]))), None)
        note = next((v for _, _, tid, _ in mine for k, v in tests[tid].items() if k.endswith("_note")), None)
        configs.append({"name": c["name"], "trial_id": c["trial_id"], BASELINE: c[BASELINE], "params": c["params"],
                        "values": c["values"], "search_value": c["search_value"], "search_steps": c["search_steps"],
                        "runs": [{"seed": s, "run": tid, metric: v, **({key: tests[tid].get(key)} if key else {})}
                                 for _, s, tid, v in mine],
                        "val": spread(vals) if len(vals) >= 2 else None,
                        "test": spread(test_values) if len(test_values) >= 2 else None,
                        "test_metric": key, **({"test_note": note} if note else {})})
    ranked = sorted((c for c in configs if c["val"]), key=lambda c: c["val"]["mean"], reverse=mode == "max")
    result.update(configs=configs, winner=ranked[0]["name"] if ranked else None, margins=_margins(ranked, mode))
    result["figure"] = figure(out, result, label).name
    return result


def _margins(ranked: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The winner (ranked[0]) against the runner-up and against the baseline, on validation and on test."""
    if not ranked:
        return {}
    win, margins = ranked[0], {}
    others = {"runner_up": ranked[1] if len(ranked) > 1 else None,
              BASELINE: next((c for c in ranked if c[BASELINE] and c is not win), None)}
    for what, other in others.items():
        if other is None:
            continue
        margins[what] = {"config": other["name"], "val": margin(win["val"]["values"], other["val"]["values"], mode)}
        if win["test"] and other["test"]:
            # The test metric goes the way the objective goes (accuracy up, FID down).
            margins[what]["test"] = margin(win["test"]["values"], other["test"]["values"], mode)
    return margins


# ----- the figure
def figure(out: Path, result: dict[str, Any], label: str) -> Path:
    """confirmation.png: a column per configuration, each seed's validation and test value a dot, the mean a bar
    and its 95 % interval a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(configs) + 1.5), 5.2))
    series = (("val", result["objective"], "tab:blue", -0.15), ("test", None, "tab:orange", 0.15))
    shown = set()
    for i, c in enumerate(configs):
        # The one draw the search ranked it on (biased upward by the choice), where it is comparable: at the last step.
        if c["search_value"] is not None and c["search_steps"] == result["steps"]:
            name = f"in the search ({result['objective']}, one seed)"
            ax.scatter([i - 0.32], [c["search_value"]], marker="x", color="tab:gray", s=30,
                       label=None if name in shown else name)
            shown.add(name)
        for what, key, color, dx in series:
            s = c[what]
            key = key or c["test_metric"]
            if s is None:
                continue
            xs = [i + dx + 0.05 * (j - (len(s["values"]) - 1) / 2) for j in range(len(s["values"]))]
            name = f"{what} ({key})"
            ax.scatter(xs, s["values"], color=color, alpha=0.6, s=22, label=None if name in shown else name)
            shown.add(name)
            lo, hi = s["interval"]
            ax.errorbar([i + dx], [s["mean"]], yerr=[[s["mean"] - lo], [hi - s["mean"]]], color=color, capsize=6,
                        elinewidth=1.5, marker="_", markersize=18, markeredgewidth=2.5)
    ticks = []
    for c in configs:
        tags = [t for t, on in (("winner", c["name"] == result["winner"]),
                                ("baseline", c[BASELINE] and c["name"] != BASELINE)) if on]
        ticks.append(f"{c['name']}" + (f" ({', '.join(tags)})" if tags else "") + f"\n{c['trial_id']}"
                     f"\n{c['params']:,} params")
    ax.set_xticks(range(len(configs)), ticks, fontsize=8)
    ax.set_xlim(-0.6, len(configs) - 0.4)
    tested = next((c["test_metric"] for c in configs if c["test_metric"]), None)
    ax.set_ylabel(f"{label}" + (f" / {tested}" if tested else ""))
    n = max((c["val"]["n"] for c in configs if c["val"]), default=0)
    ax.set_title(f"confirmation: {len(configs)} configurations x {n} seeds\n(dots: seeds; bar: mean; line: "
                 f"{LEVEL:.0%} interval of the mean)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if shown:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)  # off the data
    fig.tight_layout()
    path = Path(out) / FIGURE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- the console's last lines
def print_confirmation(result: dict[str, Any]) -> None:
    if result["status"] != "complete":
        print(f"confirmation interrupted: {result['unfinished_runs']} run(s) unfinished; rerun with --resume to "
              "continue it (finished runs are kept; the test split is evaluated once all have trained)")
        return
    metric = result["objective"]
    n = max((c["val"]["n"] for c in result["configs"] if c["val"]), default=0)
    print(f"confirmation ({result['confirm']}): {len(result['configs'])} configurations x {n} fresh seeds, to the "
          f"full step count; mean ± std over seeds, [{LEVEL:.0%} interval of the mean]"
          + (f"; {result['failed_runs']} run(s) failed or diverged and are left out" if result["failed_runs"] else ""))
    for c in result["configs"]:
        tags = [t for t, on in (("winner", c["name"] == result["winner"]),
                                ("baseline", c[BASELINE] and c["name"] != BASELINE)) if on]
        line = f"  {c['name']:>8} {c['trial_id']}{' (' + ', '.join(tags) + ')' if tags else ''}: {c['params']:,} params"
        if c["val"]:
            line += f", {metric} {_spread_text(c['val'])}"
        if c["test"]:
            line += f", {c['test_metric']} {_spread_text(c['test'])}"
        elif c.get("test_note"):
            line += f" (test: {c['test_note']})"
        if c["search_value"] is not None:
            line += f"; in the search {c['search_value']:.4f} at step {c['search_steps']} (one seed)"
        print(line)
    margins = result["margins"]
    for what, m in margins.items():
        if what == BASELINE and m["config"] == margins.get("runner_up", {}).get("config"):
            continue  # the runner-up is the baseline: said once
        who = (f"the runner-up {m['config']}" + (" (the baseline)" if m["config"] == BASELINE else "")
               if what == "runner_up" else "the baseline")
        parts = [f"{split} {_margin_text(m[split])}" for split in ("val", "test") if split in m]
        print(f"winner {result['winner']} over {who}: " + "; ".join(parts))
    if not margins:
        print(f"winner {result['winner']}: no other configuration to compare it with")
    print(f"verdict: {verdict(result)}")


def verdict(result: dict[str, Any]) -> str:
    """The confirmation in one sentence: does the sweep's winner beat the baseline beyond seed noise?"""
    win = next((c for c in result["configs"] if c["name"] == result["winner"]), None)
    if win is None:
        return "no configuration has two finished runs to compare (see failed_runs in summary.json)"
    n = win["val"]["n"]
    if win[BASELINE]:
        return (f"the baseline has the best mean {result['objective']} over {n} seeds: no searched configuration "
                "beat it")
    m = result["margins"].get(BASELINE)
    if m is None:
        return f"{result['winner']} has the best mean {result['objective']} over {n} seeds (the sweep has no baseline)"
    if m["val"]["within_noise"]:
        return (f"{result['winner']} does not beat the baseline beyond seed noise with {n} seeds each: keep the "
                "baseline, or confirm with more seeds (the interval narrows about as 1/sqrt(seeds))")
    return f"{result['winner']} beats the baseline beyond seed noise ({n} seeds each, 95 % Welch interval)"


def _spread_text(s: dict[str, Any]) -> str:
    lo, hi = s["interval"]
    return f"{s['mean']:.4f} ± {s['std']:.4f} [{lo:.4f}, {hi:.4f}]"


def _margin_text(m: dict[str, Any]) -> str:
    lo, hi = m["interval"]
    return f"{m['margin']:+.4f} [{lo:+.4f}, {hi:+.4f}], {m['verdict']}"


def experiment_path(out: Path) -> Path:
    return folder(out) / EXPERIMENT

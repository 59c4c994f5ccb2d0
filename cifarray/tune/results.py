"""What a sweep leaves in OUT: trials.csv, summary.json, plots, and the one test evaluation.

Steps per trial are read from the trial's own metrics.csv (what its workers really
trained), not from what Tune last heard; an infeasible trial has no run folder and
so, measurably, zero steps.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from cifarray.rundir import SUMMARY, measured, read_json_or_none, replace_text
from cifarray.tune.layout import DONE, EXPERIMENT, SWEEP_COPY, trial_dir
from cifarray.tune.trial import BASELINE, CONFIRMED, INFEASIBLE, sampled_values


def trial_status(trial: Any, max_steps: int, ended: bool = False) -> str:
    """complete | early-stopped | infeasible | diverged | error | running | pending | paused.

    ended: the trial is known to be over (Tune calls on_trial_complete before it updates the status)."""
    result = trial.last_result or {}
    status = "terminated" if ended and trial.status.lower() != "error" else trial.status.lower()
    if result.get(INFEASIBLE):
        return "infeasible"
    if status == "terminated":
        if result.get("diverged"):
            return "diverged"
        return "complete" if int(result.get("step", 0)) >= max_steps else "early-stopped"
    return status


def metric_rows(out: Path, trial_id: str) -> list[dict[str, str]]:
    from cifarray.rundir import read_metrics

    return read_metrics(trial_dir(out, trial_id) / "metrics.csv")


def _best(rows: list[dict[str, str]], metric: str, mode: str) -> float | None:
    vals = [float(r[metric]) for r in rows if measured(r, metric)]
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return None
    return max(vals) if mode == "max" else min(vals)


def trial_records(out: Path, sweep: Any, trials: list, metric: str, mode: str, exact: bool) -> list[dict[str, Any]]:
    """One record per trial. exact: read run folders (steps, best objective) instead of Tune's view."""
    records = []
    for t in sorted(trials, key=lambda t: t.trial_id):
        config = dict(t.config)
        status = trial_status(t, sweep.steps)
        overrides = sweep.overrides(sampled_values(config))
        result = t.last_result or {}
        if exact:
            rows = metric_rows(out, t.trial_id)
            steps = max((int(r["step"]) for r in rows), default=0)
            best = _best(rows, metric, mode)
        else:
            steps = int(result.get("step", 0) or 0)
            v = (getattr(t, "metric_analysis", None) or {}).get(metric, {}).get(mode)
            best = None if status in ("infeasible", "diverged") or v is None else float(v)
        records.append({
            "trial_id": t.trial_id, "status": status, BASELINE: bool(config.get(BASELINE)),
            **({CONFIRMED: config[CONFIRMED]} if CONFIRMED in config else {}),
            "params": config.get("params"), "steps": steps,
            f"best_{metric}": best, "infeasible_reason": config.get(INFEASIBLE) or "",
            **{k: (",".join(map(str, v)) if isinstance(v, (tuple, list)) else v) for k, v in overrides.items()},
        })
    return records


def write_trials(out: Path, sweep: Any, trials: list, metric: str, mode: str, exact: bool = False) -> Path:
    return write_records(out, trial_records(out, sweep, trials, metric, mode, exact), metric)


def write_records(out: Path, records: list[dict[str, Any]], metric: str) -> Path:
    """trials.csv from trial records (`trial_records`)."""
    path = out / "trials.csv"
    first = ["trial_id", "status", BASELINE, *([CONFIRMED] if any(CONFIRMED in r for r in records) else []), "params",
             "steps", f"best_{metric}"]
    rest = sorted({k for r in records for k in r} - set(first) - {"infeasible_reason"})
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=first + rest + ["infeasible_reason"])
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, path)  # readers (and a kill mid-write) never see half a file
    return path


def resources_line() -> str:
    try:
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))  # by node id: nodes may share an IP
    except Exception:  # the cluster is going away; the header just omits resources
        return "resources: -"
    parts = []
    for key in ("CPU", "GPU"):
        if total.get(key):
            parts.append(f"{key} {total[key] - free.get(key, 0):g}/{total[key]:g}")
    return f"in use: {', '.join(parts) or '-'} on {nodes} node(s)"


def evaluate_best_on_test(out: Path, sweep: Any, trial_id: str, context: Any = None) -> dict[str, Any]:
    """The one use of the test split in a sweep: the family's test metrics of the best trial, once."""
    from cifarray.config import from_dict
    from cifarray.rundir import RunDir

    run = RunDir(trial_dir(out, trial_id))
    return sweep.family.sweep.test_metrics(run, from_dict(sweep.cls, run.read_json("config.json")), context)


def _tested_before(out: Path, trial_id: str) -> dict[str, Any]:
    """The test metrics a finished sweep's summary holds for `trial_id` (a --resume of it concludes again: the
    best trial's test split is not looked at twice); {} if it holds none, or one left unmeasured (a GAN's FID
    without Inception weights, which a resume given them measures)."""
    summary = read_json_or_none(out / SUMMARY) or {}
    best = summary.get("best") or {}
    tested = {k: v for k, v in best.items() if k.startswith("test_")}
    if summary.get("status") != "complete" or best.get("trial_id") != trial_id or not tested:
        return {}
    return tested if all(v is not None for v in tested.values()) else {}


def plots(out: Path, sweep: Any, records: list[dict[str, Any]], metric: str, mode: str, label: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"best_{metric}"
    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"complete": ("o", "tab:blue"), "early-stopped": ("s", "tab:orange"), "infeasible": ("x", "tab:red"),
              "diverged": ("v", "tab:gray"), "error": ("v", "tab:gray")}
    for status, (marker, color) in styles.items():
        pts = [(r["params"], r[key] if r[key] is not None else 0.0) for r in records
               if r["status"] == status and isinstance(r["params"], int) and r["params"] >= 0]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=f"{status} ({len(pts)})")
    ax.axvline(sweep.budget, color="k", linestyle="--", label=f"budget {sweep.budget:,}")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"best {label}")
    ax.set_title("sweep: objective vs parameters (infeasible: no training, plotted at 0)"
                 if mode == "max" else "sweep: objective vs parameters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(out / "val_vs_params.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    scored = [r for r in records if r[key] is not None and r["status"] not in ("infeasible", "diverged")]
    top = sorted(scored, key=lambda r: r[key], reverse=mode == "max")[:5]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in top:
        rows = [row for row in metric_rows(out, r["trial_id"]) if measured(row, metric)]
        if rows:
            ax.plot([int(row["step"]) for row in rows], [float(row[metric]) for row in rows], marker=".",
                    label=f"{r['trial_id']} ({r['params']:,} params)")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(f"learning curves of the top {len(top)} trials")
    if top:
        ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(out / "learning_curves.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    return made


def load_trials(out: Path) -> list:
    """Tune's own record of the experiment's trials (statuses, configs, results), after fit or a restore."""
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(str(out / EXPERIMENT)).trials


def final_values(out: Path, records: list[dict[str, Any]], metric: str) -> list[tuple[float, dict[str, Any]]]:
    """(value at the last step, record) of each trial that ran to the end: what selection reads (validation only;
    the final weights, model.pt, exist for these trials)."""
    from cifarray.rundir import RunDir

    lasts = ((RunDir(trial_dir(out, r["trial_id"])).last_measured(metric), r) for r in records
             if r["status"] == "complete")
    return [(last[1], r) for last, r in lasts if last]


def conclude(out: Path, sweep: Any, metric: str, mode: str, label: str, data_dir: Path, synthetic: bool,
             seconds: float, requested: int, test_best: bool = True, context: Any = None) -> dict[str, Any]:
    """summary.json, trials.csv and the plots; the best trial's one test evaluation once all `requested` trials
    have ended. Tune returns early, with trials unstarted or unfinished, when Ctrl-C stopped it: then the
    summary says "interrupted" and the test split stays unused, so that the resumed sweep's choice is the one
    evaluated. test_best False (a confirmation follows): the search leaves the test split alone."""
    trials = load_trials(out)
    records = trial_records(out, sweep, trials, metric, mode, exact=True)
    write_records(out, records, metric)
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    unfinished = max(0, requested - sum(n for s, n in by_status.items() if s in DONE))
    finals = final_values(out, records, metric)
    best = None
    if finals:
        value, rec = (max if mode == "max" else min)(finals, key=lambda vr: vr[0])
        best = {"trial_id": rec["trial_id"], "params": rec["params"], metric: value, BASELINE: rec[BASELINE],
                "config": json.loads((trial_dir(out, rec["trial_id"]) / "config.json").read_text())}
        if not unfinished and test_best:
            best.update(_tested_before(out, rec["trial_id"]) or evaluate_best_on_test(out, sweep, rec["trial_id"],
                                                                                      context))
    figures = plots(out, sweep, records, metric, mode, label)
    baseline = next(({"trial_id": r["trial_id"], "status": r["status"], "params": r["params"], "steps": r["steps"],
                      f"best_{metric}": r[f"best_{metric}"],
                      metric: next((v for v, f in finals if f is r), None),  # at its last step, as `best` is
                      "values": dict(sweep.baseline or {})}
                     for r in records if r[BASELINE]), None)
    summary = {
        "status": "interrupted" if unfinished else "complete", "unfinished_trials": unfinished,
        "model": sweep.model, "sweep": str(out / SWEEP_COPY), "objective": metric, "objective_label": label,
        "mode": mode, "budget": sweep.budget, "trials": len(records), "by_status": by_status,
        "best": best, BASELINE: baseline, "total_steps": sum(r["steps"] for r in records),
        "infeasible_steps": sum(r["steps"] for r in records if r["status"] == "infeasible"),
        "infeasible_trials": by_status.get("infeasible", 0), "seconds": round(seconds, 1),
        "synthetic_data": synthetic, "data_dir": str(data_dir),
        "selection": "validation split only; the test split is evaluated once, " + (
            "on the best trial" if test_best else "per confirmed run, after the search (see confirmation)"),
        "figures": [p.name for p in figures], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_summary(out, summary)
    return summary


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """OUT/summary.json: the sweep's (not a run folder's), its keys in the order they were made."""
    # A resume decides from this file whether the search (and its one test evaluation) is done: a kill mid-write
    # must leave the old file or the new one, never half of one.
    replace_text(out / SUMMARY, json.dumps(summary, indent=2))


def print_summary(summary: dict[str, Any]) -> None:
    best = summary["best"]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["by_status"].items()))
    stopped = summary.get("status") == "interrupted"
    print(f"sweep {'interrupted' if stopped else 'done'}: {summary['trials']} trials ({counts}); "
          f"{summary['total_steps']:,} training steps, {summary['infeasible_steps']} on infeasible configs; "
          f"{summary['seconds']:.0f} s")
    if stopped:
        print(f"{summary['unfinished_trials']} trial(s) unfinished; rerun with --resume to continue (finished trials "
              "are kept; the test split is evaluated when the sweep ends)")
    if best is None:
        if not stopped:
            print("no trial ran to the end; nothing to evaluate on test")
        return
    obj = summary["objective"]
    line = (f"best {'trial so far' if stopped else 'trial'} {best['trial_id']}: {best['params']:,} params, "
            f"{obj} {best[obj]:.4f}")
    tested = {k: v for k, v in best.items() if k.startswith("test_") and isinstance(v, (int, float))}
    if tested:
        line += ", " + ", ".join(f"{k} {v:.4f}" for k, v in tested.items()) + " (evaluated once, after selection)"
    print(line + (" (the sweep's baseline)" if best.get(BASELINE) else ""))
    baseline = summary.get(BASELINE)
    if baseline and not best.get(BASELINE):
        value = baseline.get(obj)
        how = (f"{obj} {value:.4f}; the best trial's margin over it: {best[obj] - value:+.4f}, from one seed each "
               "(part of it may be seed noise)" if value is not None else
               f"{baseline['status']} at step {baseline['steps']}")
        print(f"baseline trial {baseline['trial_id']}: {baseline['params']:,} params, {how}")
    if summary["synthetic_data"]:
        print("(procedural data: these numbers show the sweep works, not how well CIFAR-100 is learned)")

"""Sweep files: a validated, declarative search space over the training configs.

A sweep file (TOML) has a model, a number of trials, fixed training settings, the
ASHA schedule and the space::

    model = "densenet"            # or "dcgan"
    trials = 48
    seed = 0

    [train]                       # fixed for every trial: any key of `python -m cifarray.train MODEL`
    steps = 10000
    eval_every = 500              # trials report (and checkpoint) every eval_every steps

    [asha]
    grace_period = 1000           # steps before a trial can be stopped
    reduction_factor = 3          # max_t is train.steps

    [space]
    batch_size = { choice = [256, 512, 1024] }
    lr = { loguniform = [0.02, 0.5] }
    growth_rate = { int = [4, 16] }
    num_blocks = { int = [2, 4] }          # block layout: how many dense blocks ...
    layers_per_block = { int = [2, 8] }    # ... and, per block, how many layers

    [baseline]                    # optional: the first trial, a value for every [space] key
    batch_size = 512
    lr = 0.2
    growth_rate = 8
    num_blocks = 4
    layers_per_block = 5                   # the same for every block

Distributions: `choice = [...]`, `uniform = [lo, hi]`, `loguniform = [lo, hi]`,
`int = [lo, hi]` (add `log = true` for a log scale). DCGAN spaces may use
`g_width`/`d_width`: the narrowest generator/discriminator width, doubled per layer.
`trial_runner = "auto" | "tune" | "train"` (top level, default auto) says where trials train:
inside their own reused Tune actor (one worker) or through a TorchTrainer (DDP); auto picks the
first for one-worker trials (`--trial-runner` overrides it).
`confirm = "K:S"` (top level) retrains the top K configurations and the baseline with S fresh
seeds after the search (cifarray.tune.confirm; `--confirm` overrides it, `--confirm off` skips it).

Everything is checked here, before Ray starts: unknown keys, empty or inverted
ranges, values of the wrong type, and whether any config in the space fits the
parameter budget at all.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarray import registry
from cifarray.config import base_type, coerce, fields_of, load_toml, resolve
from cifarray.errors import UserError
from cifarray.family import Family, SweepRules

# Keys the tuner sets per trial or per experiment: a sweep file may not set them.
RESERVED = {"data_dir", "synthetic", "no_verify", "out", "workers", "gpu", "cpus_per_worker", "checkpoint_every"}
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
TOP_KEYS = {"model", "trials", "seed", "train", "asha", "space", "description", "trial_runner", "baseline", "confirm"}
# Where a trial trains: `tune`, inside its own (reused) Tune actor, one worker; `train`, through a TorchTrainer
# (DDP workers, several actors started per trial); `auto`, tune for one-worker trials, train for DDP ones.
TRIAL_RUNNERS = ("auto", "tune", "train")
ASHA_KEYS = {"grace_period", "reduction_factor"}


@dataclass(frozen=True)
class Confirm:
    configs: int  # K: the search's top configurations by validation (the baseline comes on top)
    seeds: int  # S: fresh seeds per configuration

    def __str__(self) -> str:
        return f"{self.configs}:{self.seeds}"


def parse_confirm(text: Any, where: str) -> Confirm | None:
    """`K:S` (K >= 1 configurations, S >= 2 seeds each), or `off`."""
    if text in (None, "off"):
        return None
    fix = "give K:S, K >= 1 configurations and S >= 2 seeds each (e.g. 3:5), or off"
    if not isinstance(text, str) or text.count(":") != 1:
        raise UserError(f"{where} must be K:S, got {text!r}; {fix}")
    k, s = text.split(":")
    if not (k.strip().isdigit() and s.strip().isdigit()):
        raise UserError(f"{where} must be two whole numbers K:S, got {text!r}; {fix}")
    k, s = int(k), int(s)
    if k < 1:
        raise UserError(f"{where}: K = {k} confirms no configuration; {fix}")
    if s < 2:
        raise UserError(f"{where}: S = {s} seed(s) cannot measure seed noise (a spread needs two); {fix}")
    return Confirm(k, s)


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # choice: the options; others: (lo, hi)
    log: bool = False

    def suggest(self, trial: Any, name: str | None = None) -> Any:
        name = name or self.name
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.values))
        lo, hi = self.values
        if self.kind == "int":
            return trial.suggest_int(name, lo, hi, log=self.log)
        return trial.suggest_float(name, lo, hi, log=self.kind == "loguniform")

    def problem(self, value: Any) -> str | None:
        """Why `value` (from a sweep file) is not a value of this parameter's space, or None."""
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if self.kind == "choice":
            if any(value == v and isinstance(value, bool) == isinstance(v, bool) and number(value) == number(v)
                   for v in self.values):
                return None
            return f"is not one of its choices {list(self.values)}"
        if self.kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            return "must be an integer"
        if not number(value):
            return "must be a number"
        lo, hi = self.values
        return None if lo <= value <= hi else f"is outside its range [{lo}, {hi}]"

    def corners(self) -> list:
        """Values at which the parameter count of the space can be smallest (counts grow with sizes)."""
        return list(self.values) if self.kind == "choice" else [self.values[0]]


@dataclass(frozen=True)
class Sweep:
    family: Family  # carried by value: a trial's process finds the family without the registry
    trials: int
    seed: int
    train: dict[str, Any]  # validated fixed settings (config keys)
    space: dict[str, Param]
    grace_period: int
    reduction_factor: int
    source: str = ""
    description: str = ""
    trial_runner: str = "auto"  # see TRIAL_RUNNERS; --trial-runner overrides it
    baseline: dict[str, Any] | None = None  # [baseline]: a value for every [space] key; the sweep's first trial
    confirm: Confirm | None = None  # `confirm = "K:S"`: the default of --confirm (cifarray.tune.confirm)

    @property
    def model(self) -> str:
        return self.family.name

    @property
    def cls(self) -> type:
        return self.family.config

    @property
    def rules(self) -> SweepRules:
        return self.family.sweep.rules

    @functools.cached_property
    def base(self) -> Any:
        """The fixed settings as a full training config (defaults filled in), procedural data assumed.

        Made once: the console reads `steps` for every trial at every write of trials.csv, and building a config
        per read made that write grow with the square of the sweep (a profile of a 400-trial sweep's driver)."""
        return self.config_for({})

    @property
    def steps(self) -> int:
        return self.base.steps

    @property
    def eval_every(self) -> int:
        return self.base.eval_every

    @property
    def budget(self) -> int:
        return self.base.budget

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Config values for sampled space values (special keys expanded)."""
        out = {k: v for k, v in sampled.items() if k in self.cls.__dataclass_fields__}
        return {**out, **self.rules.expand(sampled)}

    def config_for(self, overrides: dict[str, Any]) -> Any:
        """The trial's training config (procedural data stands in for the data source here)."""
        values = {**self.train, **overrides, "synthetic": True}
        return self.cls(**values)

    def params_of(self, overrides: dict[str, Any]) -> int:
        return self.config_for(overrides).param_count()

    @property
    def baseline_sampled(self) -> dict[str, Any] | None:
        """The [baseline] as the searcher's sampled values (Optuna's parameters), or None."""
        return None if self.baseline is None else self.rules.fixed(self.baseline)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Define-by-run: suggest every parameter (the family's rules add derived ones, e.g. per-block layers)."""
        return self.rules.sample(self.space, trial)

    def smallest(self) -> tuple[int, dict[str, Any]]:
        """The smallest parameter count in the space and a config that has it."""
        names = list(self.space)
        grids = [self.space[n].corners() for n in names]
        best: tuple[int, dict[str, Any]] | None = None
        for i, combo in enumerate(itertools.product(*grids)):
            if i >= 20_000:
                break  # categorical products this large are not real sweeps; the lower bound found so far stands
            sampled = self.rules.corner(dict(zip(names, combo)))
            try:
                n = self.params_of(self.overrides(sampled))
            except UserError:
                continue
            if best is None or n < best[0]:
                best = (n, sampled)
        if best is None:
            raise UserError(f"{self.source}: no combination of the space's lower bounds is a valid model; "
                            "check the ranges in [space]")
        return best


def _dist(name: str, spec: Any, tp: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        raise UserError(f"{where}: '{name}' must be a table like {{ choice = [...] }} or {{ int = [lo, hi] }}, "
                        f"got {spec!r}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    unknown = [k for k in spec if k not in DISTRIBUTIONS and k != "log"]
    if unknown or len(kinds) != 1:
        raise UserError(f"{where}: '{name}' needs exactly one of {', '.join(DISTRIBUTIONS)} (and optionally log), "
                        f"got keys {', '.join(spec) or 'none'}")
    kind = kinds[0]
    raw = spec[kind]
    log = spec.get("log", False)
    if not isinstance(log, bool) or (log and kind != "int"):
        raise UserError(f"{where}: '{name}': log = true applies to int ranges only (use loguniform for floats)")
    if kind == "choice":
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{where}: '{name}': choice must be a non-empty list")
        values = tuple(coerce(v, tp, f"{where}: '{name}'") for v in raw)
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"{where}: '{name}': choice lists a value twice")
        return Param(name, kind, values)
    if not isinstance(raw, list) or len(raw) != 2:
        raise UserError(f"{where}: '{name}': {kind} needs [lo, hi], got {raw!r}")
    lo, hi = raw
    if kind == "int":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            raise UserError(f"{where}: '{name}': int range needs integers, got {raw!r}")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise UserError(f"{where}: '{name}': {kind} range needs numbers, got {raw!r}")
    if not lo < hi:
        raise UserError(f"{where}: '{name}': range [{lo}, {hi}] is empty or inverted; need lo < hi "
                        "(use choice = [value] for a fixed value, or set it in [train])")
    if (kind == "loguniform" or log) and lo <= 0:
        raise UserError(f"{where}: '{name}': a log range needs lo > 0, got {lo}")
    base = base_type(tp)[0]
    if kind in ("uniform", "loguniform") and base is not float:
        raise UserError(f"{where}: '{name}' is not a real-valued setting; use int or choice")
    if kind == "int" and base is not int:
        raise UserError(f"{where}: '{name}' is not an integer setting; use {'uniform' if base is float else 'choice'}")
    return Param(name, kind, (lo, hi), log)


def parse(values: dict[str, Any], source: str) -> Sweep:
    """A validated sweep from a sweep file's values (`source` names the file in every error)."""
    unknown = sorted(set(values) - TOP_KEYS)
    if unknown:
        raise UserError(f"{source}: unknown key '{unknown[0]}'; known keys: {', '.join(sorted(TOP_KEYS))}")
    family = registry.get(values.get("model"), where=f"{source}: model")
    trials, seed = values.get("trials", 16), values.get("seed", 0)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UserError(f"{source}: trials must be a positive integer, got {trials!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{source}: seed must be an integer, got {seed!r}")
    runner = values.get("trial_runner", "auto")
    if runner not in TRIAL_RUNNERS:
        raise UserError(f"{source}: trial_runner must be one of {', '.join(TRIAL_RUNNERS)}, got {runner!r}")
    for table in ("train", "asha", "space"):
        if not isinstance(values.get(table, {}), dict):
            raise UserError(f"{source}: [{table}] must be a table")
    sweep = Sweep(family=family, trials=trials, seed=seed, train=_train_table(family, values.get("train", {}), source),
                  space=_space_table(family, values.get("space", {}), source), source=source,
                  grace_period=0, reduction_factor=0, description=str(values.get("description", "")),
                  trial_runner=runner, confirm=parse_confirm(values.get("confirm"), f"{source}: confirm"))
    sweep = _with_asha(sweep, dict(values.get("asha", {})), source)
    n, at = sweep.smallest()
    if n > sweep.budget:
        shown = ", ".join(f"{k}={v}" for k, v in at.items())
        raise UserError(f"{source}: no config in the space fits the budget of {sweep.budget:,} parameters "
                        f"(smallest: {n:,} at {shown}); lower the ranges' lower bounds in [space]")
    if "baseline" in values:
        sweep = dataclasses.replace(sweep, baseline=_baseline_table(sweep, values["baseline"], source))
    return sweep


def _baseline_table(sweep: Sweep, raw: Any, source: str) -> dict[str, Any]:
    """[baseline]: the configuration everyone starts from (a paper's recipe), a value for every [space] key, inside
    the space and the budget; the sweep runs it as its first trial, so that the winner is measured against it."""
    where = f"{source} [baseline]"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a table: a value for each [space] key")
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    keys = ", ".join(sweep.space)
    unknown = sorted(set(values) - set(sweep.space))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'; a baseline gives the [space] keys only ({keys}): a "
                        "fixed setting belongs in [train]")
    missing = [k for k in sweep.space if k not in values]
    if missing:
        raise UserError(f"{where}: '{missing[0]}' is missing; a baseline is a whole configuration of the space "
                        f"({keys})")
    for name, param in sweep.space.items():
        why = param.problem(values[name])
        if why:
            raise UserError(f"{where}: {name} = {values[name]!r} {why}; change the baseline, or widen [space] {name}")
    values = {name: float(v) if sweep.space[name].kind in ("uniform", "loguniform") else v
              for name, v in values.items()}
    try:
        params = sweep.params_of(sweep.overrides(sweep.rules.fixed(values)))
    except UserError as exc:
        raise UserError(f"{where}: not a model that can be built ({exc})") from None
    if params > sweep.budget:
        raise UserError(f"{where}: {params:,} parameters, over the budget of {sweep.budget:,}; change the baseline, "
                        "or raise train.param_budget")
    return {name: values[name] for name in sweep.space}


def _train_table(family: Family, train_raw: dict[str, Any], source: str) -> dict[str, Any]:
    """[train]: the fixed settings, checked with the trainer's own rules (every key, type, and the whole)."""
    for key in train_raw:
        if key.replace("-", "_") in RESERVED:
            raise UserError(f"{source}: [train] key '{key}' is set by the tuner; remove it "
                            "(data: --data-dir/--synthetic; workers/GPUs: --workers-per-trial/--gpus-per-trial)")
    base = resolve(family.config, {**train_raw, "synthetic": True}, source=f"{source} [train]")
    return {k.replace("-", "_"): getattr(base, k.replace("-", "_")) for k in train_raw}


def _space_table(family: Family, space_raw: dict[str, Any], source: str) -> dict[str, Param]:
    """[space]: each key a config field (or one of the family's special keys) with its distribution."""
    if not space_raw:
        raise UserError(f"{source}: [space] is empty; give at least one parameter to search")
    rules, fields = family.sweep.rules, fields_of(family.config)
    space: dict[str, Param] = {}
    for key, spec in space_raw.items():
        name = key.replace("-", "_")
        if name in RESERVED or name == "steps":
            raise UserError(f"{source}: [space] key '{key}' cannot be searched (steps: ASHA decides; the rest are "
                            "set by the tuner)")
        if name in rules.keys:
            tp = int
        elif name in fields:
            tp = fields[name][1]
        else:
            known = sorted(set(fields) - RESERVED - {"steps"}) + list(rules.keys)
            raise UserError(f"{source}: [space] unknown key '{key}'; known keys: {', '.join(known)}")
        space[name] = _dist(name, spec, tp, f"{source} [space]")
    rules.validate(space, f"{source}")
    return space


def _with_asha(sweep: Sweep, asha: dict[str, Any], source: str) -> Sweep:
    """[asha]: the grace period (default: the larger of eval_every and a tenth of the steps) and reduction factor."""
    unknown = sorted(set(asha) - ASHA_KEYS)
    if unknown:
        raise UserError(f"{source}: [asha] unknown key '{unknown[0]}'; known keys: {', '.join(sorted(ASHA_KEYS))}")
    grace = asha.get("grace_period", max(sweep.eval_every, sweep.steps // 10))
    rf = asha.get("reduction_factor", 3)
    if not isinstance(grace, int) or not 1 <= grace < sweep.steps:
        raise UserError(f"{source}: [asha] grace_period must be an integer in [1, train.steps={sweep.steps}), "
                        f"got {grace!r}")
    if grace < sweep.eval_every:
        raise UserError(f"{source}: [asha] grace_period {grace} is shorter than train.eval_every "
                        f"{sweep.eval_every}: trials report every eval_every steps; lower eval_every")
    if not isinstance(rf, int) or rf < 2:
        raise UserError(f"{source}: [asha] reduction_factor must be an integer >= 2, got {rf!r}")
    return dataclasses.replace(sweep, grace_period=grace, reduction_factor=rf)


def load(path: str | Path) -> Sweep:
    p = Path(path).expanduser()
    if not p.exists():
        shipped = Path(__file__).resolve().parents[2] / "sweeps" / p.name
        hint = f" (the shipped sweeps are in {shipped.parent})" if shipped.parent.is_dir() else ""
        raise UserError(f"sweep file {p} not found{hint}")
    return parse(load_toml(p), str(p))


def default_sweep() -> Path:
    return Path(__file__).resolve().parents[2] / "sweeps" / "densenet_100k.toml"


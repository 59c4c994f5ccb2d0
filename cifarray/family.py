"""What a model family is: three small parts, each read by the one consumer that needs it.

A family (DenseNet, DCGAN, or one registered from outside, see `cifarray.registry`) is a name, its training
config class and:

- `Pieces`, what the training loop runs (`cifarray.train.engine.train`):
  - `build(cfg, worker) -> state`: models, optimizers, schedules, augmentation. The state is a `TrainState`:
    `stateful` names the components a checkpoint holds (the engine adds the data order) and `primary` is
    the model whose weights identify the run.
  - `step(state, batch) -> {name: tensor}`: one optimisation step on `batch` (this rank's indices into
    `worker.data.train`, on the device). Pure tensor work: no `.item()`, no branching on values, so that it
    can be compiled or captured as a whole. The engine sums the tensors on the device and reads them back
    only at log points (mean over steps and ranks).
  - `evaluate(state, step) -> {name: float}`: rank 0, at the family's evaluation steps.
  - `finish(state, run) -> {summary fields}`: rank 0, after the last step: final weights and the family's
    part of summary.json.
- `SweepSpec`, what the tuner needs: the objective, the special sweep keys (`SweepRules`) and the test
  metrics of a sweep's best trial.
- `Display`, what the CLIs show: progress and summary keys, a description, and the figures and tables of
  a finished run (`cifarray.report`).

The parameter count and budget belong to the config (`param_count()`, `budget`: cifarray.models.budget).
Pieces are module-level functions, not lambdas: Optuna's searcher state pickles the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from cifarray.errors import UserError

if TYPE_CHECKING:
    import torch

    from cifarray.rundir import RunDir

# What `build` gets: a `cifarray.train.engine.Worker`. Named, not imported: this module is the types the layers
# above it share (tests/test_layering.py), and the engine is one of those layers.
Worker = Any


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # max | min
    label: str

    @property
    def worst(self) -> float:
        """What a trial that has no score scores (infeasible, diverged): a sweep must still hear the metric."""
        return worst(self.mode)


def worst(mode: str) -> float:
    return 0.0 if mode == "max" else 1e9


@dataclass(frozen=True)
class RunContext:
    """What the driver hands a worker that is not configuration (config.json does not record it)."""

    sweep_trial: bool = False  # a Tune trial: selects on validation data; the test split stays unseen
    fid_weights: tuple[str, str] | None = None  # (safe Inception weights path, sha256), resolved by the driver
    objective: Objective | None = None  # a sweep trial's: a diverged run reports it at its worst


class TrainState(Protocol):
    """What the engine needs of the state a family's `build` returns."""

    worker: Worker

    @property
    def stateful(self) -> dict[str, Any]:
        """The components a checkpoint holds, by name (each has state_dict / load_state_dict)."""

    @property
    def primary(self) -> "torch.nn.Module":
        """The model whose trainable parameters are hashed into workers/rank*.json (equal on every DDP rank)."""


def _nothing(*args: Any) -> dict:
    return {}


def _no_context(cfg: Any) -> RunContext:
    return RunContext()


@dataclass(frozen=True)
class Pieces:
    """What the training loop runs; see the module's docstring."""

    build: Callable[[Any, Worker], TrainState]
    step: Callable[[Any, "torch.Tensor"], dict[str, "torch.Tensor"]]
    evaluate: Callable[[Any, int], dict[str, float]]
    finish: Callable[[Any, "RunDir"], dict[str, Any]]
    metric_fields: tuple[str, ...]  # metrics.csv columns between step and images_per_s
    log_fields: Callable[[Any], dict[str, Any]] = _nothing  # host values added to every metrics row
    eval_now: Callable[[Any, int], bool] | None = None  # default: every cfg.eval_every steps
    begin: Callable[[Any], None] = _nothing  # rank 0, after restore, before the first step

    @property
    def metrics_columns(self) -> list[str]:
        """metrics.csv's header."""
        return ["step", *self.metric_fields, "images_per_s", "seconds", "attempt"]

    def evaluates_at(self, state: TrainState, step: int) -> bool:
        return self.eval_now(state, step) if self.eval_now else step % state.worker.cfg.eval_every == 0


class SweepRules:
    """A family's sweep keys that are not config fields, and how they become config values.

    The base (no special keys) is what a family without derived keys uses: every [space] key is a config
    field, sampled as it is. A family with derived keys (DenseNet's `num_blocks` and `layers_per_block` ->
    `blocks`; DCGAN's `g_width`/`d_width` -> width tuples) subclasses it."""

    keys: tuple[str, ...] = ()  # integer sweep keys that are not config fields

    def validate(self, space: dict[str, Any], source: str) -> None:
        """Refuse combinations of special keys that cannot be sampled (space: name -> Param)."""
        for n in self.keys:
            if n in space and space[n].kind not in ("choice", "int"):
                raise UserError(f"{source}: [space] {n} must be int or choice")
            if n in space and min(space[n].corners()) < 1:
                raise UserError(f"{source}: [space] {n} must be at least 1")

    def sample(self, space: dict[str, Any], trial: Any) -> dict[str, Any]:
        """Define-by-run: suggest every parameter (Optuna trial)."""
        return {name: p.suggest(trial) for name, p in space.items()}

    def corner(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """A sampled dict from one value per key (the search for the smallest model), derived keys filled."""
        return sampled

    def expand(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Config overrides for the special keys among sampled values."""
        return {}

    def fixed(self, values: dict[str, Any]) -> dict[str, Any]:
        """The sampled values (what `sample` suggests, by name) of a whole configuration given by [space] keys: a
        sweep's [baseline], enqueued in Optuna as its first trial."""
        return dict(values)

    def columns(self, space_keys: list[str]) -> tuple[tuple[str, Any], ...]:
        """Console columns between status and params: (header, function of the trial's config -> value)."""
        return (("batch", lambda c: c.get("batch_size")),
                *((k, lambda c, k=k: c.get(k)) for k in space_keys if k != "batch_size"))


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep of the family selects on and reports."""

    objective: Callable[[RunContext], Objective]
    rules: SweepRules = field(default_factory=SweepRules)
    # The test metrics of a finished run (a sweep's best trial, or each confirmed run), once: (run, config, the
    # driver's RunContext).
    test_metrics: Callable[["RunDir", Any, RunContext], dict[str, Any]] = _nothing


@dataclass(frozen=True)
class Display:
    """What the training CLI shows while and after a run, and the figures of a finished one."""

    figures: Callable[["RunDir", Any], list[Path]]  # figures and tables of a finished run (cifarray.report)
    progress_keys: tuple[str, ...] = ()  # shown while training
    summary_keys: tuple[str, ...] = ()  # printed by the CLI when training ends
    description: str = ""


@dataclass(frozen=True)
class Family:
    """One model family: its name and config class, and the parts each consumer reads."""

    name: str
    config: type  # the training config dataclass (a `CommonConfig`)
    pieces: Pieces
    sweep: SweepSpec
    display: Display
    driver_context: Callable[[Any], RunContext] = _no_context  # driver side, before Ray starts


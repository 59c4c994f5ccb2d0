"""Parameter budgets, enforced in one place before any training step.

Each config owns its count and its budget: a model config (`DenseNetConfig`, `DCGANConfig`) or a training
config (which asks its model config) has `param_count()`, `budget` and `over_budget(count, budget)`, the
message naming the flags to change. The trainer's input check calls `enforce_budget(config)`; it raises
`BudgetError` with the count and the budget, so an over-budget model never reaches Ray, let alone a
training step. Nothing here knows which model it counts.
"""

from __future__ import annotations

from typing import Any

from cifarray.errors import BudgetError

CLASSIFIER_BUDGET = 100_000  # trainable parameters of the DenseNet classifier
GAN_BUDGET = 1_000_000  # trainable parameters of generator + discriminator together


def enforce_budget(config: Any, budget: int | None = None) -> int:
    """The config's exact trainable parameter count, or `BudgetError` when it is over `budget` (default: the
    config's own)."""
    budget = config.budget if budget is None else budget
    count = config.param_count()
    if count > budget:
        raise BudgetError(config.over_budget(count, budget))
    return count

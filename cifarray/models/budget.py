"""Parameter budgets, enforced in one place before any training step.

Trainers and the tuner call `enforce_budget(config)` with the model config they
are about to build; it raises `BudgetError` with the count and the budget, so an
over-budget model never reaches Ray, let alone a training step.
"""

from __future__ import annotations

from cifarray.errors import BudgetError
from cifarray.models import dcgan, densenet

CLASSIFIER_BUDGET = 100_000  # trainable parameters of the DenseNet classifier
GAN_BUDGET = 1_000_000  # trainable parameters of generator + discriminator together


def enforce_budget(config: densenet.DenseNetConfig | dcgan.DCGANConfig, budget: int | None = None) -> int:
    """Return the model's exact trainable parameter count, or raise `BudgetError` if over `budget`."""
    if isinstance(config, densenet.DenseNetConfig):
        budget = CLASSIFIER_BUDGET if budget is None else budget
        count = densenet.param_count(config)
        if count > budget:
            raise BudgetError(
                f"DenseNet (growth rate {config.growth_rate}, blocks {','.join(map(str, config.blocks))}) has "
                f"{count:,} trainable parameters, over the budget of {budget:,}; lower --growth-rate or use "
                "fewer layers in --blocks (or raise --param-budget)"
            )
        return count
    if isinstance(config, dcgan.DCGANConfig):
        budget = GAN_BUDGET if budget is None else budget
        g, d = dcgan.generator_params(config), dcgan.discriminator_params(config)
        if g + d > budget:
            raise BudgetError(
                f"DCGAN has {g + d:,} trainable parameters (generator {g:,} + discriminator {d:,}), over the "
                f"budget of {budget:,}; narrow --g-widths/--d-widths (or raise --param-budget)"
            )
        return g + d
    raise TypeError(f"no parameter budget is defined for {type(config).__name__}")


def model_params(config: densenet.DenseNetConfig | dcgan.DCGANConfig) -> int:
    """Trainable parameters of a model config (for a GAN: generator + discriminator)."""
    if isinstance(config, densenet.DenseNetConfig):
        return densenet.param_count(config)
    return dcgan.param_count(config)


def train_config_params(cfg) -> int:
    """A family's `param_count`: the parameters of a training config's model_config()."""
    return model_params(cfg.model_config())


def enforce_train_config(cfg) -> int:
    """A family's `enforce_budget`: a training config's model against its budget (--param-budget)."""
    return enforce_budget(cfg.model_config(), cfg.budget)

"""The model families: one entry each. The CLI, the tuner, the report and the console look a family
up here by name; nothing else switches on a model name.

A family is a `cifarray.family.Family`: its config class (which counts its parameters against its
budget), the training loop's pieces, its sweep spec (objective, sweep rules, test metrics) and its
display (progress and summary keys, figures). Another family is added with
`register(family)` from any module, before the CLI parses its arguments; `tests/test_family_plugin.py`
trains, sweeps and reports one defined in the test file.
"""

from __future__ import annotations

from cifarray.errors import UserError
from cifarray.train import dcgan, densenet
from cifarray.family import Family

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if not family.name.isidentifier():
        raise ValueError(f"family name {family.name!r} must be an identifier")
    FAMILIES[family.name] = family
    return family


def get(name: str, where: str = "model") -> Family:
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UserError(f"{where} must be one of {', '.join(FAMILIES)}, got {name!r}") from None


def family_of_config(config: dict) -> str | None:
    """The name of the one family whose training config has every key of a config.json (None: none, or several)."""
    from cifarray.config import fields_of

    names = [name for name, family in FAMILIES.items() if set(config) <= set(fields_of(family.config))]
    return names[0] if len(names) == 1 else None


register(densenet.FAMILY)
register(dcgan.FAMILY)

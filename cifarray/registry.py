"""The model families: one entry each. The CLI, the tuner, the report and the console look a family
up here by name; nothing else switches on a model name.

A family is a `cifarray.train.engine.Family` (its config class, engine pieces, objective, progress
and summary keys, sweep rules, budget count and report). Another family is added with
`register(family)` from any module, before the CLI parses its arguments; `tests/test_family_plugin.py`
trains, sweeps and reports one defined in the test file.
"""

from __future__ import annotations

from cifarray.errors import UserError
from cifarray.train import dcgan, densenet
from cifarray.train.engine import Family

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


register(densenet.FAMILY)
register(dcgan.FAMILY)

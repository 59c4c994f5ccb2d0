"""A family's sweep keys that are not config fields, and how they become config values.

`SweepRules` (the default: none) is what a family without special keys uses: every [space] key is
a config field, sampled as it is. A family with derived keys (DenseNet's `num_blocks` and
`layers_per_block` -> `blocks`; DCGAN's `g_width`/`d_width` -> width tuples) subclasses it.
"""

from __future__ import annotations

from typing import Any

from cifarray.errors import UserError


class SweepRules:
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

    def columns(self, space_keys: list[str]) -> tuple[tuple[str, Any], ...]:
        """Console columns between status and params: (header, function of the trial's config -> value)."""
        return (("batch", lambda c: c.get("batch_size")),
                *((k, lambda c, k=k: c.get(k)) for k in space_keys if k != "batch_size"))

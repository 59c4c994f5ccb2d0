"""One validated config dataclass per job; values flow defaults -> TOML file -> CLI.

Fields carry their help text in `metadata["help"]`; `add_arguments` turns them into
flags (`--growth-rate`, `--blocks 5,5,5,5`, `--gpu/--no-gpu`, `--no-verify/--verify`) and `resolve` merges a
TOML file and the parsed flags, naming any unknown key or wrongly typed value.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from cifarray.errors import UserError


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and its one-line help."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    return dataclasses.field(default=default, metadata={"help": help})


def embed(cls: type, name: str, help: str | None = None) -> Any:
    """A flat training-config field mirroring field `name` of a component config (model, augmentation):
    the component's default and help, stated once there."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return opt(f.default, help or f.metadata["help"])


def base_type(tp: Any) -> tuple[Any, bool]:
    """(type without Optional, is_optional)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    base, optional = base_type(tp)
    if value is None and optional:
        return None
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)) or not value:
            raise UserError(f"{where}: expected a non-empty list like 5,5,5,5, got {value!r}")
        return tuple(coerce(v, item, where) for v in value)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{where}: expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if base is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp}")


def fields_of(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


class Switch(argparse.Action):
    """`--x` / `--no-x` for a bool field, right also for fields named `no_*`.

    argparse's BooleanOptionalAction reads any option starting with `--no-` as False, so for a field
    `no_verify` it made `--no-verify` mean "verify". Here the flag spelled like the field sets True and
    its opposite (`--verify` for `no_verify`, `--no-gpu` for `gpu`) sets False.
    """

    def __init__(self, option_strings, dest, default=None, help=None):
        self.on = option_strings[0]
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string == self.on)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_batch_split(batch_size: int, workers: int, problem: str, fix: str) -> None:
    """The one divisibility check: the global batch splits evenly over the workers (each rank trains
    batch_size / workers). The message names the settings the way the caller's user gave them."""
    if batch_size % workers:
        raise UserError(f"{problem}; {fix}")


def switch_flags(name: str) -> tuple[str, str]:
    """(flag that sets the field True, flag that sets it False)."""
    on = flag_of(name)
    return (on, "--" + on[len("--no-"):]) if name.startswith("no_") else (on, "--no-" + on[2:])


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field; every default is None so that `resolve` knows what the user gave.

    The help text names each default once (use a formatter that does not add defaults itself).
    """
    for name, (f, tp) in fields_of(cls).items():
        if name in skip:
            continue
        base, _ = base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata.get("help", "")
        if "default:" not in help_text:  # some helps say what a None default means instead
            help_text += f" (default: {shown})"
        if base is bool:
            parser.add_argument(*switch_flags(name), dest=name, action=Switch, default=None,
                                help=help_text.replace("%", "%%"))
        else:
            parser.add_argument(flag_of(name), dest=name, default=None, metavar=name.upper(),
                                help=help_text.replace("%", "%%"))


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {p} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {p} is not valid TOML: {exc}") from None


def resolve(cls: type, file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None,
            source: str = "config file") -> Any:
    """defaults -> file -> CLI; raises UserError naming an unknown key or a wrongly typed value."""
    fields = fields_of(cls)
    values: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        name = key.replace("-", "_")
        if name not in fields:
            raise UserError(f"{source}: unknown key '{key}'; known keys: {', '.join(sorted(fields))}")
        values[name] = coerce(value, fields[name][1], f"{source}: key '{key}'")
    for name, value in (cli_values or {}).items():
        if value is None or name not in fields:
            continue
        values[name] = coerce(value, fields[name][1], flag_of(name))
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """The inverse of `to_dict` (a saved config.json). Keys it lacks take today's defaults (a run written
    before a setting existed ran as its default); a key this version does not know is refused."""
    unknown = sorted(set(values) - set(fields_of(cls)))
    if unknown:
        raise UserError(f"config has setting(s) {', '.join(unknown)} that this version of cifarray does not know; "
                        "use the version that wrote it")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

"""One typed schema for run settings, read from the dataclasses' own field types.

A run's settings come from Python (`TrainingArguments(...)`), a YAML file (`--config run.yaml`)
and command-line flags; all three go through `convert`, which turns a value into the field's
declared type or raises one `ConfigError` naming the key, the value, where it came from and the
type expected. What it accepts, per declared type:

- `int`: an int, an integral float (`1e3`), or a string of either (`"1_000"`, `"2e3"`);
- `float`: a number or a numeric string in any spelling (`2e-4`, which YAML 1.1 reads as a
  string, `"0.0002"`, `"5E-5"`); never NaN or infinity;
- `bool`: a bool or `true/false/yes/no/on/off/1/0` in any case;
- `str`; `Literal[...]`: one of the listed values;
- `tuple[str, ...]`: a list of strings, or a comma-separated string (`q_proj` is a list of one);
- `list[X]`: a list of X, or comma-separated text (`0.5,1`);
- `MeshConfig`: `[data, fsdp, tensor]`, `"2,4,1"`, or a mapping `{data: 2, fsdp: 4}`;
- `X | None`: None (YAML null, or the text `none` / `null` unless X is `str` or lists that
  text), else X;
- a union of the above (e.g. `bool | Literal["offload", "dots"]`): the member whose plain type
  the value already has, else the first member that takes it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from fastlora_jax.errors import ConfigError
from fastlora_jax.sharding import MESH_AXES, MeshConfig

TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")
NULL = ("none", "null", "~")


class _Mismatch(Exception):
    """`value` is not of the kind tried (internal: the caller builds the user's message)."""


def describe(kind: Any) -> str:
    """A reader's name for a declared type (used in error messages and --help)."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(kind))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(kind) if a is not type(None)]
        text = " or ".join(describe(a) for a in members)
        return text + " or null" if len(members) < len(typing.get_args(kind)) else text
    if origin is tuple:
        return "a list of strings (or one comma-separated string)"
    if origin is list:
        return f"a list, each {describe(typing.get_args(kind)[0])} (or comma-separated text)"
    if kind is MeshConfig:
        return "a mesh: [data, fsdp, tensor] sizes, e.g. [2, 4, 1] or '2,4,1' (-1 = the rest)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def convert(value: Any, kind: Any, *, key: str, source: str) -> Any:
    """`value` as the declared `kind` of setting `key` (see the module doc), or a ConfigError."""
    try:
        return _convert(value, kind)
    except _Mismatch as err:
        detail = f" ({err})" if str(err) else ""
        raise ConfigError(f"{source}: {key}={value!r} is not {describe(kind)}{detail}") from None


def _convert(value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(kind)
        if value is None and type(None) in members:
            return None
        takes_text = any(m is str or (typing.get_origin(m) is Literal
                                      and value in typing.get_args(m)) for m in members)
        if (type(None) in members and isinstance(value, str) and not takes_text
                and value.strip().lower() in NULL):
            return None
        for member in members:  # a value already of a plain member type keeps that type
            if isinstance(member, type) and member is not type(None) and isinstance(value, member) \
                    and not (isinstance(value, bool) and member is not bool):
                return _convert(value, member)
        reasons = []
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(value, member)
            except _Mismatch as err:
                reasons.append(str(err))
        raise _Mismatch("; ".join(r for r in reasons if r))
    if origin is Literal:
        choices = typing.get_args(kind)
        if isinstance(value, str) and value in choices:
            return value
        raise _Mismatch("")
    if origin is tuple:
        return _string_tuple(value)
    if origin is list:
        return _list(value, typing.get_args(kind)[0])
    if kind is bool:
        return _bool(value)
    if kind is int:
        return _int(value)
    if kind is float:
        return _float(value)
    if kind is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(f"found {type(value).__name__}")
    if kind is MeshConfig:
        return _mesh(value)
    raise TypeError(f"schema: no conversion for declared type {kind!r}")  # a bug in our types


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
    raise _Mismatch("")


def _number(value: Any) -> float | int:
    """An int or float from a number or a numeric string; NaN / infinity are refused."""
    if isinstance(value, bool):
        raise _Mismatch("found a boolean")
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise _Mismatch("") from None
    else:
        raise _Mismatch(f"found {type(value).__name__}")
    if isinstance(number, float) and not math.isfinite(number):
        raise _Mismatch("it must be finite")
    return number


def _int(value: Any) -> int:
    number = _number(value)
    if isinstance(number, float):
        if not number.is_integer():
            raise _Mismatch("it has a fractional part")
        return int(number)
    return number


def _float(value: Any) -> float:
    return float(_number(value))


def _string_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _Mismatch(f"found {type(value).__name__}")
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise _Mismatch("every entry must be a non-empty name")
    return tuple(i.strip() for i in items)


def _list(value: Any, inner: Any) -> list[Any]:
    """A list of `inner` values from a list or from comma-separated text."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, (list, tuple)):
        raise _Mismatch(f"found {type(value).__name__}")
    return [_convert(item, inner) for item in value]


def _mesh(value: Any) -> MeshConfig:
    if isinstance(value, MeshConfig):
        return value
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if isinstance(value, dict):
        unknown = sorted(str(k) for k in value if k not in MESH_AXES)
        if unknown:
            raise _Mismatch(f"unknown mesh axes {unknown}; the axes are {list(MESH_AXES)}")
        sizes = {k: _mesh_size(v) for k, v in value.items()}
        return MeshConfig(**sizes)
    if isinstance(value, (list, tuple)):
        if len(value) != len(MESH_AXES):
            raise _Mismatch(f"expected {len(MESH_AXES)} sizes ({', '.join(MESH_AXES)}), found "
                            f"{len(value)}")
        return MeshConfig(*(_mesh_size(v) for v in value))
    raise _Mismatch(f"found {type(value).__name__}")


def _mesh_size(value: Any) -> int:
    size = _int(value)
    if size < 1 and size != -1:
        raise _Mismatch(f"axis size {size} must be >= 1 or -1")
    return size


def field_types(cls: type) -> dict[str, Any]:
    """{field name: declared type} of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def convert_fields(cls: type, values: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Every entry of `values` converted to `cls`'s declared type; unknown keys are an error."""
    kinds = field_types(cls)
    unknown = sorted(str(k) for k in values if k not in kinds)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {unknown}; known: {sorted(kinds)}")
    return {k: convert(v, kinds[k], key=k, source=source) for k, v in values.items()}


def coerce_instance(obj: Any, *, source: str) -> None:
    """Convert every field of a dataclass instance in place (from its `__post_init__`)."""
    for name, kind in field_types(type(obj)).items():
        object.__setattr__(obj, name, convert(getattr(obj, name), kind, key=name, source=source))

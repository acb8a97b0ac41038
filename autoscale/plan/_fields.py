"""Strict conversion between plan dataclasses and JSON values.

Plans are read from files that people edit by hand and that other versions of autoscale
wrote, so every value is checked against the field's type hint and every unknown key is
refused, with the dotted path of the field in the message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from autoscale.errors import PlanError
from autoscale.plan._frozen import FrozenDict, freeze_json


def to_json_value(value: Any) -> Any:
    """A dataclass, tuple or mapping as plain JSON-able lists/dicts (tuples become lists,
    FrozenDicts dicts, in their order)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    return value


def from_json_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build ``cls`` from a JSON object, refusing unknown keys and ill-typed values.

    Missing keys take the field's default; a field without default is required.
    The dataclass's own ``__post_init__`` then checks ranges and cross-field rules.
    """
    if not isinstance(data, dict):
        raise PlanError(f"{path} must be a JSON object, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PlanError(
            f"{path} has unknown key(s) {unknown}; known keys are {sorted(fields)}. "
            "The file was written by another autoscale version or edited by hand: remove them."
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], f"{path}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise PlanError(f"{path}.{name} is missing; it is required.")
    try:
        return cls(**kwargs)
    except PlanError:
        raise
    except (TypeError, ValueError) as err:
        raise PlanError(f"{path} is invalid: {err}") from err


def convert(hint: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type ``hint``; JSON lists become tuples and JSON objects
    FrozenDicts, so the result holds nothing mutable."""
    origin = get_origin(hint)
    if hint is Any:
        return freeze_json(value, path)
    if origin is Literal:
        if value not in get_args(hint) or isinstance(value, bool) != isinstance(
            get_args(hint)[0], bool
        ):
            raise PlanError(f"{path}={value!r} is not one of {list(get_args(hint))}.")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(hint):
            try:
                return convert(arm, value, path)
            except PlanError as err:
                errors.append(str(err))
        raise PlanError(f"{path}={value!r} has the wrong type; expected {_name(hint)}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise PlanError(f"{path} must be a list, got {type(value).__name__}.")
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise PlanError(f"{path} must have {len(args)} items, got {len(value)}.")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(convert(a, v, f"{path}[{i}]") for i, (a, v) in pairs)
    if origin is Mapping:
        key_hint, value_hint = get_args(hint)
        if not isinstance(value, dict):
            raise PlanError(f"{path} must be a JSON object, got {type(value).__name__}.")
        return FrozenDict((convert(key_hint, k, path), convert(value_hint, v, f"{path}.{k}"))
                          for k, v in value.items())
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_json_dataclass(hint, value, path)
    return _convert_scalar(hint, value, path)


def _convert_scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is type(None):
        if value is not None:
            raise PlanError(f"{path} must be null, got {value!r}.")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise PlanError(f"{path} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanError(f"{path} must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"{path} must be a number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise PlanError(f"{path} must be a string, got {value!r}.")
        return value
    # dict, list and set land here too: plan fields are immutable (Mapping, tuple).
    raise TypeError(f"unsupported plan field type {hint!r} at {path}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")

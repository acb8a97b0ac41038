"""Immutable containers for plan fields: a frozen mapping, and JSON values frozen deeply.

A plan is shared between the tuner, worker processes and the runtime, and its digest
names it, so nothing reachable from a plan may change after it is built: every mapping
in a plan is a :class:`FrozenDict` and every list a tuple.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn, TypeVar

from autoscale.errors import PlanError

__all__ = ["FrozenDict", "freeze_json", "is_frozen"]

K = TypeVar("K")
V = TypeVar("V")

_JSON_SCALAR = (str, int, float, bool, type(None))


class FrozenDict(Mapping[K, V]):
    """A read-only, hashable, picklable mapping that keeps insertion order.

    Invariant: its items never change after ``__init__``; it equals any mapping with the
    same items (as a dict does) and hashes by its items, so plans holding one stay
    hashable and compare by value.
    """

    __slots__ = ("_data",)
    _data: dict[K, V]

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        # object.__setattr__: __setattr__ below refuses every assignment.
        object.__setattr__(self, "_data", dict(items))

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through __init__: the default slot-state protocol would go through
        # __setattr__, which refuses.
        return (type(self), (self._data,))

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"FrozenDict is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"FrozenDict is immutable; cannot delete {name!r}")


def freeze_json(value: Any, path: str) -> Any:
    """``value`` with every mapping made a FrozenDict and every list a tuple, deeply.

    Raises PlanError naming ``path`` if ``value`` holds something a plan file cannot store
    (a key that is not a string, a tensor, an object): a plan that builds must also save.
    """
    if isinstance(value, _JSON_SCALAR):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(freeze_json(v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise PlanError(f"{path} has the key {key!r}; plan files take string keys "
                                "only: use str keys.")
        return FrozenDict((k, freeze_json(v, f"{path}.{k}")) for k, v in value.items())
    raise PlanError(f"{path} holds {type(value).__name__} {value!r}, which a plan file cannot "
                    "store; use numbers, booleans, strings, lists or objects of those.")


def is_frozen(value: Any) -> bool:
    """True if nothing reachable from ``value`` (a JSON-like value or dataclass) can change.

    A dataclass is frozen when it was declared ``frozen=True`` and its fields are frozen.
    """
    if isinstance(value, _JSON_SCALAR):
        return True
    if isinstance(value, tuple):
        return all(is_frozen(v) for v in value)
    if isinstance(value, FrozenDict):
        return all(is_frozen(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        frozen: bool = value.__dataclass_params__.frozen  # type: ignore[attr-defined]
        return frozen and all(is_frozen(getattr(value, f.name)) for f in fields)
    return False

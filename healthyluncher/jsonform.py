"""Results as JSON values: what `luncher --json` prints and `healthyluncher.to_json` returns."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NoReturn, TypeVar

K = TypeVar("K")
V = TypeVar("V")
C = TypeVar("C", bound=type)


def to_json(result: Any) -> Any:
    """A result as JSON values, as the `--json` of the matching `luncher` command prints it:
    dataclasses as objects (or as their own `to_json()` gives them), paths as strings,
    floats rounded to 6 digits, NaN and infinities as None. `json.dumps` takes the answer.

    >>> json.dumps(healthyluncher.to_json(lun.predict(["lunch.jpg"])[0]))
    '{"path": "lunch.jpg", "label": "healthy", "probability": 0.93, ...}'
    """
    if hasattr(result, "to_json") and not isinstance(result, type):
        # Its own form: a retrain's names as the CLI prints them, a photo held in memory
        # as its name rather than its megabytes.
        return to_json(result.to_json())
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {f.name: to_json(getattr(result, f.name)) for f in dataclasses.fields(result)}
    if isinstance(result, dict):
        return {str(k): to_json(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [to_json(v) for v in result]
    if isinstance(result, float):
        return round(result, 6) if math.isfinite(result) else None
    if isinstance(result, (str, int, bool)) or result is None:
        return result
    return str(result)


class FrozenDict(dict[K, V]):
    """A result's dict (probabilities, examples per label): read as a dict, equal to one and
    written as one, but it cannot change, so the frozen result holding it can be hashed."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a result cannot be changed; copy it first: dict(...)")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(_hashable(self))

    def __reduce__(self) -> tuple[Any, ...]:  # pickled and copied as a dict is, frozen again
        return (type(self), (dict(self),))


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return frozenset((key, _hashable(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(map(_hashable, value))
    return value


def frozen_result(cls: C) -> C:
    """For a frozen dataclass: its dicts become FrozenDicts when it is made, so that it is
    frozen all through and hashable as a frozen dataclass promises (a set of predictions,
    a cache key); `hash()` raised "unhashable type: 'dict'" before."""
    init = vars(cls)["__init__"]  # the dataclass's own

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for name, value in list(vars(self).items()):
            if type(value) is dict:
                object.__setattr__(self, name, FrozenDict(value))

    setattr(cls, "__init__", __init__)  # noqa: B010 - mypy refuses assigning a method
    return cls

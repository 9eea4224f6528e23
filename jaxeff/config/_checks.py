"""Validation shared by the config sections: each check raises ``ValueError`` naming
``Section.field`` and the problem."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from typing import Any, Literal


def _fail(cls: str, name: str, problem: str) -> None:
    raise ValueError(f"{cls}.{name}: {problem}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _finite_number(cls: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(cls, name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        _fail(cls, name, f"must be a finite number, got {value!r}")


def _check_types(obj: Any) -> None:
    """Every field of a config dataclass holds a value of its annotated type, every float is
    finite (a NaN or infinite learning rate, say, would otherwise train into NaN parameters) and
    every ``Literal`` field one of its choices (the choice lists are the ``Literal`` types,
    defined once). Integer ranges are checked by each class."""
    cls = type(obj).__name__
    for f in dataclasses.fields(obj):
        typ, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        if typ is float:
            _finite_number(cls, f.name, value)
        elif typ is int:
            if isinstance(value, bool) or not isinstance(value, int):
                _fail(cls, f.name, f"must be an integer, got {value!r}")
        elif typ is bool:
            if not isinstance(value, bool):
                _fail(cls, f.name, f"must be true or false, got {value!r}")
        elif typing.get_origin(typ) is Literal:
            if value not in typing.get_args(typ):
                _fail(cls, f.name, f"must be one of {typing.get_args(typ)}, got {value!r}")
        elif typ is str:
            if not isinstance(value, str):
                _fail(cls, f.name, f"must be a string, got {value!r}")
        elif typing.get_origin(typ) is tuple:
            if not isinstance(value, tuple):
                _fail(cls, f.name, f"must be a tuple, got {value!r}")
            for v in value:
                _finite_number(cls, f.name, v)
        elif isinstance(typ, type) and dataclasses.is_dataclass(typ) and not isinstance(value, typ):
            _fail(cls, f.name, f"must be a {typ.__name__}, got {type(value).__name__}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(type(obj).__name__, name, f"must be a positive integer, got {value!r}")

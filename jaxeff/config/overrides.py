"""Reading ``--set section.field=value`` strings into typed values."""

from __future__ import annotations

import typing
from typing import Any


def parse_value(raw: str, typ: Any, item: str) -> Any:
    """The value of a ``--set`` string for a field of type ``typ`` (bool, int, float, a tuple of
    floats as comma-separated numbers, else the string itself)."""
    raw = raw.strip()
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if typing.get_origin(typ) is tuple:
            return tuple(float(x) for x in raw.split(",")) if raw else ()
    except ValueError:
        raise ValueError(f"--set {item!r}: cannot read {raw!r} as {getattr(typ, '__name__', typ)}") from None
    return raw

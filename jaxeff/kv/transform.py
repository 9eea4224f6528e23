"""Cache transforms: pure functions applied to a decoding cache inside the jitted decode loop.

A transform is a hashable object (it is a static argument of the jitted loop) with

* ``stats_rows``: how many of the latest query rows' attention statistics it observes (0: none);
* ``init(cache) -> state``: its own state (a pytree), made once after the prompt;
* ``__call__(cache, state, stats) -> (cache, state)``: the new cache, e.g. with slots evicted,
  merged or quantised. ``stats`` is what ``model.extend(..., stats_rows=...)`` returned for the
  step that produced ``cache``.

:func:`jaxeff.generate` applies it after the prefill and every ``transform_every`` decode steps,
within the same compiled program; the cache's shapes never change, so nothing retraces.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


class CacheTransform(Protocol):
    stats_rows: int

    def init(self, cache: Any) -> Any: ...

    def __call__(self, cache: Any, state: Any, stats: dict) -> tuple[Any, Any]: ...


@dataclasses.dataclass(frozen=True)
class IdentityTransform:
    """Leaves the cache as it is (the baseline every transform is compared against)."""

    stats_rows: int = 0

    def init(self, cache):
        return ()

    def __call__(self, cache, state, stats):
        return cache, state

"""The registry of attention implementations, in the style of tokamax's ``api.py``.

Each implementation says whether it applies to a call (and why not); ``impl='auto'`` takes the
first that applies in :data:`AUTO_ORDER`; a named one that does not apply raises ``ValueError``
with its reason. Names come from :data:`jaxeff.config.ATTENTION_IMPLS`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


from jaxeff.config import ATTENTION_IMPLS
from jaxeff.ops.attention_mask import AttentionMask


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    """``unsupported(q, k, v, mask) -> None`` when the implementation computes this call, else
    the reason it does not; ``fn(q, k, v, mask, scale) -> out``."""

    name: str
    unsupported: Callable[..., str | None]
    fn: Callable[..., jax.Array]


_IMPLS: dict[str, AttentionImpl] = {}
AUTO_ORDER: list[str] = []  # what impl='auto' tries, first to last


def register_attention_impl(impl: AttentionImpl, *, auto_before: str | None = None, auto: bool = True) -> None:
    """Adds an implementation (names come from :data:`jaxeff.config.ATTENTION_IMPLS`); with
    ``auto`` it joins the 'auto' order, before ``auto_before`` (default: last)."""
    if impl.name not in ATTENTION_IMPLS or impl.name == "auto":
        raise ValueError(f"attention implementation name must be one of {ATTENTION_IMPLS[1:]}, got {impl.name!r}")
    _IMPLS[impl.name] = impl
    if impl.name in AUTO_ORDER:
        AUTO_ORDER.remove(impl.name)
    if auto:
        AUTO_ORDER.insert(AUTO_ORDER.index(auto_before) if auto_before in AUTO_ORDER else len(AUTO_ORDER), impl.name)


def attention_impl_for(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask: AttentionMask | None = None,
                       impl: str = "auto") -> str:
    """Which implementation ``attention`` runs for these inputs (shapes and dtypes suffice:
    ``jax.ShapeDtypeStruct`` works). Raises ``ValueError`` when a named one does not apply."""
    mask = AttentionMask() if mask is None else mask
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention: impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        if impl not in _IMPLS:
            raise ValueError(f"attention: impl={impl!r} is not registered (import jaxeff.sparse for 'block_sparse')")
        why = _IMPLS[impl].unsupported(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask)
        if why:
            raise ValueError(f"attention: impl={impl!r} does not apply here: {why}; use impl='auto' to fall back")
        return impl
    for name in AUTO_ORDER:
        if _IMPLS[name].unsupported(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask) is None:
            return name
    raise AssertionError("the xla reference applies to every call")  # pragma: no cover


def implementation(name: str) -> AttentionImpl:
    return _IMPLS[name]

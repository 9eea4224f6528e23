"""What an MoE layer needs to know about the batch beyond its input: the packed documents and the
step's loss coefficients.

The FFN contract is ``ffn(x_BxTxD, lora=None)``, so the train and eval steps open a
:func:`batch_context` around the model call (at trace time) with the batch's segment ids
(0 = padding) and the coefficients of the adaptive schedules. A layer asks :func:`segment_ids`
for ids matching its input's ``[B, T]``: Mixture-of-Recursions' gathered token subsets have
another length and get ``None`` (every token valid, every neighbour a predecessor). Outside a
step (a direct model call, decoding) there is no context: no masking, and each coefficient's
start value. ``record=True`` (analysis, not training) makes every MoE layer also return its dense
activations ``[B, T, E]`` under ``aux['moe/act/<layer index>']``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

_CTX: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jaxeff_moe_batch", default=None)


@contextlib.contextmanager
def batch_context(*, segment_ids=None, coefs: dict[str, Any] | None = None, record: bool = False) -> Iterator[None]:
    token = _CTX.set({"segment_ids": segment_ids, "coefs": dict(coefs or {}), "record": bool(record)})
    try:
        yield
    finally:
        _CTX.reset(token)


def segment_ids(shape_BxT: tuple[int, ...]):
    """The batch's segment ids ``[B, T]`` when a step set them and they match ``shape_BxT``."""
    ctx = _CTX.get()
    seg = None if ctx is None else ctx["segment_ids"]
    if seg is None or tuple(seg.shape) != tuple(shape_BxT):
        return None
    return seg


def coefficient(name: str, default: float):
    """The step's value of schedule ``name``, or ``default`` outside a step with that schedule."""
    ctx = _CTX.get()
    if ctx is None or name not in ctx["coefs"]:
        return default
    return ctx["coefs"][name]


def recording() -> bool:
    """Whether the layers should return their activations (``batch_context(record=True)``)."""
    ctx = _CTX.get()
    return bool(ctx is not None and ctx["record"])

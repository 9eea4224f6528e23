"""What a policy observes of one ``extend`` call, and the budget it compresses to.

``model.extend(..., stats_rows=R, stats_sums=True)`` returns, per layer, the attention
probabilities of each row's last R *valid* query rows over the layer's slots (``probs``
[B, H, R, C]), those queries (``queries`` [B, R, H, D]) and positions (``q_positions`` [B, R],
-1 for a row that has fewer than R tokens), and the column sums of the probabilities of every
valid query (``sums`` [B, H, C]). Probabilities are per query head; :func:`group_mean`
(``Observation.kv_probs`` / ``kv_sums``) aggregates the G query heads of each key/value head
(GQA, without ever repeating keys or values); key norms come from the cache
(:func:`key_norms`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.kv.cache import LayerKV
from jaxeff.ops import AttentionMask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    probs: tuple | None = None  # per layer [B, H, R, C]
    queries: tuple | None = None  # per layer [B, R, H, D]
    q_positions: jax.Array | None = None  # [B, R], -1: no such query
    sums: tuple | None = None  # per layer [B, H, C]
    budget: jax.Array | None = None  # [B] slots per head (the layer average)
    layer_budgets: tuple | None = None  # per layer [B] slots per head (the schedule)
    ratio: jax.Array | None = None  # [B] the budget's ratio of the tokens seen (None: a token count)
    prefill: bool = dataclasses.field(default=False, metadata=dict(static=True))
    headwise: bool = dataclasses.field(default=False, metadata=dict(static=True))
    safeguard: float = dataclasses.field(default=0.2, metadata=dict(static=True))

    def kv_probs(self, index: int, n_kv_heads: int) -> jax.Array:
        """[B, K, R, C]: layer ``index``'s probabilities, aggregated over each GQA group."""
        return group_mean(self.probs[index], n_kv_heads)

    def kv_sums(self, index: int, n_kv_heads: int) -> jax.Array:
        """[B, K, C]: layer ``index``'s column sums, aggregated over each GQA group."""
        return group_mean(self.sums[index], n_kv_heads)

    @staticmethod
    def key_norms(layer: LayerKV) -> jax.Array:
        """[B, K, C]: the L2 norm of each slot's key (:func:`key_norms`)."""
        return key_norms(layer)

    @classmethod
    def from_stats(cls, stats: dict, **kw) -> "Observation":
        qpos = stats.get("q_positions")
        return cls(probs=stats.get("probs"), queries=stats.get("queries"),
                   q_positions=None if qpos is None else qpos[0], sums=stats.get("sums"), **kw)


def group_mean(x_BxHx: jax.Array, n_kv_heads: int) -> jax.Array:
    """``[B, H, ...] -> [B, K, ...]``: the mean over the query heads of each key/value head."""
    b, h = x_BxHx.shape[:2]
    return x_BxHx.reshape(b, n_kv_heads, h // n_kv_heads, *x_BxHx.shape[2:]).mean(2)


def key_norms(layer: LayerKV) -> jax.Array:
    """[B, K, C] float32: the L2 norm of each slot's key as attention reads it."""
    k_BxCxKxD, _ = layer.keys_values(jnp.float32)
    return jnp.swapaxes(jnp.linalg.norm(k_BxCxKxD, axis=-1), 1, 2)


def window_probs(layer: LayerKV, queries_BxRxHxD: jax.Array, q_positions_BxR: jax.Array) -> jax.Array:
    """[B, H, R, C]: attention probabilities of the given (already rotated) queries over the
    layer's slots, each seeing the slots at positions <= its own; rows with position -1 are 0.
    SnapKV's observation window, recomputed from saved queries during decoding."""
    k_all, _ = layer.keys_values(queries_BxRxHxD.dtype)
    if hasattr(layer, "rotate_queries"):
        queries_BxRxHxD = layer.rotate_queries(queries_BxRxHxD, q_positions_BxR)
    b, r, h, d = queries_BxRxHxD.shape
    kh = layer.n_kv_heads
    mask = AttentionMask.by_position(q_positions_BxR, layer.positions).dense(b, r, layer.capacity)
    mask = mask & (q_positions_BxR >= 0)[:, None, :, None]
    q = queries_BxRxHxD.reshape(b, r, kh, h // kh, d).astype(jnp.float32)
    scores = jnp.einsum("brkgd,bskd->bkgrs", q, k_all.astype(jnp.float32)) * d ** -0.5
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)
    probs = jnp.nan_to_num(jax.nn.softmax(scores, axis=-1))
    return probs.reshape(b, h, r, layer.capacity)

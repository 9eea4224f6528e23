"""Which slots an eviction keeps, and the cache after it: pure, static-shape functions.

The rule every scoring policy shares (jaxeff issue 15): keep the top-``budget`` slots of each
head by score, protected slots (sinks, recent windows) always kept; ties go to the lower slot
(an older token). Head-wise allocation (AdaKV, Feng et al., 2024, arXiv 2407.11550, Alg. 1)
instead keeps the top ``K * budget`` slots of the whole layer, across its heads, after a
safeguard gives each head its own top ``alpha * budget``.

The survivors keep their slot order (so position order) and move to the front: the new slot
order is a stable argsort of "evicted" (:func:`compact`), applied with ``take_along_axis`` to
keys, values, positions and any per-slot policy state. Merging policies first add evicted
slots into kept ones (:func:`merge_mean`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.kv.cache import LayerKV


def descending_rank(scores: jax.Array) -> jax.Array:
    """Rank of each entry along the last axis in descending order of score, ties to the lower
    index (0 = best)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def keep_top(scores_BxKxC: jax.Array, valid_BxKxC: jax.Array, protect_BxKxC: jax.Array, budget: jax.Array, *,
             headwise: bool = False, safeguard: float = 0.2) -> jax.Array:
    """[B, K, C] bool: the slots kept. ``budget`` (slots per head, [B] or [B, K] int) is raised to
    the number of protected slots where it is lower; empty slots are never kept. With
    ``headwise``, the layer keeps ``K * budget`` slots (of [B] ``budget``) over all heads, each
    head first guaranteed its top ``floor(safeguard * budget)``."""
    b, kh, c = scores_BxKxC.shape
    protect = protect_BxKxC & valid_BxKxC
    s = jnp.where(protect, jnp.inf, scores_BxKxC.astype(jnp.float32))
    s = jnp.where(valid_BxKxC, s, -jnp.inf)
    n_protect_BxK = protect.sum(-1).astype(jnp.int32)
    if not headwise:
        budget_BxK = jnp.broadcast_to(budget if budget.ndim == 2 else budget[:, None], (b, kh)).astype(jnp.int32)
        budget_BxK = jnp.maximum(budget_BxK, n_protect_BxK)
        return (descending_rank(s) < budget_BxK[..., None]) & valid_BxKxC
    if budget.ndim != 1:
        raise ValueError("keep_top: a head-wise budget is one number per row ([B])")
    guard_B = jnp.floor(safeguard * budget).astype(jnp.int32)
    s = jnp.where((descending_rank(s) < guard_B[:, None, None]) & valid_BxKxC, jnp.inf, s)
    total_B = jnp.maximum(kh * budget.astype(jnp.int32), (s == jnp.inf).sum((1, 2)).astype(jnp.int32))
    flat = s.reshape(b, kh * c)
    keep = descending_rank(flat) < total_B[:, None]
    return keep.reshape(b, kh, c) & valid_BxKxC


def compaction_order(keep_BxKxC: jax.Array) -> jax.Array:
    """[B, K, C]: the slots in their new order, kept ones first, each group in slot order."""
    return jnp.argsort(~keep_BxKxC, axis=-1, stable=True)


def gather_slots(x: jax.Array, order_BxKxC: jax.Array) -> jax.Array:
    """``x [B, K, C, ...]`` in the new slot order."""
    idx = order_BxKxC.reshape(order_BxKxC.shape + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, idx, axis=2)


def compact(layer: LayerKV, keep_BxKxC: jax.Array, slot_state: dict | None = None, fill: dict | None = None):
    """The layer with only the kept slots, moved to the front in slot order (emptied slots: position
    -1, zero keys/values), and ``slot_state`` (arrays ``[B, K, C, ...]`` aligned with the slots)
    gathered the same way, emptied slots set to ``fill[name]`` (default 0). Returns
    ``(layer, slot_state)``."""
    order = compaction_order(keep_BxKxC)
    counts = keep_BxKxC.sum(-1).astype(jnp.int32)
    live = jnp.arange(layer.capacity)[None, None, :] < counts[..., None]
    k = jnp.where(live[..., None], gather_slots(layer.k, order), 0).astype(layer.k.dtype)
    v = jnp.where(live[..., None], gather_slots(layer.v, order), 0).astype(layer.v.dtype)
    positions = jnp.where(live, gather_slots(layer.positions, order), -1)
    out = dataclasses.replace(layer, k=k, v=v, positions=positions, counts=counts)
    new_state = {}
    for name, x in (slot_state or {}).items():
        g = gather_slots(x, order)
        mask = live.reshape(live.shape + (1,) * (x.ndim - 3))
        new_state[name] = jnp.where(mask, g, jnp.asarray((fill or {}).get(name, 0), x.dtype))
    return out, new_state


def merge_mean(layer: LayerKV, dest_BxKxC: jax.Array, weight_BxKxC: jax.Array) -> LayerKV:
    """Merges slots into others: slot e with ``dest[e] < C`` adds ``weight[e] * (k_e, v_e)`` into
    slot ``dest[e]``, and a receiving slot c becomes ``(x_c + sum_e w_e x_e) / (1 + n_c)``, n_c the
    number of slots merged into it (D2O eq. 9 with similarity weights; Elastic Cache's mean with
    weights 1). Keys and values are merged in float32; the merged slots themselves are left for
    the eviction that follows."""
    b, kh, c = dest_BxKxC.shape
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(kh)[None, :, None]
    w = weight_BxKxC.astype(jnp.float32)

    def merged(x):
        xf = x.astype(jnp.float32)
        total = xf.at[rows, heads, dest_BxKxC].add(w[..., None] * xf, mode="drop")
        n = jnp.zeros((b, kh, c), jnp.float32).at[rows, heads, dest_BxKxC].add(1.0, mode="drop")
        return (total / (1.0 + n)[..., None]).astype(x.dtype)

    return dataclasses.replace(layer, k=merged(layer.k), v=merged(layer.v))


def recent_mask(layer: LayerKV, lengths_B: jax.Array, n) -> jax.Array:
    """[B, K, C]: slots holding one of the last ``n`` positions of each row (``n`` an int or [B])."""
    n_B = jnp.broadcast_to(jnp.asarray(n, jnp.int32), lengths_B.shape)
    return layer.valid & (layer.positions >= (lengths_B - n_B)[:, None, None])


def sink_mask(layer: LayerKV, n: int) -> jax.Array:
    """[B, K, C]: slots holding one of the first ``n`` positions (attention sinks)."""
    return layer.valid & (layer.positions < n)

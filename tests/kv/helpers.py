"""Small random caches and plain-numpy transcriptions shared by the KV-policy tests."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from jaxeff.kv import KVCache, LayerKV, Observation


def random_layer(rng, b=2, kh=2, c=16, d=8, counts=((12, 12), (9, 9)), gaps=False):
    """A compacted layer: head h of row b holds counts[b][h] slots in increasing position order
    (contiguous from 0, or with gaps: an earlier eviction), the rest empty."""
    pos = np.full((b, kh, c), -1, np.int32)
    lengths = np.zeros(b, np.int32)
    for i in range(b):
        n_max = max(counts[i])
        span = n_max + (n_max // 2 if gaps else 0)
        lengths[i] = span
        for h in range(kh):
            n = counts[i][h]
            if gaps:
                keep = np.sort(rng.choice(span - 1, n - 1, replace=False))
                p = np.concatenate([keep, [span - 1]])  # the newest token is always there
            else:
                p = np.arange(span - n, span) if n < n_max else np.arange(n)
            pos[i, h, :n] = p
    k = rng.normal(size=(b, kh, c, d)).astype(np.float32)
    v = rng.normal(size=(b, kh, c, d)).astype(np.float32)
    valid = pos >= 0
    k[~valid] = 0
    v[~valid] = 0
    layer = LayerKV(k=jnp.asarray(k), v=jnp.asarray(v), positions=jnp.asarray(pos),
                    counts=jnp.asarray(valid.sum(-1).astype(np.int32)))
    return layer, lengths


def random_cache(rng, n_layers=2, **kw):
    layers, lengths = [], None
    for _ in range(n_layers):
        layer, lengths = random_layer(rng, **kw)
        layers.append(layer)
    return KVCache(layers=tuple(layers), lengths=jnp.asarray(lengths)), lengths


def obs_for(cache, budget, *, probs=None, queries=None, q_positions=None, sums=None, prefill=True, headwise=False):
    b = cache.batch
    budget_B = jnp.full((b,), budget, jnp.int32) if np.ndim(budget) == 0 else jnp.asarray(budget, jnp.int32)
    return Observation(probs=probs, queries=queries, q_positions=q_positions, sums=sums, budget=budget_B,
                       layer_budgets=(budget_B,) * len(cache.layers), prefill=prefill, headwise=headwise)


def np_keep(scores, positions, protect, budget):
    """The shared rule per (row, head): protected valid slots, then the highest scores (ties to
    the lower slot) up to ``budget``. Returns the kept positions as a sorted list."""
    valid = np.flatnonzero(positions >= 0)
    prot = [s for s in valid if protect[s]]
    rest = sorted((s for s in valid if not protect[s]), key=lambda s: (-scores[s], s))
    chosen = prot + rest[: max(budget - len(prot), 0)]
    return sorted(int(positions[s]) for s in chosen)


def kept_positions(layer, i, h):
    p = np.asarray(layer.positions[i, h])
    return sorted(int(x) for x in p[p >= 0])


def group_mean_np(x_BxH, kh):
    b, h = x_BxH.shape[:2]
    return x_BxH.reshape(b, kh, h // kh, *x_BxH.shape[2:]).mean(2)

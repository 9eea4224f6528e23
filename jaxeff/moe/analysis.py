"""Reading a trained MoE model's routing: the activations of every MoE layer on real batches, and
one report of the sparsity and locality metrics over them (what the experiment and the notebook
print)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.moe import metrics
from jaxeff.moe.context import batch_context


def layer_activations(model, tokens_BxT, segment_ids_BxT=None) -> dict[int, jax.Array]:
    """``{layer index: A [B, T, E]}`` of every MoE layer of ``model`` (an NNX model; jitted here),
    with the packed documents given to the layers as in training."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, seg):
        m = nnx.merge(graphdef, state)
        with batch_context(segment_ids=seg, record=True):
            _, aux = m(tokens, segment_ids=seg)
        return {k: v for k, v in aux.items() if k.startswith("moe/act/")}

    out = run(state, jnp.asarray(tokens_BxT), None if segment_ids_BxT is None else jnp.asarray(segment_ids_BxT))
    return {int(k.rsplit("/", 1)[1]): v for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("seg_len", "cache", "cls_lengths"))
def _layer_report(a, valid, seg, *, seg_len: int, cache: int, cls_lengths: tuple[int, ...]) -> dict:
    n_active = jnp.sum((a != 0) & valid[..., None]) / jnp.maximum(jnp.sum(valid), 1)
    row = {"tls": metrics.tls(a, valid), "reuse": metrics.reuse_ratio(a, valid, seg),
           "srp": metrics.srp(a, seg_len, valid), "sch": metrics.sch(a, seg_len, cache, valid),
           "active_experts": n_active}
    row.update({f"cls_{n}": metrics.cls(a, n, valid) for n in cls_lengths})
    return row


def routing_report(acts: dict[int, jax.Array], valid_BxT=None, segment_ids_BxT=None, *, seg_len: int = 8,
                   rho: float = 2.0, cls_lengths=metrics.CLS_LENGTHS) -> dict:
    """Means over the layers of TLS, CLS_L (every L of ``cls_lengths``), the reuse ratio,
    ``SRP(seg_len)`` (``srp_<seg_len>``), ``SCH(seg_len, rho x active experts)``
    (``sch_<seg_len>_rho<rho>``) and the active experts per token."""
    if not acts:
        return {}
    first = next(iter(acts.values()))
    valid = jnp.ones(first.shape[:2], bool) if valid_BxT is None else jnp.asarray(valid_BxT, bool)
    seg = valid.astype(jnp.int32) if segment_ids_BxT is None else jnp.asarray(segment_ids_BxT)
    rows = []
    for a in acts.values():
        cache = metrics.cache_size_for(a, rho, valid)
        row = jax.device_get(_layer_report(a, valid, seg, seg_len=seg_len, cache=cache, cls_lengths=tuple(cls_lengths)))
        rows.append({k: float(v) for k, v in row.items()})
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out[f"srp_{seg_len}"] = out.pop("srp")
    out[f"sch_{seg_len}_rho{rho:g}"] = out.pop("sch")
    return out

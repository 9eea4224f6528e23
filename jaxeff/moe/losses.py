"""Auxiliary losses of the MoE layers, as pure functions returning scalar means (float32).

BlockFFN's CLS-aware objectives (Song et al., 2025, arXiv 2507.08771, section 3.3): the
activation-locality loss ties each token's activation pattern to the previous token's, and the
chunk-sparsification loss pushes down the probability that an expert is active anywhere in a
chunk. Top-k baselines: the Switch load-balancing loss and the ST-MoE router z-loss. ReMoE: the
(load-balanced) L1 penalty on the ReLU router's output.

Packed documents come as segment ids ``[B, T]`` (0 = padding); padding is left out of every
mean, and the first token of each document has no predecessor for the locality loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_bte(name: str, arg: str, a) -> None:
    if getattr(a, "ndim", None) != 3:
        raise ValueError(f"{name}: {arg} must be [B, T, E], got shape {getattr(a, 'shape', None)}")


def _check_bt(name: str, arg: str, m, shape) -> None:
    if m is not None and tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name}: {arg} must be [B, T] = {tuple(shape)}, got {tuple(m.shape)}")


def pair_mask(shape_BxT, segment_ids_BxT=None) -> jax.Array:
    """``[B, T-1]``: token t+1 has token t as its predecessor in the same document (and neither is
    padding). Without segment ids every adjacent pair counts."""
    b, t = shape_BxT
    if segment_ids_BxT is None:
        return jnp.ones((b, max(t - 1, 0)), bool)
    seg = segment_ids_BxT
    return (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)


def activation_locality_loss(a0_BxTxE: jax.Array, *, segment_ids_BxT: jax.Array | None = None,
                             alpha: float = 100.0) -> jax.Array:
    """``L_al = BCE_with_logits(alpha * A0[t-1], target = sigmoid(alpha * A0[t]))`` (BlockFFN
    section 3.3): the sharpened sigmoid of the router logits stands in for the 0/1 activation
    pattern, and each token's pattern is pulled towards its successor's (gradients reach both,
    as in the official code). Mean over experts and over the pairs of consecutive tokens of
    one document; the first token of each packed document and padding are left out."""
    _check_bte("activation_locality_loss", "a0_BxTxE", a0_BxTxE)
    b, t, _ = a0_BxTxE.shape
    _check_bt("activation_locality_loss", "segment_ids_BxT", segment_ids_BxT, (b, t))
    if t < 2:
        return jnp.zeros((), jnp.float32)
    z = alpha * a0_BxTxE.astype(jnp.float32)
    logits, target = z[:, :-1], jax.nn.sigmoid(z[:, 1:])
    bce = jnp.maximum(logits, 0.0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    w = pair_mask((b, t), segment_ids_BxT).astype(jnp.float32)[..., None]
    return jnp.sum(bce * w) / jnp.maximum(jnp.sum(w) * a0_BxTxE.shape[-1], 1.0)


def chunk_activation_probs(a1_BxTxE: jax.Array, *, chunk_len: int = 64, valid_BxT: jax.Array | None = None,
                           eps: float = 1e-5):
    """``(P_act [B, C, E], chunk_valid [B, C])``: ``p_ik = A1_ik / (sum_i A1_ik + eps)`` and
    ``P_act_i = 1 - exp(sum_{k in chunk} ln(1 - p_ik + eps))`` (BlockFFN section 3.3), chunks of
    ``chunk_len`` positions (the last one padded), padding contributing nothing."""
    if not isinstance(chunk_len, int) or isinstance(chunk_len, bool) or chunk_len < 1:
        raise ValueError(f"chunk_sparsification_loss: chunk_len must be an integer >= 1, got {chunk_len!r}")
    _check_bte("chunk_sparsification_loss", "a1_BxTxE", a1_BxTxE)
    b, t, e = a1_BxTxE.shape
    _check_bt("chunk_sparsification_loss", "valid_BxT", valid_BxT, (b, t))
    a1 = a1_BxTxE.astype(jnp.float32)
    p = a1 / (jnp.sum(a1, axis=-1, keepdims=True) + eps)
    valid = jnp.ones((b, t), bool) if valid_BxT is None else valid_BxT.astype(bool)
    n_chunks = -(-t // chunk_len)
    pad = n_chunks * chunk_len - t
    log_keep = jnp.where(valid[..., None], jnp.log(1.0 - p + eps), 0.0)
    log_keep = jnp.pad(log_keep, ((0, 0), (0, pad), (0, 0))).reshape(b, n_chunks, chunk_len, e)
    chunk_valid = jnp.pad(valid, ((0, 0), (0, pad))).reshape(b, n_chunks, chunk_len).any(-1)
    return 1.0 - jnp.exp(jnp.sum(log_keep, axis=2)), chunk_valid


def chunk_sparsification_loss(a1_BxTxE: jax.Array, *, chunk_len: int = 64,
                              valid_BxT: jax.Array | None = None) -> jax.Array:
    """``L_cs = mean over chunks and experts of P_act`` (BlockFFN section 3.3): the probability that
    an expert is active somewhere in a chunk of ``chunk_len`` consecutive positions, from the
    router's normalised ReLU output ``A1``. Chunks with no valid token are left out."""
    p_act, chunk_valid = chunk_activation_probs(a1_BxTxE, chunk_len=chunk_len, valid_BxT=valid_BxT)
    w = chunk_valid.astype(jnp.float32)[..., None]
    return jnp.sum(p_act * w) / jnp.maximum(jnp.sum(w) * a1_BxTxE.shape[-1], 1.0)


def _valid_weights(shape, valid):
    return jnp.ones(shape, jnp.float32) if valid is None else valid.astype(jnp.float32)


def load_balancing_loss(probs_NxE: jax.Array, experts_NxK: jax.Array, valid_N: jax.Array | None = None) -> jax.Array:
    """Switch Transformer (Fedus et al., 2021, arXiv 2101.03961) for top-k: ``E * sum_e f_e P_e``, with
    ``f_e`` the fraction of the N*k assignments that go to expert e and ``P_e`` the mean router
    probability of e; 1 when balanced. Tokens flattened: ``probs [N, E]``, ``experts [N, k]``."""
    n, e = probs_NxE.shape
    w = _valid_weights((n,), valid_N)
    counts = jnp.einsum("n,nke->e", w, jax.nn.one_hot(experts_NxK, e, dtype=jnp.float32))
    f = counts / jnp.maximum(jnp.sum(counts), 1.0)
    p = jnp.einsum("n,ne->e", w, probs_NxE.astype(jnp.float32)) / jnp.maximum(jnp.sum(w), 1.0)
    return e * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(logits_NxE: jax.Array, valid_N: jax.Array | None = None) -> jax.Array:
    """ST-MoE (Zoph et al., 2022, arXiv 2202.08906): mean over tokens of ``logsumexp(logits)^2``."""
    w = _valid_weights(logits_NxE.shape[:1], valid_N)
    z = jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)
    return jnp.sum(w * z * z) / jnp.maximum(jnp.sum(w), 1.0)


def remoe_l1_loss(gates_NxE: jax.Array, *, top_k: int, balance: bool = True,
                  valid_N: jax.Array | None = None) -> jax.Array:
    """ReMoE's regulariser (Wang et al., 2024, arXiv 2412.14711): the L1 norm of the ReLU gates, mean over
    tokens; with ``balance`` each expert's term is weighted by its load
    ``f_e = E / (k N) * #{tokens with gate_e > 0}`` (a constant of the step), so busier experts
    are pushed harder."""
    n, e = gates_NxE.shape
    w = _valid_weights((n,), valid_N)
    g = gates_NxE.astype(jnp.float32) * w[:, None]
    denom = jnp.maximum(jnp.sum(w), 1.0)
    if not balance:
        return jnp.sum(g) / denom
    load = jnp.sum((g > 0).astype(jnp.float32), axis=0)
    f = jax.lax.stop_gradient(e * load / (top_k * denom))
    return jnp.sum(g * f[None, :]) / denom

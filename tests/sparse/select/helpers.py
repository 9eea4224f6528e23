"""Shared by the selector tests: small random inputs and a dense numpy attention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def qk(b=1, t=64, h=4, kh=2, d=16, s=None, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    q = jnp.asarray(rng.normal(size=(b, t, h, d)) * scale, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kh, d)) * scale, jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32)
    return q, k, v


def probs(q, k, causal=False):
    """softmax(q k^T / sqrt(d)) [B, H, T, S] in float64."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    h, kh, d = q.shape[2], k.shape[2], q.shape[3]
    sc = np.einsum("bthd,bshd->bhts", q, np.repeat(k, h // kh, axis=2)) / np.sqrt(d)
    if causal:
        sc = np.where(np.tril(np.ones(sc.shape[-2:], bool)), sc, -np.inf)
    sc = sc - sc.max(-1, keepdims=True)
    p = np.exp(sc)
    return p / p.sum(-1, keepdims=True)


def block_sum(x, bq, bk):
    """[..., T, S] -> [..., nQ, nK] sums over blocks (zero-padded)."""
    t, s = x.shape[-2:]
    nq, nk = -(-t // bq), -(-s // bk)
    pad = np.zeros((*x.shape[:-2], nq * bq, nk * bk))
    pad[..., :t, :s] = x
    return pad.reshape(*x.shape[:-2], nq, bq, nk, bk).sum((-3, -1))


def states(bm):
    """The BlockMask's [B, H, nQ, nK] block states (0 empty, 1 partial, 2 full) as numpy."""
    return np.asarray(bm.block_states())

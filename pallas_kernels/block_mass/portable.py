"""Per-block attention mass as a portable ``pl.pallas_call`` (AdaSpa's exact block scores).

One program per (batch, query head, query block) holds its [block_q, D] queries and their cached
log-sum-exp, walks the key blocks (up to the diagonal when causal), and for each one sums
``exp(q k^T * scale - lse)`` over the [block_q, block_kv] tile in float32: one tile of scores
lives at a time, the [T, S] score matrix never exists. The row of nK sums is written once
(padded to a power of two, so the compiled Triton lowering sees power-of-two blocks, and sliced
after). Key/value head h // G serves query head h (GQA without repeating K). On CPU run with
``interpret=True``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_mass.common import check_inputs, pad_axis


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    causal: bool
    heads_per_kv: int
    kv_len: int
    block_q: int
    block_kv: int
    n_kv_blocks: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _kernel(q_ref, k_ref, lse_ref, o_ref, *, cfg: _Config):
    h, i = pl.program_id(1), pl.program_id(2)
    b = pl.program_id(0)
    kvh = h // cfg.heads_per_kv
    bq, bk = cfg.block_q, cfg.block_kv
    q = q_ref[...]
    lse = lse_ref[...]
    # padded rows carry lse = +inf and empty rows -inf: both contribute no mass
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    q_idx = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    slots = jax.lax.broadcasted_iota(jnp.int32, o_ref.shape, 0)

    def body(j, acc):
        k = k_ref[b, pl.ds(j * bk, bk), kvh, :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                                preferred_element_type=jnp.float32) * cfg.scale
        kv_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        ok = kv_idx < cfg.kv_len
        if cfg.causal:
            ok = ok & (kv_idx <= q_idx)
        p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
        return jnp.where(slots == j, jnp.sum(p), acc)

    n = cfg.n_kv_blocks
    if cfg.causal:  # key blocks past the last query of this block hold no allowed element
        n = jnp.minimum(n, ((i + 1) * bq - 1) // bk + 1)
    o_ref[...] = jax.lax.fori_loop(0, n, body, jnp.zeros(o_ref.shape, jnp.float32))


def block_mass(q_BxTxHxD, k_BxSxKxD, lse_BxHxT, block_q: int, block_kv: int, *, scale: float | None = None,
               causal: bool = False, interpret: bool = False) -> jax.Array:
    """mass [B, H, nQ, nK] float32, as :func:`pallas_kernels.block_mass.reference.block_mass`."""
    check_inputs(q_BxTxHxD, k_BxSxKxD, lse_BxHxT, block_q, block_kv, "block_mass (pallas)")
    b, t, h, d = q_BxTxHxD.shape
    s, kh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    nq, nk = -(-t // block_q), -(-s // block_kv)
    nkp = _next_pow2(nk)
    cfg = _Config(scale=float(d ** -0.5 if scale is None else scale), causal=bool(causal), heads_per_kv=h // kh,
                  kv_len=s, block_q=block_q, block_kv=block_kv, n_kv_blocks=nk)
    qp = pad_axis(q_BxTxHxD, 1, nq * block_q)
    kp = pad_axis(k_BxSxKxD, 1, nk * block_kv)
    lse = pad_axis(lse_BxHxT.astype(jnp.float32), 2, nq * block_q, jnp.inf)
    out = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg), grid=(b, h, nq),
        in_specs=[pl.BlockSpec((None, block_q, None, d), lambda b, h, i: (b, i, h, 0)),
                  pl.BlockSpec(kp.shape, lambda *_: (0, 0, 0, 0)),
                  pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_specs=pl.BlockSpec((None, None, None, nkp), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, nq, nkp), jnp.float32),
        interpret=interpret, name="block_mass",
    )(qp, kp, lse)
    return out[..., :nk]

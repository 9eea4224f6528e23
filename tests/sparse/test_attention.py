"""The public ``jaxeff.sparse.block_sparse_attention`` end to end (impl reference and pallas)
against dense attention over ``to_dense()`` written here, and its input errors."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import sparse


def dense_attention(q, k, v, mask, score_mod=None):
    """Plain softmax attention over mask [B|1, H|1, T, S] (float32, GQA by repeating heads:
    fine for a test oracle). Rows with no allowed key give 0."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    kr, vr = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr) * d ** -0.5
    if score_mod is not None:
        s = score_mod(s, jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
                      jnp.arange(t)[None, None, :, None], jnp.arange(s.shape[-1])[None, None, None, :])
    mask = jnp.broadcast_to(mask, s.shape)
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1) * mask.any(-1, keepdims=True)
    return jnp.einsum("bhts,bshd->bthd", p, vr)


def _inputs(rng, b, t, s, h, kh, d, dtype=jnp.float32):
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
                 for shape in ((b, t, h, d), (b, s, kh, d), (b, s, kh, d)))


SEG = np.sort(np.random.default_rng(5).integers(0, 3, (2, 80)), axis=1)
CASES = {
    "causal_gqa2": (sparse.causal(), 2, None, 80, 80, 4, 2, 16, 32, None),
    "document_causal_softcap": (sparse.and_masks(sparse.causal(), sparse.document(SEG)), 2, None, 80, 80, 2, 1, 32,
                                16, sparse.soft_cap(2.0)),
    "decode_chunk_vs_cache": (sparse.causal(offset=50), None, None, 30, 80, 4, 1, 16, 16, None),
    "prefix_lm_dense": (sparse.prefix_lm(np.array([10, 40])), 2, None, 80, 80, 2, 2, 16, 16, None),
    "per_head_window": (sparse.index_mask(lambda b, h, q, kv: (kv <= q) & (kv >= q - 8 - 8 * h)), None, 2, 64, 64, 2,
                        1, 16, 16, None),
}


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_attention(name, impl):
    fn, b_mask, h_mask, t, s, h, kh, bq, bk, score_mod = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    q, k, v = _inputs(rng, 2, t, s, h, kh, 32)
    bm = sparse.create_block_mask(fn, b_mask, h_mask, t, s, block_q=bq, block_kv=bk)
    assert sparse.which_impl(q, k, v, bm, impl=impl) == impl
    o, lse = sparse.block_sparse_attention(q, k, v, bm, impl=impl, score_mod=score_mod, return_lse=True)
    want = dense_attention(q, k, v, bm.to_dense(), score_mod)
    np.testing.assert_allclose(o, want, atol=3e-5)
    assert lse.shape == (2, h, t) and lse.dtype == jnp.float32
    if impl == "pallas":  # gradients agree with the reference implementation
        w = jnp.asarray(rng.standard_normal(o.shape), jnp.float32)
        grads = [jax.grad(lambda q, k, v: (sparse.block_sparse_attention(q, k, v, bm, impl=i, score_mod=score_mod)
                                           * w).sum(), argnums=(0, 1, 2))(q, k, v) for i in ("reference", "pallas")]
        for g_ref, g_pl in zip(*grads):
            np.testing.assert_allclose(g_pl, g_ref, atol=1e-4)


def test_under_jit_with_traced_segment_ids_and_empty_rows():
    """BlockMask built inside jit from traced segment ids; a document whose queries see no key
    (kv segment ids differ) gives zeros and LSE -inf with zero gradients."""
    rng = np.random.default_rng(0)
    t = 48
    q, k, v = _inputs(rng, 1, t, t, 2, 1, 16, jnp.bfloat16)
    q_seg = jnp.asarray(np.repeat([0, 1, 2], 16)[None])
    kv_seg = jnp.asarray(np.repeat([0, 1, 5], 16)[None])  # document 2 has no keys

    @jax.jit
    def run(q, k, v, q_seg, kv_seg):
        bm = sparse.create_block_mask(sparse.document(q_seg, kv_seg), 1, None, t, t, block_q=16, block_kv=16)
        f = lambda q, k, v: sparse.block_sparse_attention(q, k, v, bm, impl="pallas", return_lse=True)  # noqa: E731
        (o, lse), vjp = jax.vjp(f, q, k, v)
        return o, lse, vjp((jnp.ones_like(o), jnp.zeros_like(lse))), bm.to_dense()

    o, lse, (dq, dk, dv), mask = run(q, k, v, q_seg, kv_seg)
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), dense_attention(q, k, v, mask), atol=2e-2)
    assert np.isneginf(np.asarray(lse[:, :, 32:])).all() and np.isfinite(np.asarray(lse[:, :, :32])).all()
    np.testing.assert_array_equal(np.asarray(o[:, 32:], np.float32), 0)
    np.testing.assert_array_equal(np.asarray(dq[:, 32:], np.float32), 0)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in (dq, dk, dv))


def test_input_errors():
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, 2, 64, 64, 4, 2, 16)
    bm = sparse.create_block_mask(sparse.causal(), None, None, 64, 64, block_q=16, block_kv=16)
    attn = sparse.block_sparse_attention
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        attn(q, k, v[:, :32], bm)
    with pytest.raises(ValueError, match="q must be"):
        attn(q[0], k, v, bm)
    with pytest.raises(ValueError, match="k must be .*head_dim=16"):
        attn(q, k[..., :8], v[..., :8], bm)
    with pytest.raises(ValueError, match=r"q's heads \(4\) must be a multiple of k's heads \(3\)"):
        attn(q, jnp.zeros((2, 64, 3, 16)), jnp.zeros((2, 64, 3, 16)), bm)
    with pytest.raises(ValueError, match="q must be a floating-point array"):
        attn(q.astype(jnp.int32), k, v, bm)
    with pytest.raises(ValueError, match="block_mask was built for Q_LEN=64, KV_LEN=64, but q has 32"):
        attn(q[:, :32], k, v, bm)
    other = sparse.create_block_mask(sparse.causal(), 3, None, 64, 64, block_q=16, block_kv=16)
    with pytest.raises(ValueError, match="block_mask has B=3, H=1"):
        attn(q, k, v, other)
    heads = sparse.create_block_mask(sparse.index_mask(lambda b, h, q, kv: kv <= q + h), None, 3, 64, 64,
                                     block_q=16, block_kv=16)
    with pytest.raises(ValueError, match="block_mask has B=1, H=3"):
        attn(q, k, v, heads)
    with pytest.raises(ValueError, match="do not match its block_size"):
        attn(q, k, v, dataclasses.replace(bm, block_size=(32, 16)))
    with pytest.raises(ValueError, match="block_mask must be a BlockMask"):
        attn(q, k, v, bm.to_dense())
    with pytest.raises(ValueError, match="unknown impl 'cuda'; known: auto, reference, pallas, mosaic_gpu, splash"):
        attn(q, k, v, bm, impl="cuda")
    with pytest.raises(ValueError, match="scale must be a positive"):
        attn(q, k, v, bm, scale=-1.0)
    with pytest.raises(ValueError, match="score_mod must be callable"):
        attn(q, k, v, bm, score_mod=3.0)
    with pytest.raises(ValueError, match="impl='splash' does not apply"):
        attn(q, k, v, bm, impl="splash")

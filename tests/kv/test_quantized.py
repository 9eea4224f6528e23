"""Quantised cache layers: bit packing, error bounds per bit width (KIVI's asymmetric integers,
block floating point), KIVI's residual window and group flushes against a from-scratch
quantisation, K-sort (RoPE pairs kept together, q.k unchanged), bytes per token."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxeff.kv import KVCache, LayerKV, ksort_permutation
from jaxeff.kv.quantized import (BFPLayerKV, KIVILayerKV, asym_dequantize, asym_quantize, bfp_dequantize, bfp_quantize,
                                 bytes_per_token, pack, unpack)
from jaxeff.kv.rope_cache import rotate


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trips(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, (3, 5, 16)).astype(np.uint8)
    packed = pack(jnp.asarray(codes), bits)
    assert packed.shape == (3, 5, 16 * bits // 8) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits)), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_quantisation_error_is_at_most_half_a_step(bits):
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=(4, 32, 16)) * rng.uniform(0.1, 10, (4, 1, 16))).astype(np.float32)
    x[0, :, 0] = 3.0  # a constant group: exact
    codes, scale, mn = asym_quantize(jnp.asarray(x), bits, axis=1)
    assert scale.dtype == jnp.float16 and int(codes.max()) <= 2 ** bits - 1
    err = np.abs(np.asarray(asym_dequantize(codes, scale, mn)) - x)
    s = np.asarray(scale, np.float32)
    assert (err <= s / 2 * (1 + 1e-3) + 1e-6).all()
    assert err[0, :, 0].max() == 0
    # the step is the group's range over 2**bits - 1 (up to float16 rounding up)
    rng_ = x.max(1, keepdims=True) - x.min(1, keepdims=True)
    np.testing.assert_allclose(s, rng_ / (2 ** bits - 1), rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("m", [4, 8])
def test_block_floating_point_error_bound(m):
    rng = np.random.default_rng(m)
    x = (rng.normal(size=(6, 64)) * np.repeat(rng.uniform(0.01, 50, (6, 8)), 8, axis=1)).astype(np.float32)
    x[0, :8] = 0.0
    codes, exps = bfp_quantize(jnp.asarray(x), 8, m)
    assert exps.dtype == jnp.int8 and exps.shape == (6, 8)
    err = np.abs(np.asarray(bfp_dequantize(codes, exps, 8, m)) - x).reshape(6, 8, 8)
    amax = np.abs(x).reshape(6, 8, 8).max(-1)
    step = np.exp2(np.floor(np.log2(np.where(amax > 0, amax, 1))) - m + 2)
    assert (err <= step[..., None] * (1 + 1e-6)).all()
    assert err[0, 0].max() == 0
    if m == 8:  # relative to the block's largest value
        assert (err.max(-1) <= amax * 2 ** (2 - m) + 1e-12).all()


def _layer(rng, b=1, kh=2, c=40, d=8, n=37):
    k = rng.normal(size=(b, kh, c, d)).astype(np.float32)
    v = rng.normal(size=(b, kh, c, d)).astype(np.float32)
    pos = np.full((b, kh, c), -1, np.int32)
    pos[..., :n] = np.arange(n)
    k[pos < 0] = 0
    v[pos < 0] = 0
    return LayerKV(k=jnp.asarray(k), v=jnp.asarray(v), positions=jnp.asarray(pos),
                   counts=jnp.full((b, kh), n, jnp.int32))


def _kivi_reference(k, v, n, bits, group, residual):
    """KIVI from scratch in numpy: whole groups older than the last ``residual`` tokens
    quantised (keys per channel over the group's tokens, values per token over channel groups)."""
    nq = max((n - residual) // group, 0) * group
    kk, vv = k.copy(), v.copy()
    for g0 in range(0, nq, group):
        blk = k[g0:g0 + group]
        c, s, m = (np.asarray(x) for x in asym_quantize(jnp.asarray(blk), bits, axis=0))
        kk[g0:g0 + group] = np.asarray(asym_dequantize(c, s, m))
        for t in range(g0, g0 + group):
            row = v[t].reshape(-1, group)
            c, s, m = asym_quantize(jnp.asarray(row), bits, axis=1)
            vv[t] = np.asarray(asym_dequantize(c, s, m)).reshape(-1)
    return kk, vv, nq


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_conversion_and_appends_match_quantising_from_scratch(bits):
    rng = np.random.default_rng(bits)
    group, residual = 8, 8
    layer = _layer(rng, n=21)
    q = KIVILayerKV.from_layer(layer, bits=bits, group=group, residual=residual)
    k_ref, v_ref, nq = _kivi_reference(np.asarray(layer.k[0, 0]), np.asarray(layer.v[0, 0]), 21, bits, group, residual)
    assert int(q.n_quant[0, 0]) == nq == 8
    k_all, v_all = q.keys_values(jnp.float32)
    np.testing.assert_allclose(np.asarray(k_all)[0, :21, 0], k_ref[:21], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v_all)[0, :21, 0], v_ref[:21], rtol=1e-6, atol=1e-6)
    # append tokens one at a time and a chunk: the same as quantising the whole sequence
    full_k, full_v = np.asarray(layer.k[0]).copy(), np.asarray(layer.v[0]).copy()
    new_k = rng.normal(size=(1, 12, 2, 8)).astype(np.float32)
    new_v = rng.normal(size=(1, 12, 2, 8)).astype(np.float32)
    full_k[:, 21:33] = np.swapaxes(new_k[0], 0, 1)
    full_v[:, 21:33] = np.swapaxes(new_v[0], 0, 1)
    for t in range(5):
        q, slots = q.append(jnp.asarray(new_k[:, t:t + 1]), jnp.asarray(new_v[:, t:t + 1]), jnp.asarray([[21 + t]]))
        assert int(slots[0, 0, 0]) == 21 + t
    q, _ = q.append(jnp.asarray(new_k[:, 5:]), jnp.asarray(new_v[:, 5:]), jnp.asarray([np.arange(26, 33)]))
    assert int(q.counts[0, 0]) == 33 and int(q.n_quant[0, 0]) == 24
    assert residual <= 33 - int(q.n_quant[0, 0]) < residual + group
    k_all, v_all = q.keys_values(jnp.float32)
    for h in range(2):
        k_ref, v_ref, _ = _kivi_reference(full_k[h], full_v[h], 33, bits, group, residual)
        np.testing.assert_allclose(np.asarray(k_all)[0, :33, h], k_ref[:33], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(v_all)[0, :33, h], v_ref[:33], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.positions)[0, 0, :33], np.arange(33))


def test_ksort_keeps_rope_pairs_together_sorted_by_joint_norm():
    rng = np.random.default_rng(0)
    d = 8
    wk = rng.normal(size=(16, 2, d)).astype(np.float32) * np.asarray([1, 5, 2, 9, 3, 1, 4, 2], np.float32)
    perm = np.asarray(ksort_permutation(jnp.asarray(wk), "half"))
    norms = np.linalg.norm(wk, axis=0)
    for h in range(2):
        assert sorted(perm[h]) == list(range(d))
        pairs = perm[h].reshape(-1, 2)
        assert (pairs[:, 1] == pairs[:, 0] + d // 2).all()  # half-style partners adjacent
        joint = np.sqrt(norms[h, pairs[:, 0]] ** 2 + norms[h, pairs[:, 1]] ** 2)
        assert (np.diff(joint) <= 1e-6).all()
    inter = np.asarray(ksort_permutation(jnp.asarray(wk), "interleaved")).reshape(2, -1, 2)
    assert (inter[..., 0] % 2 == 0).all() and (inter[..., 1] == inter[..., 0] + 1).all()


def test_ksort_leaves_q_dot_k_unchanged_and_why_pairs_matter():
    """The same permutation of q's and k's channels leaves q.k unchanged; applied after RoPE
    (how the layer stores keys) it is exact, while an arbitrary channel permutation of W_q and
    W_k *before* RoPE breaks the rotation pairs and changes the scores."""
    rng = np.random.default_rng(1)
    d = 8
    q, k = rng.normal(size=(5, d)).astype(np.float32), rng.normal(size=(7, d)).astype(np.float32)
    pos_q, pos_k = jnp.arange(5)[:, None] + 10, jnp.arange(7)[:, None]
    qr = np.asarray(rotate(jnp.asarray(q)[:, None], pos_q, 100.0, "half"))[:, 0]
    kr = np.asarray(rotate(jnp.asarray(k)[:, None], pos_k, 100.0, "half"))[:, 0]
    perm = np.asarray(ksort_permutation(jnp.asarray(rng.normal(size=(4, 1, d)).astype(np.float32))))[0]
    np.testing.assert_allclose(qr[:, perm] @ kr[:, perm].T, qr @ kr.T, rtol=1e-5)
    bad = np.asarray([1, 0, 2, 3, 4, 5, 6, 7])  # swaps channels of two different RoPE pairs
    qb = np.asarray(rotate(jnp.asarray(q[:, bad])[:, None], pos_q, 100.0, "half"))[:, 0]
    kb = np.asarray(rotate(jnp.asarray(k[:, bad])[:, None], pos_k, 100.0, "half"))[:, 0]
    assert np.abs(qb @ kb.T - qr @ kr.T).max() > 1e-2


def test_bfp_layer_round_trip_and_sorting_helps_with_outlier_channels():
    rng = np.random.default_rng(2)
    d, block = 16, 4
    scale = np.ones(d, np.float32)
    scale[[0, d // 2]] = 30.0  # an outlier pair, split over two blocks in the natural order
    layer = _layer(rng, c=12, d=d, n=12)
    k = np.asarray(layer.k) * scale
    wk = (rng.normal(size=(32, 2, d)) * scale).astype(np.float32)

    def err(perm):
        q = BFPLayerKV.empty_like(layer, jnp.asarray(perm), block=block, mantissa_bits=4, values=False)
        q, _ = q.append(jnp.asarray(np.swapaxes(k, 1, 2)), jnp.swapaxes(layer.v, 1, 2), jnp.arange(12)[None])
        kq, vq = q.keys_values(jnp.float32)
        np.testing.assert_array_equal(np.asarray(vq), np.asarray(jnp.swapaxes(layer.v, 1, 2)))
        others = np.ones(d, bool)
        others[[0, d // 2]] = False  # the error on the ordinary channels: what an outlier's block crushes
        return np.abs(np.asarray(kq) - np.swapaxes(k, 1, 2))[..., others].mean()

    natural = np.broadcast_to(np.arange(d), (2, d))
    assert err(np.asarray(ksort_permutation(jnp.asarray(wk)))) < 0.6 * err(natural)


def test_bytes_per_token_of_each_format():
    layer = _layer(np.random.default_rng(3), c=64, d=64, n=40)
    full = KVCache(layers=(layer,) * 2, lengths=jnp.asarray([40]))
    assert bytes_per_token(full) == 2 * 2 * (2 * 64 * 4 + 4)
    kivi = KVCache(layers=(KIVILayerKV.from_layer(layer, bits=2, group=32, residual=32),) * 2, lengths=full.lengths)
    assert bytes_per_token(kivi) == 2 * 2 * (2 * 64 * 2 / 8 + 4 * 64 / 32 + 4 * 2 + 4)
    bfp = BFPLayerKV.empty_like(layer, jnp.broadcast_to(jnp.arange(64), (2, 64)), block=32, mantissa_bits=4, values=False)
    assert bytes_per_token(KVCache(layers=(bfp,), lengths=full.lengths)) == 2 * (64 * 4 / 8 + 2 + 64 * 4 + 4)
    assert jax.tree_util.tree_leaves(kivi)[0].dtype == jnp.uint8

"""attention_reference against a naive per-head numpy loop (GQA, causal, segments, decode
offsets), the mask builder, and the implementation dispatch on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops import attention, attention_mask, attention_reference


def _np_attention(q, k, v, *, causal=True, q_offset=None, q_seg=None, kv_seg=None, scale=None):
    """Loops over batch, query head, query; returns output and which rows had any visible key."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    group = h // kh
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros((b, t, h, d))
    any_visible = np.zeros((b, t), bool)
    for bi in range(b):
        off = 0 if q_offset is None else int(q_offset[bi])
        for hi in range(h):
            kv = hi // group  # query heads [kv*group, (kv+1)*group) share key/value head kv
            for ti in range(t):
                visible = np.ones(s, bool)
                if causal:
                    visible &= np.arange(s) <= off + ti
                if q_seg is not None:
                    keys = q_seg[bi] if kv_seg is None else kv_seg[bi]
                    visible &= keys == q_seg[bi, ti]
                any_visible[bi, ti] = visible.any()
                if not visible.any():
                    continue
                scores = k[bi, :, kv, :].astype(np.float64) @ q[bi, ti, hi].astype(np.float64) * scale
                scores = np.where(visible, scores, -np.inf)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[bi, ti, hi] = p @ v[bi, :, kv, :]
    return out, any_visible


def _qkv(rng, b, t, s, h, kh, d):
    return (rng.normal(size=(b, t, h, d)).astype(np.float32), rng.normal(size=(b, s, kh, d)).astype(np.float32),
            rng.normal(size=(b, s, kh, d)).astype(np.float32))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_segments", [False, True])
def test_reference_matches_naive_loop(n_kv_heads, causal, with_segments):
    rng = np.random.default_rng(n_kv_heads * 10 + causal)
    q, k, v = _qkv(rng, 2, 7, 7, 4, n_kv_heads, 8)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 2, 2, 3, 3, 3, 0]], np.int32) if with_segments else None
    out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal,
                              segment_ids_BxT=None if seg is None else jnp.asarray(seg))
    ref, _ = _np_attention(q, k, v, causal=causal, q_seg=seg)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_reference_decode_offsets_match_naive_loop(n_kv_heads):
    """Queries at key indices q_offset[b] + t over a cache of S slots, different per row."""
    rng = np.random.default_rng(n_kv_heads)
    q, k, v = _qkv(rng, 3, 2, 10, 4, n_kv_heads, 8)
    offset = np.array([0, 4, 8], np.int32)
    out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_offset_B=jnp.asarray(offset))
    ref, _ = _np_attention(q, k, v, q_offset=offset)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    # Slots past a row's last query must not matter: scramble them.
    k2, v2 = k.copy(), v.copy()
    k2[0, 2:], v2[0, 2:] = 100.0, -100.0
    out2 = attention_reference(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), q_offset_B=jnp.asarray(offset))
    np.testing.assert_allclose(np.asarray(out2[0]), np.asarray(out[0]), rtol=1e-6, atol=1e-6)


def test_reference_custom_scale():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 1, 4, 4, 2, 1, 8)
    out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.7)
    np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v, scale=0.7)[0], rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_finite_with_finite_gradients():
    rng = np.random.default_rng(6)
    q, k, v = map(jnp.asarray, _qkv(rng, 1, 3, 4, 2, 2, 8))
    q_seg = jnp.asarray([[1, 9, 1]], jnp.int32)  # segment 9 has no key: query 1 sees nothing
    kv_seg = jnp.asarray([[1, 1, 2, 2]], jnp.int32)
    out = attention_reference(q, k, v, causal=False, segment_ids_BxT=q_seg, kv_segment_ids_BxS=kv_seg)
    assert np.all(np.isfinite(np.asarray(out)))
    ref, visible = _np_attention(*map(np.asarray, (q, k, v)), causal=False, q_seg=np.asarray(q_seg),
                                 kv_seg=np.asarray(kv_seg))
    assert visible.tolist() == [[True, False, True]]
    np.testing.assert_allclose(np.asarray(out)[0, [0, 2]], ref[0, [0, 2]], rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda q, k, v: attention_reference(q, k, v, causal=False, segment_ids_BxT=q_seg,
                                                         kv_segment_ids_BxS=kv_seg).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_reference_rejects_indivisible_heads():
    q, k, v = map(jnp.asarray, _qkv(np.random.default_rng(0), 1, 2, 2, 3, 2, 4))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention_reference(q, k, v)


def test_attention_mask_hand_example():
    m = attention_mask(3, 3, q_segment_ids_BxT=jnp.asarray([[1, 1, 2]]))
    np.testing.assert_array_equal(np.asarray(m[0]), [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    m = attention_mask(2, 4, q_offset_B=jnp.asarray([1, 2]), batch=2)
    np.testing.assert_array_equal(np.asarray(m), [[[1, 1, 0, 0], [1, 1, 1, 0]], [[1, 1, 1, 0], [1, 1, 1, 1]]])
    m = attention_mask(2, 3, causal=False, batch=2)
    assert m.shape == (2, 2, 3) and bool(m.all())


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_dispatch_equals_reference_on_cpu(impl):
    rng = np.random.default_rng(7)
    q, k, v = map(jnp.asarray, _qkv(rng, 2, 5, 5, 4, 2, 8))
    seg = jnp.asarray([[1, 1, 2, 2, 2], [1, 1, 1, 1, 0]], jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16):  # bf16 would pick cuDNN on a GPU; CPU falls back
        qd, kd, vd = (x.astype(dtype) for x in (q, k, v))
        out = attention(qd, kd, vd, impl=impl, segment_ids_BxT=seg)
        ref = attention_reference(qd, kd, vd, segment_ids_BxT=seg)
        assert out.dtype == dtype
        np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN is available on GPU")
def test_cudnn_on_cpu_raises_clear_error():
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"impl='cudnn' needs a GPU.*impl='auto'"):
        attention(q, q, q, impl="cudnn")


def test_unknown_impl_raises():
    q = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, q, q, impl="flash")

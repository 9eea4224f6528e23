"""attention_reference against a naive per-head numpy loop (GQA, causal, segments, queries at
positions over cache slots, per-head slot positions), the mask descriptions, and the
implementation registry: its choices, its errors, and (marked ``gpu``) cuDNN against the
reference on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops import AttentionMask, attention, attention_impl_for, attention_reference


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
    mask = AttentionMask.training(None if seg is None else jnp.asarray(seg), causal=causal)
    out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask)
    ref, _ = _np_attention(q, k, v, causal=causal, q_seg=seg)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def _cache_mask(offset, b, t, s):
    """Queries at positions offset[b] + t over a cache whose slot s holds position s (slots past
    the row's last query are empty: position -1)."""
    q_pos = jnp.asarray(offset)[:, None] + jnp.arange(t)[None, :]
    kv_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    kv_pos = jnp.where(kv_pos <= q_pos[:, -1:], kv_pos, -1)
    return AttentionMask.by_position(q_pos, kv_pos)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_reference_by_position_matches_naive_loop(n_kv_heads):
    """Queries at positions q_offset[b] + t over a cache of S slots, different per row."""
    rng = np.random.default_rng(n_kv_heads)
    q, k, v = _qkv(rng, 3, 2, 10, 4, n_kv_heads, 8)
    offset = np.array([0, 4, 8], np.int32)
    mask = _cache_mask(offset, 3, 2, 10)
    out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask)
    ref, _ = _np_attention(q, k, v, q_offset=offset)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    # Empty slots must not matter: scramble them.
    k2, v2 = k.copy(), v.copy()
    k2[0, 2:], v2[0, 2:] = 100.0, -100.0
    out2 = attention_reference(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), mask=mask)
    np.testing.assert_allclose(np.asarray(out2[0]), np.asarray(out[0]), rtol=1e-6, atol=1e-6)


def test_per_head_slot_positions_match_per_head_loop():
    """Each key/value head's slots may hold different tokens (after a per-head eviction): the
    mask follows each head's own positions, and slot order does not matter."""
    rng = np.random.default_rng(11)
    b, t, h, kh, d, s = 2, 3, 4, 2, 8, 6
    q, k, v = _qkv(rng, b, t, s, h, kh, d)
    pos = np.stack([np.stack([rng.permutation(s) for _ in range(kh)]) for _ in range(b)]).astype(np.int32)
    pos[0, 1, :2] = -1  # two empty slots in head 1 of row 0
    q_pos = np.array([[3, 4, 5], [1, 2, 5]], np.int32)
    out = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              mask=AttentionMask.by_position(jnp.asarray(q_pos), jnp.asarray(pos)))
    want = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // kh)
            for ti in range(t):
                vis = (pos[bi, kv] >= 0) & (pos[bi, kv] <= q_pos[bi, ti])
                sc = np.where(vis, k[bi, :, kv] @ q[bi, ti, hi] / np.sqrt(d), -np.inf)
                p = np.exp(sc - sc.max())
                want[bi, ti, hi] = (p / p.sum()) @ v[bi, :, kv]
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_mask_patterns_by_index_and_by_position_agree():
    """local:W keeps the W keys before a query and itself; chunked:C is causal inside chunks."""
    t = 9
    q_pos, kv_pos = np.arange(t)[:, None], np.arange(t)[None, :]
    for pattern, want in (("local:2", (kv_pos <= q_pos) & (q_pos - kv_pos <= 2)),
                          ("chunked:4", (kv_pos <= q_pos) & (q_pos // 4 == kv_pos // 4))):
        by_index = AttentionMask.training(pattern=pattern).dense(1, t, t)[0, 0]
        pos = jnp.arange(t)[None]
        by_pos = AttentionMask.by_position(pos, pos, pattern=pattern).dense(1, t, t)[0, 0]
        np.testing.assert_array_equal(np.asarray(by_index), want)
        np.testing.assert_array_equal(np.asarray(by_pos), want)
    with pytest.raises(ValueError, match="local:W"):
        AttentionMask(pattern="window:3")


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
    mask = AttentionMask(q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=False)
    out = attention_reference(q, k, v, mask=mask)
    assert np.all(np.isfinite(np.asarray(out)))
    ref, visible = _np_attention(*map(np.asarray, (q, k, v)), causal=False, q_seg=np.asarray(q_seg),
                                 kv_seg=np.asarray(kv_seg))
    assert visible.tolist() == [[True, False, True]]
    np.testing.assert_allclose(np.asarray(out)[0, [0, 2]], ref[0, [0, 2]], rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda q, k, v: attention_reference(q, k, v, mask=mask).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_reference_rejects_indivisible_heads():
    q, k, v = map(jnp.asarray, _qkv(np.random.default_rng(0), 1, 2, 2, 3, 2, 4))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention_reference(q, k, v)


def test_attention_mask_hand_example():
    m = AttentionMask.training(jnp.asarray([[1, 1, 2]])).dense(1, 3, 3)
    np.testing.assert_array_equal(np.asarray(m[0, 0]), [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    m = _cache_mask(np.array([1, 2]), 2, 2, 4).dense(2, 2, 4)
    np.testing.assert_array_equal(np.asarray(m[:, 0]), [[[1, 1, 0, 0], [1, 1, 1, 0]], [[1, 1, 1, 0], [1, 1, 1, 1]]])
    m = AttentionMask(causal=False).dense(2, 2, 3)
    assert m.shape == (2, 1, 2, 3) and bool(m.all())
    # a query at a position with no valid key sees every slot (its output is discarded)
    m = AttentionMask.by_position(jnp.asarray([[0]]), jnp.asarray([[-1, 3]])).dense(1, 1, 2)
    assert bool(m.all())


def test_registry_auto_choice_and_forced_errors_on_cpu():
    """On a CPU 'auto' takes the reference for every dtype; a forced implementation that does
    not apply names why; unknown names list the known ones."""
    q = jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.bfloat16)
    if jax.default_backend() != "gpu":
        assert attention_impl_for(q, q, q) == "xla"
        with pytest.raises(ValueError, match=r"impl='cudnn' does not apply here: it needs a GPU"):
            attention_impl_for(q, q, q, impl="cudnn")
    assert attention_impl_for(q, q, q, impl="xla") == "xla"
    with pytest.raises(ValueError, match="impl must be one of"):
        attention_impl_for(q, q, q, impl="flash")


def test_attention_logs_the_implementation_it_ran(caplog):
    q = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with caplog.at_level("DEBUG", logger="jaxeff.attention"):
        attention(q, q, q)
    assert any(r.getMessage().endswith(": xla") for r in caplog.records)


gpu = pytest.mark.gpu


def _cudnn_cases():
    # (B, T, H, K, D, documents per row or None): every branch of the packed path (tiers 1, 2,
    # 4, 16 and the boolean-mask fallback), GQA, and plain causal.
    return [(2, 512, 8, 8, 64, None), (2, 1024, 12, 4, 64, 1), (2, 1024, 12, 4, 64, 2), (1, 2048, 16, 2, 128, 3),
            (2, 512, 4, 2, 64, 10), (2, 512, 4, 2, 64, 40)]


@gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("case", _cudnn_cases())
def test_cudnn_matches_reference_on_gpu(case):
    """cuDNN (causal, packed documents, GQA) against the float32 reference, forward and input
    gradients, on fresh random bf16 inputs (experiments/gpu_checks.py runs the same cases)."""
    b, t, h, kh, d, docs = case
    ks = jax.random.split(jax.random.key(t + h), 3)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, kh, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, kh, d), jnp.bfloat16)
    seg = None
    if docs:
        rng = np.random.default_rng(docs)
        seg_np = np.ones((b, t), np.int32)
        for r in range(b):
            cuts = rng.choice(np.arange(1, t - t // 8), docs - 1, replace=False)
            seg_np[r] = np.cumsum(np.isin(np.arange(t), cuts)) + 1
        seg = jnp.asarray(seg_np)
    mask = AttentionMask.training(seg)
    f32 = lambda *x: [y.astype(jnp.float32) for y in x]
    loss = lambda fn: (lambda q, k, v: (fn(q, k, v).astype(jnp.float32) ** 2).sum())
    fast = lambda q, k, v: attention(q, k, v, mask=mask, impl="cudnn")
    ref = lambda q, k, v: attention_reference(*f32(q, k, v), mask=mask)
    rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
    assert rel(jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v)) < 2e-2
    for g_f, g_r in zip(jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v),
                        jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)):
        assert rel(g_f, g_r) < 2e-2


@gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_cudnn_position_mask_matches_reference_on_gpu():
    """The dense-mask branch (cache slots by position, per head) on a GPU."""
    b, t, s, h, kh, d = 2, 64, 128, 8, 2, 64
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, kh, d), jnp.bfloat16)
    pos = jnp.argsort(jax.random.uniform(ks[2], (b, kh, s)), axis=-1).astype(jnp.int32)
    mask = AttentionMask.by_position(jnp.broadcast_to(jnp.arange(64, 128), (b, t)), pos)
    out = attention(q, k, k, mask=mask, impl="cudnn").astype(jnp.float32)
    ref = attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), k.astype(jnp.float32), mask=mask)
    assert float(jnp.abs(out - ref).max()) < 3e-2

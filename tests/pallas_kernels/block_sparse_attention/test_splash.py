"""The splash path on CPU: conversion of BlockMasks into splash masks (elementwise equal to
``to_dense()``), splash's own ``MaskInfo`` construction giving the BlockMask's block
classification, and the splash kernel itself in TPU interpret mode (it runs on CPU with
``interpret=True``) against the reference, through the shared cases and end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info

from jaxeff import sparse
from pallas_kernels.block_sparse_attention import api, reference, splash

from .test_base import AttentionTestBase, Case

RNG = np.random.default_rng(7)
SEG = jnp.asarray(np.sort(RNG.integers(0, 3, (2, 200)), axis=1))


def _masks():
    """(name, mask_fn, B, H, T, S, block_q, block_kv, structured)."""
    dense_h = RNG.random((2, 200, 200)) < 0.1
    return [
        ("causal_uneven", sparse.causal(), None, None, 200, 200, 64, 128, True),
        ("causal_offset_decode", sparse.causal(offset=100), None, None, 60, 160, 32, 128, True),
        ("local", sparse.local(40, 10), None, None, 256, 256, 64, 128, True),
        ("chunked", sparse.chunked_causal(48), None, None, 200, 130, 32, 128, True),
        ("and_or_not", sparse.or_masks(sparse.and_masks(sparse.causal(), sparse.not_mask(sparse.local(30, 0))),
                                       sparse.local(4, 4)), None, None, 256, 256, 64, 128, True),
        ("document_causal", sparse.and_masks(sparse.causal(), sparse.document(SEG)), 2, None, 200, 200, 128, 128, True),
        ("from_dense_heads", sparse.from_dense(dense_h), None, 2, 200, 200, 64, 128, False),
        ("prefix_lm", sparse.prefix_lm(jnp.array([20, 150])), 2, None, 200, 200, 64, 128, False),
        ("custom_callable", lambda b, h, q, kv: (q - kv) % 7 == 0, None, None, 128, 256, 64, 128, False),
        ("index_mask_per_head", sparse.index_mask(lambda b, h, q, kv: kv <= q - 16 * h), None, 2, 200, 200, 64, 128,
         False),
    ]


MASKS = _masks()


@pytest.mark.parametrize("name,fn,b,h,t,s,bq,bk,structured", MASKS, ids=[m[0] for m in MASKS])
def test_conversion_equals_to_dense(name, fn, b, h, t, s, bq, bk, structured):
    bm = sparse.create_block_mask(fn, b, h, t, s, block_q=bq, block_kv=bk)
    batch, heads = b or 1, h or 2
    plan = splash.to_splash(bm.layout(), bm.element_mask(batch=batch, heads=heads), batch=batch, heads=heads)
    want = np.broadcast_to(np.asarray(bm.to_dense()), (batch, heads, t, s))
    np.testing.assert_array_equal(plan.dense(batch), want)
    kinds = {type(m).__name__ for mh in plan.masks for m in mh.masks}
    assert ("NumpyMask" not in kinds) == structured, kinds
    assert len(plan.masks) == (batch if (not structured and bm.shape[0] > 1) else 1)


@pytest.mark.parametrize("name,fn,b,h,t,s,bq,bk,structured", MASKS, ids=[m[0] for m in MASKS])
def test_splash_mask_info_matches_block_classification(name, fn, b, h, t, s, bq, bk, structured):
    """splash's own MaskInfo (process_mask, numpy on CPU) classifies blocks as our lists do;
    with segment ids splash only sees the structural part, so it computes a superset."""
    bm = sparse.create_block_mask(fn, b, h, t, s, block_q=bq, block_kv=bk)
    batch, heads = b or 1, h or 2
    plan = splash.to_splash(bm.layout(), bm.element_mask(batch=batch, heads=heads), batch=batch, heads=heads)
    ours = np.broadcast_to(np.asarray(bm.block_states()), (batch, heads, *bm.num_blocks))
    for i in range(batch):
        info, _ = mask_info.process_mask(plan.masks[i if len(plan.masks) > 1 else 0], (bq, bk), shrink_grid=False)
        theirs = np.broadcast_to(np.asarray(info.block_mask, np.int8), (heads, *bm.num_blocks))
        if plan.q_segment_ids is None:
            np.testing.assert_array_equal(theirs, ours[i], err_msg=name)
        else:
            assert ((theirs > 0) >= (ours[i] > 0)).all(), name


def test_traced_dense_mask_is_a_clear_error():
    dense = jnp.asarray(RNG.random((128, 128)) < 0.5)
    q = jnp.zeros((1, 128, 2, 32))
    k = jnp.zeros((1, 128, 1, 32))

    @jax.jit
    def f(dense):
        bm = sparse.create_block_mask(sparse.from_dense(dense), None, None, 128, 128, block_q=64, block_kv=128)
        ok, why = splash.applies(q, k, k, bm.layout(), bm.element_mask(batch=1, heads=2), interpret=True)
        assert not ok and "static" in why
        with pytest.raises(ValueError, match="splash.*static"):
            sparse.block_sparse_attention(q, k, k, bm, impl="splash", interpret=True)
        return bm.kv_num_blocks

    f(dense)


def test_end_to_end_structured_with_traced_segment_ids():
    """causal & document with segment ids traced under jit: the structured path (splash's
    CausalMask + SegmentIds) runs without a static mask and matches the reference."""
    b, t, h, kh, d = 2, 256, 4, 2, 32
    rng = np.random.default_rng(3)
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (b, t)), axis=1))
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.float32)

    @jax.jit
    def run(q, k, v, seg):
        bm = sparse.create_block_mask(sparse.and_masks(sparse.causal(), sparse.document(seg)), b, None, t, t,
                                      block_q=128, block_kv=128)
        o, lse = sparse.block_sparse_attention(q, k, v, bm, impl="splash", interpret=True, return_lse=True,
                                               score_mod=sparse.soft_cap(20.0))
        o_r, lse_r = reference.attention(q, k, v, bm.to_dense(), score_mod=sparse.soft_cap(20.0), return_lse=True)
        return o, lse, o_r, lse_r

    o, lse, o_r, lse_r = run(q, k, v, seg)
    np.testing.assert_allclose(o, o_r, atol=2e-5)
    np.testing.assert_allclose(lse, lse_r, atol=2e-5)


def test_gradient_through_the_lse_is_refused_not_dropped():
    t = 128
    q = jnp.ones((1, t, 2, 32))
    k = jnp.ones((1, t, 1, 32))
    bm = sparse.create_block_mask(sparse.causal(), None, None, t, t, block_q=64, block_kv=128)

    def loss(q, use_lse):
        o, lse = sparse.block_sparse_attention(q, k, k, bm, impl="splash", interpret=True, return_lse=True)
        return o.sum() + (lse.sum() if use_lse else 0.0)

    assert np.isfinite(np.asarray(jax.grad(loss)(q, False))).all()
    with pytest.raises(NotImplementedError, match="LSE"):
        jax.grad(loss)(q, True)


def test_dense_path_under_jit_with_a_static_mask_closed_over():
    rng = np.random.default_rng(4)
    t, h = 128, 2
    dense = rng.random((h, t, t)) < 0.2
    dense[:, :, 0] = True
    bm = sparse.create_block_mask(sparse.from_dense(dense), None, h, t, t, block_q=64, block_kv=128)
    q = jnp.asarray(rng.standard_normal((1, t, h, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, t, 1, 32)), jnp.float32)
    o = jax.jit(lambda q, k: sparse.block_sparse_attention(q, k, k, bm, impl="splash", interpret=True))(q, k)
    o_r, _ = reference.attention(q, k, k, bm.to_dense())
    np.testing.assert_allclose(o, o_r, atol=2e-5)


class TestSplashInterpret(AttentionTestBase):
    """The shared cases that splash supports (block_kv a multiple of 128; block_q too with segment
    ids; soft-capping as the only score_mod), run by splash's kernel in TPU interpret mode. Their
    index functions carry no structure, so they go through splash's NumpyMask path."""
    impl = "splash"
    interpret = True
    lse_grad = False  # splash's kernel does not differentiate its LSE
    skip_blocks = (64, 128, 32, "float32")
    cases = (
        Case("splash_causal_gqa2", 1, 256, 256, 4, 2, 32, 64, 128, "causal"),
        Case("splash_random_uneven", 1, 200, 130, 2, 1, 32, 64, 128, "random"),
        Case("splash_empty_rows_softcap", 1, 100, 128, 2, 1, 32, 32, 128, "empty_rows", soft_cap=5.0),
        Case("splash_document_bf16", 2, 128, 128, 2, 1, 64, 128, 128, "document", "bfloat16", soft_cap=20.0),
    )


def test_splash_not_applicable_reasons():
    q = jax.ShapeDtypeStruct((1, 128, 2, 32), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 128, 1, 32), jnp.float32)
    bm = sparse.create_block_mask(sparse.causal(), None, None, 128, 128, block_q=64, block_kv=64)
    ok, why = splash.applies(q, k, k, bm.layout(), bm.element_mask(), interpret=True)
    assert not ok and "block_kv" in why
    bm = sparse.create_block_mask(sparse.causal(), None, None, 128, 128, block_q=64, block_kv=128)
    ok, why = splash.applies(q, k, k, bm.layout(), bm.element_mask(), score_mod=lambda s, *_: s * 2, interpret=True)
    assert not ok and "score_mod" in why
    ok, why = api.IMPLEMENTATIONS["splash"].applies(q, k, k, bm.layout(), bm.element_mask())
    assert not ok and "TPU" in why

"""Block states from a mask's structure equal the element-wise classification exactly: bands
(causal, sliding windows with offsets), packed documents (run-unique rows), documents AND
causal; uneven lengths, block sizes, and under jit. Rows whose ids come back are classified
conservatively: full blocks exact, never empty where a pair attends, the attention unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxeff.sparse as sp
from jaxeff.sparse import block_mask as bm_lib
from jaxeff.sparse.block_states import structural_states


def _elementwise(fn, b, h, q, k, bq, bk):
    return np.asarray(bm_lib._classify(sp.masks.as_mask_fn(fn), b, h, q, k, bq, bk))


def _structural(fn, b, h, q, k, bq, bk):
    out = structural_states(fn, b, h, q, k, bq, bk)
    return None if out is None else np.asarray(out)


@pytest.mark.parametrize("q_len,kv_len,bq,bk", [(128, 128, 16, 16), (100, 140, 16, 32), (96, 50, 32, 16)])
@pytest.mark.parametrize("fn", [sp.causal(), sp.causal(offset=7), sp.local(20, 0), sp.local(5, 9),
                                sp.local(None, 3, offset=-4), sp.local(0, 0), sp.local(None, None)],
                         ids=["causal", "causal+7", "local20", "local5,9", "right3-4", "diag", "all"])
def test_bands_equal_the_elementwise_states(fn, q_len, kv_len, bq, bk):
    want = _elementwise(fn, 1, 1, q_len, kv_len, bq, bk)
    np.testing.assert_array_equal(_structural(fn, 1, 1, q_len, kv_len, bq, bk), want)


def _packed(rng, b, t, n_docs):
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), n_docs - 1, replace=False))
        seg[r] = np.searchsorted(cuts, np.arange(t), side="right") + 1
        seg[r, t - rng.integers(0, t // 4):] = 0  # trailing padding: its own run
    return seg


@pytest.mark.parametrize("t,bq,bk", [(128, 16, 16), (100, 16, 32), (90, 32, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_documents_equal_the_elementwise_states(t, bq, bk, causal):
    rng = np.random.default_rng(t + bq)
    seg = jnp.asarray(_packed(rng, 3, t, 5))
    fn = sp.and_masks(sp.document(seg), sp.causal()) if causal else sp.document(seg)
    np.testing.assert_array_equal(_structural(fn, 3, 1, t, t, bq, bk), _elementwise(fn, 3, 1, t, t, bq, bk))


@pytest.mark.parametrize("causal", [False, True])
def test_rows_with_returning_ids_are_classified_conservatively(causal):
    rng = np.random.default_rng(7)
    returning = np.asarray([1] * 20 + [2] * 20 + [1] * 24 + [3] * 30 + [0] * 2)  # id 1 comes back
    shuffled = rng.integers(0, 4, 96)  # ids in no order at all
    packed = _packed(rng, 1, 96, 4)[0]  # run-unique: exact
    seg = jnp.asarray(np.stack([returning, shuffled, packed]))
    fn = sp.and_masks(sp.document(seg), sp.causal()) if causal else sp.document(seg)
    got, want = _structural(fn, 3, 1, 96, 96, 16, 16), _elementwise(fn, 3, 1, 96, 96, 16, 16)
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_array_equal(got == 2, want == 2)  # full blocks: exact
    assert not ((got == 0) & (want != 0)).any()  # never skips a block with an allowed pair
    assert (got[0] != want[0]).any()  # the returning row is looser than exact (blocks 0 and 3 share id 1)
    # so the attention is the reference's
    q, k, v = (jnp.asarray(rng.normal(size=(3, 96, 2, 16)), jnp.float32) for _ in range(3))
    bm = sp.create_block_mask(fn, 3, None, 96, 96, block_q=16, block_kv=16)
    allowed_Bx1xQxK = sp.masks.as_mask_fn(fn)(jnp.arange(3)[:, None, None, None], 0, jnp.arange(96)[:, None],
                                              jnp.arange(96)[None, :])
    got_o = sp.block_sparse_attention(q, k, v, bm, impl="reference")
    s_ = jnp.where(allowed_Bx1xQxK, jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, -jnp.inf)
    want_o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s_, -1), v)
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), rtol=1e-5, atol=1e-5)


def test_other_masks_are_not_claimed():
    assert _structural(sp.chunked_causal(8), 1, 1, 64, 64, 16, 16) is None
    seg = jnp.ones((1, 64), jnp.int32)
    assert _structural(sp.and_masks(sp.document(seg), sp.local(8, 0)), 1, 1, 64, 64, 16, 16) is None


def test_traced_documents_under_jit_match_eager_lists():
    rng = np.random.default_rng(5)
    segs = [jnp.asarray(_packed(rng, 2, 96, 4)) for _ in range(2)]
    build = jax.jit(lambda s: sp.create_block_mask(sp.and_masks(sp.document(s), sp.causal()), 2, None, 96, 96,
                                                   block_q=16, block_kv=16).kv_indices)
    for seg in segs:
        eager = sp.create_block_mask(sp.and_masks(sp.document(seg), sp.causal()), 2, None, 96, 96,
                                     block_q=16, block_kv=16)
        np.testing.assert_array_equal(np.asarray(build(seg)), np.asarray(eager.kv_indices))
        np.testing.assert_array_equal(np.asarray(eager.block_states()),
                                      _elementwise(sp.and_masks(sp.document(seg), sp.causal()), 2, 1, 96, 96, 16, 16))

"""The MoE losses against numpy transcriptions written here: BlockFFN's activation-locality and
chunk-sparsification losses (packed documents and padding), the Switch balance loss, the router
z-loss and ReMoE's L1; bad input raises ValueError naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.moe import losses


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_al(a0, seg, alpha):
    """Loop over (document, consecutive pair, expert): BCE(alpha a0[t-1] -> sigmoid(alpha a0[t]))."""
    b, t, e = a0.shape
    total, n = 0.0, 0
    for i in range(b):
        for j in range(1, t):
            if seg is not None and (seg[i, j] == 0 or seg[i, j] != seg[i, j - 1]):
                continue
            for k in range(e):
                z, y = alpha * a0[i, j - 1, k], np_sigmoid(alpha * a0[i, j, k])
                total += -(y * np.log(np_sigmoid(z)) + (1 - y) * np.log(1 - np_sigmoid(z)))
                n += 1
    return total / n


def np_cs(a1, chunk_len, valid):
    b, t, e = a1.shape
    vals = []
    for i in range(b):
        for c0 in range(0, t, chunk_len):
            rows = [j for j in range(c0, min(c0 + chunk_len, t)) if valid is None or valid[i, j]]
            if not rows:
                continue
            for k in range(e):
                keep = 1.0
                for j in rows:
                    p = a1[i, j, k] / (a1[i, j].sum() + 1e-5)
                    keep *= 1.0 - p + 1e-5
                vals.append(1.0 - keep)
    return np.mean(vals)


@pytest.fixture
def packed():
    rng = np.random.default_rng(0)
    a0 = rng.normal(size=(2, 11, 5)) * 0.03
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0], [4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5]])
    return a0, seg


def test_activation_locality_loss_skips_document_starts_and_padding(packed):
    a0, seg = packed
    got = losses.activation_locality_loss(jnp.asarray(a0), segment_ids_BxT=jnp.asarray(seg), alpha=100.0)
    np.testing.assert_allclose(float(got), np_al(a0, seg, 100.0), rtol=1e-5)
    plain = losses.activation_locality_loss(jnp.asarray(a0), alpha=100.0)
    np.testing.assert_allclose(float(plain), np_al(a0, None, 100.0), rtol=1e-5)
    assert abs(float(plain) - float(got)) > 1e-4  # the document starts were really left out


def test_activation_locality_loss_gradient_reaches_both_tokens():
    a0 = jnp.asarray([[[0.01], [-0.02]]])
    g = jax.grad(lambda a: losses.activation_locality_loss(a))(a0)
    assert float(g[0, 0, 0]) != 0.0 and float(g[0, 1, 0]) != 0.0


def test_chunk_sparsification_loss_with_padding_and_a_ragged_last_chunk(packed):
    rng = np.random.default_rng(1)
    a1 = np.maximum(rng.normal(size=(2, 11, 5)), 0.0)
    valid = packed[1] != 0
    for chunk_len in (1, 4, 64):
        got = losses.chunk_sparsification_loss(jnp.asarray(a1), chunk_len=chunk_len, valid_BxT=jnp.asarray(valid))
        np.testing.assert_allclose(float(got), np_cs(a1, chunk_len, valid), rtol=1e-5, err_msg=str(chunk_len))
    got = losses.chunk_sparsification_loss(jnp.asarray(a1), chunk_len=4)
    np.testing.assert_allclose(float(got), np_cs(a1, 4, None), rtol=1e-5)


def test_chunk_sparsification_loss_is_zero_for_idle_chunks_and_grows_with_spread():
    a1 = np.zeros((1, 8, 4))
    a1[:, :, 0] = 1.0  # one expert for every token: P_act ~ 1 for it, ~ 0 for the others
    concentrated = float(losses.chunk_sparsification_loss(jnp.asarray(a1), chunk_len=8))
    spread = np.zeros((1, 8, 4))
    spread[0, np.arange(8), np.arange(8) % 4] = 1.0  # every expert used within the chunk
    assert concentrated == pytest.approx(0.25, abs=1e-3)
    assert float(losses.chunk_sparsification_loss(jnp.asarray(spread), chunk_len=8)) == pytest.approx(1.0, abs=1e-3)
    # the official eps in ln(1 - p + 1e-5) makes an idle chunk's P_act -L * 1e-5, not exactly 0
    assert float(losses.chunk_sparsification_loss(jnp.zeros((1, 8, 4)), chunk_len=8)) == pytest.approx(0.0, abs=1e-4)


def test_balance_z_and_remoe_l1_against_numpy():
    rng = np.random.default_rng(2)
    n, e, k = 10, 6, 2
    logits = rng.normal(size=(n, e))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    chosen = np.argsort(-probs, -1)[:, :k]
    valid = np.ones(n, bool)
    valid[-2:] = False
    f = np.zeros(e)
    for i in np.nonzero(valid)[0]:
        for c in chosen[i]:
            f[c] += 1
    f /= f.sum()
    p = probs[valid].mean(0)
    got = losses.load_balancing_loss(jnp.asarray(probs), jnp.asarray(chosen), jnp.asarray(valid))
    np.testing.assert_allclose(float(got), e * np.sum(f * p), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(losses.router_z_loss(jnp.asarray(logits), jnp.asarray(valid))),
                               np.mean(lse[valid] ** 2), rtol=1e-5)
    gates = np.maximum(logits, 0)
    load = (gates[valid] > 0).sum(0) * e / (k * valid.sum())
    want = (gates[valid] * load).sum() / valid.sum()
    got = losses.remoe_l1_loss(jnp.asarray(gates), top_k=k, valid_N=jnp.asarray(valid))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(losses.remoe_l1_loss(jnp.asarray(gates), top_k=k, balance=False)),
                               gates.sum() / n, rtol=1e-5)


def test_balance_loss_is_one_when_balanced():
    e = 4
    probs = jnp.full((8, e), 1.0 / e)
    chosen = jnp.asarray(np.arange(8)[:, None] % e)
    assert float(losses.load_balancing_loss(probs, chosen)) == pytest.approx(1.0)


@pytest.mark.parametrize("call, match", [
    (lambda: losses.activation_locality_loss(jnp.zeros((2, 3))), "a0_BxTxE"),
    (lambda: losses.activation_locality_loss(jnp.zeros((2, 3, 4)), segment_ids_BxT=jnp.zeros((2, 4))),
     "segment_ids_BxT"),
    (lambda: losses.chunk_sparsification_loss(jnp.zeros((2, 3, 4)), chunk_len=0), "chunk_len"),
    (lambda: losses.chunk_sparsification_loss(jnp.zeros((3, 4)), chunk_len=2), "a1_BxTxE"),
    (lambda: losses.chunk_sparsification_loss(jnp.zeros((2, 3, 4)), valid_BxT=jnp.zeros((3, 2))), "valid_BxT"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""Recursion-wise KV caches allocated by capacity (``recursion.kv_slack``): the allocated bytes
follow the capacities (the paper's (N_r + 1) / (2 N_r) of the recursion blocks), decoding is
unchanged while nothing overflows, and a token that would join a full cache stops at the depth
before (tokens fill a cache in token order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxeff.ops.routing as routing_mod
from jaxeff import ModelConfig, RecursionConfig, RecursiveTransformer

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                  init_std=0.1)


def _model(slack: float, **kw) -> RecursiveTransformer:
    rc = RecursionConfig(strategy="middle_cycle", n_recursions=3, routing="expert", kv_slack=slack, **kw)
    return RecursiveTransformer(CFG, rc, rngs=nnx.Rngs(0))


def test_allocated_bytes_follow_the_capacities():
    full, slim = _model(0.0).init_cache(2, 60), _model(1.0).init_cache(2, 60)
    assert [slim.layer(s, 0).capacity for s in range(3)] == [60, 40, 20]
    ratio = slim.shared_nbytes() / full.shared_nbytes()
    assert ratio == pytest.approx((3 + 1) / (2 * 3), rel=1e-3)  # (N_r + 1) / (2 N_r), plus per-head counts
    share = RecursiveTransformer(CFG, RecursionConfig(strategy="middle_cycle", n_recursions=3, routing="expert",
                                                      kv_strategy="share"), rngs=nnx.Rngs(0)).init_cache(2, 60)
    assert share.shared_nbytes() / full.shared_nbytes() == pytest.approx(1 / 3, rel=1e-3)  # sharing: 1 / N_r
    with pytest.raises(ValueError, match="kv_slack"):
        RecursionConfig(strategy="cycle", n_recursions=2, routing="expert", kv_slack=0.5)


def _prefill(model, tokens, capacity):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).extend(t, c)[:2])
    return fn, state, fn(state, tokens, model.init_cache(tokens.shape[0], capacity))


def test_without_overflow_decoding_is_unchanged():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 10)), jnp.int32)
    _, _, (full_logits, _) = _prefill(_model(0.0), tokens, 12)
    _, _, (slim_logits, slim) = _prefill(_model(4.0), tokens, 12)  # 4x slack: room for every token
    np.testing.assert_allclose(np.asarray(slim_logits), np.asarray(full_logits), rtol=1e-6, atol=1e-6)
    assert [slim.layer(s, 0).capacity for s in range(3)] == [12, 12, 12]


def test_overflow_stops_tokens_at_the_depth_before(monkeypatch):
    """Every router says 'go on' (patched): with 15 slots, step 2's cache (10 slots) takes the
    first 10 tokens and step 3's (5 slots) the first 5; the rest stop earlier, and a later token
    finds the deep caches full and is stored at step 1 only."""
    monkeypatch.setattr(routing_mod, "threshold_decision", lambda logits, func: jnp.ones(logits.shape, bool))
    model = _model(1.0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 13)), jnp.int32)
    fn, state, (logits, cache) = _prefill(model, tokens[:, :12], 15)
    held = lambda c, s: np.asarray(c.layer(s, 0).positions[:, 0])
    assert [cache.layer(s, 0).capacity for s in range(3)] == [15, 10, 5]
    np.testing.assert_array_equal(held(cache, 0)[:, :12], np.broadcast_to(np.arange(12), (2, 12)))
    np.testing.assert_array_equal(held(cache, 1), np.broadcast_to(np.arange(10), (2, 10)))
    np.testing.assert_array_equal(held(cache, 2), np.broadcast_to(np.arange(5), (2, 5)))
    assert np.isfinite(np.asarray(logits)).all()
    logits, cache = fn(state, tokens[:, 12:], cache)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(held(cache, 0)[:, 12], [12, 12])
    np.testing.assert_array_equal(np.asarray(cache.layer(1, 0).counts[:, 0]), [10, 10])
    np.testing.assert_array_equal(np.asarray(cache.layer(2, 0).counts[:, 0]), [5, 5])


def test_overflow_equals_routing_that_stopped_those_tokens(monkeypatch):
    """The slim cache with every token deciding to go on computes what a full cache computes when
    step 2 selects only the first 10 tokens and step 3 the first 5: overflowing tokens really
    stop (their hidden states are not updated by the deeper steps)."""
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, (2, 12)), jnp.int32)
    monkeypatch.setattr(routing_mod, "threshold_decision", lambda logits, func: jnp.ones(logits.shape, bool))
    _, _, (slim_logits, _) = _prefill(_model(1.0), tokens, 15)
    calls = []

    def first_tokens(logits, func):  # step 2 (first call of a trace), then step 3
        limit = (10, 5)[len(calls) % 2]
        calls.append(limit)
        return jnp.broadcast_to(jnp.arange(logits.shape[1]) < limit, logits.shape)

    monkeypatch.setattr(routing_mod, "threshold_decision", first_tokens)
    _, _, (full_logits, _) = _prefill(_model(0.0), tokens, 15)
    assert calls == [10, 5]
    np.testing.assert_allclose(np.asarray(slim_logits), np.asarray(full_logits), rtol=1e-5, atol=1e-5)

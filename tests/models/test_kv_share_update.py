"""Recursive KV sharing with updates (``recursion.kv_share_update``): tokens selected at a later
recursion step overwrite their entries of the shared (first-step) keys and values."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.config import RecursionConfig
from tests.models.test_recursive import SEG, _both_paths, _model, _tokens


def _update_model(update: bool, routing: str = "expert", seed: int = 0):
    model = _model(5, seed=seed, strategy="middle_cycle", n_recursions=3, routing=routing, router_alpha=0.5,
                   kv_strategy="share", kv_share_update=update)
    if model.router is not None:
        model.router.w[...] = model.router.w[...] * 60.0  # decisions far from the threshold
    return model


@pytest.mark.parametrize("seg", [False, True])
def test_compact_topk_equals_masked_topk_with_updates(seg):
    model = _update_model(True)
    tokens = jnp.asarray(_tokens(3, 2, 20))
    segment_ids = jnp.asarray(SEG) if seg else None
    (compact, _), (masked, _) = _both_paths(model, tokens, segment_ids, None)
    valid = np.ones((2, 20), bool) if not seg else np.asarray(SEG) != 0
    np.testing.assert_allclose(np.asarray(compact)[valid], np.asarray(masked)[valid], rtol=1e-4, atol=1e-4)


def test_updates_change_the_function():
    tokens = jnp.asarray(_tokens(4, 2, 16))
    with_update = _update_model(True)
    without = _update_model(False)
    a = np.asarray(with_update(tokens)[0])
    b = np.asarray(without(tokens)[0])
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("routing", ["expert", "token", "none"])
def test_prefill_of_a_whole_sequence_equals_the_threshold_forward(routing):
    """One extend over all tokens computes each step in parallel, like the forward pass.
    (Token-by-token decoding differs by design: an earlier token's shared entry then holds the
    keys of its deepest step, which the parallel forward cannot see at an earlier step.)"""
    model = _update_model(True, routing=routing)
    tokens = jnp.asarray(_tokens(5, 2, 14))
    graphdef, state = nnx.split(model)
    full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, mode="threshold")[0])(state, tokens)
    pre = jax.jit(lambda s, t: nnx.merge(graphdef, s).extend(t, nnx.merge(graphdef, s).init_cache(2, 14))[0])(
        state, tokens)
    np.testing.assert_allclose(np.asarray(pre), np.asarray(full), rtol=1e-4, atol=1e-4)


def test_config_rejects_update_without_sharing():
    with pytest.raises(ValueError, match="kv_share_update"):
        RecursionConfig(strategy="cycle", n_recursions=2, kv_share_update=True)

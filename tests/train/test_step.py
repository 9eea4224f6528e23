"""The functional train step: its loss, gradient accumulation, and the non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import ModelConfig, Transformer
from jaxeff.config import TrainConfig
from jaxeff.ops import cross_entropy, next_token_mask
from jaxeff.train import init_state, make_eval_step, make_optimizer, make_train_step

VOCAB = 48


def _setup(**train_kw):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    tc = TrainConfig(**{**dict(steps=10, warmup_steps=0, lr=1e-2, schedule="constant", batch_size=4), **train_kw})
    tx = make_optimizer(tc, params)
    return graphdef, params, tx


def _batch(seed):
    """4 rows of 17 tokens; the first two rows are mostly padding, so the two micro-batches of
    grad_accum=2 hold very different numbers of target tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(4, 17)).astype(np.int32)
    seg = np.array([[1] * 5 + [0] * 12,
                    [1] * 3 + [2] * 4 + [0] * 10,
                    [1] * 9 + [2] * 8,
                    [1] * 17], np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg)}


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def test_step_loss_is_the_masked_next_token_loss():
    graphdef, params, tx = _setup()
    batch = _batch(0)
    step = jax.jit(make_train_step(graphdef, tx))
    _, m = step(init_state(params, tx), batch)
    tokens, seg = batch["tokens"], batch["segment_ids"]

    @jax.jit
    def manual(params):
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], segment_ids=seg[:, :-1])
        return cross_entropy(logits, tokens[:, 1:], next_token_mask(seg))

    expected, count = manual(params)
    assert float(m["loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(m["tokens"]) == float(count) == 4 + 5 + 15 + 16
    assert float(m["objective"]) == pytest.approx(float(expected), rel=1e-6)
    ev = jax.jit(make_eval_step(graphdef))(params, batch)
    assert float(ev["nll_sum"]) == pytest.approx(float(expected) * float(count), rel=1e-6)
    # mask_documents=False lets attention cross document boundaries: a different loss.
    _, m_open = jax.jit(make_train_step(graphdef, tx, mask_documents=False))(init_state(params, tx), batch)
    assert abs(float(m_open["loss"]) - float(m["loss"])) > 1e-6


@pytest.mark.slow
def test_grad_accumulation_matches_single_batch():
    graphdef, params, tx = _setup()
    step1 = jax.jit(make_train_step(graphdef, tx, grad_accum=1))
    step2 = jax.jit(make_train_step(graphdef, tx, grad_accum=2))
    step4 = jax.jit(make_train_step(graphdef, tx, grad_accum=4))
    s1 = s2 = s4 = init_state(params, tx)
    for i in range(3):
        batch = _batch(i)
        s1, m1 = step1(s1, batch)
        s2, m2 = step2(s2, batch)
        s4, m4 = step4(s4, batch)
        for m in (m2, m4):
            assert float(m["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
            assert float(m["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
            assert float(m["tokens"]) == float(m1["tokens"])
    for a, b, c in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), jax.tree.leaves(s4["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-5)
    assert int(s2["step"]) == 3 and int(s2["nonfinite_step"]) == -1
    # The accumulated step really trained: the parameters moved.
    moved = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(params), jax.tree.leaves(s2["params"]))]
    assert all(moved)


def _poisoned(batch):
    """An out-of-vocabulary token: the embedding lookup fills it with NaN, so the loss is NaN."""
    tokens = np.array(batch["tokens"])
    tokens[2, 3] = VOCAB + 1000
    return {**batch, "tokens": jnp.asarray(tokens)}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_nonfinite_step_is_skipped_and_recorded(grad_accum):
    graphdef, params, tx = _setup()
    step = jax.jit(make_train_step(graphdef, tx, grad_accum=grad_accum))
    state = init_state(params, tx)
    state, _ = step(state, _batch(0))
    state, _ = step(state, _batch(1))
    before = _copy({"params": state["params"], "opt_state": state["opt_state"]})
    state, m = step(state, _poisoned(_batch(2)))
    assert not np.isfinite(float(m["loss"]))
    assert int(state["nonfinite_step"]) == 2 and int(state["step"]) == 3
    after = _copy({"params": state["params"], "opt_state": state["opt_state"]})
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    # Training goes on with finite batches, and the first bad step stays recorded.
    state, m = step(state, _batch(3))
    assert np.isfinite(float(m["loss"])) and int(state["nonfinite_step"]) == 2
    assert not np.array_equal(np.asarray(jax.tree.leaves(state["params"])[0]), jax.tree.leaves(before["params"])[0])
    state, _ = step(state, _poisoned(_batch(4)))
    assert int(state["nonfinite_step"]) == 2


def test_nan_parameter_leaves_state_unchanged():
    graphdef, params, tx = _setup()
    params = jax.tree.map(lambda x: x, params)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
    state = init_state(params, tx)
    before = _copy(state)
    state, m = jax.jit(make_train_step(graphdef, tx))(state, _batch(0))
    assert int(state["nonfinite_step"]) == 0
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))  # NaN compares equal to NaN here

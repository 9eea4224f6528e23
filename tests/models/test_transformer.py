"""The dense Transformer: shapes, parameter count, KV-cache decoding against the full forward
pass, document isolation through segment ids, bf16, remat, and sampling with ``generate``."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import Transformer, generate
from jaxeff.ops import cross_entropy

TOL = dict(rtol=1e-5, atol=1e-5)


@partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids)[0]


@partial(jax.jit, static_argnums=0)
def _jit_extend(graphdef, state, tokens, cache, valid_lengths):
    logits, cache, _ = nnx.merge(graphdef, state).extend(tokens, cache, valid_lengths=valid_lengths)
    return logits, cache


def _forward(model, tokens, positions=None, segment_ids=None):
    """Logits of the full forward pass, as numpy (jitted: eager dispatch is slow on CPU)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_forward(graphdef, state, jnp.asarray(tokens), positions, segment_ids))


def _extend(model, tokens, cache, valid_lengths=None):
    graphdef, state = nnx.split(model)
    return _jit_extend(graphdef, state, jnp.asarray(tokens), cache, valid_lengths)


def _n_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --- shapes and parameters ------------------------------------------------------------------------

def test_output_shapes_and_dtypes(tiny_model_cfg):
    model = Transformer(tiny_model_cfg(), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((3, 10), jnp.int32)
    logits, aux = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (3, 10, 64) and logits.dtype == jnp.float32
    assert aux == {}
    assert np.all(np.isfinite(np.asarray(logits)))

    bf16 = Transformer(tiny_model_cfg(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    logits16, _ = nnx.jit(lambda m, t: m(t))(bf16, tokens)
    assert logits16.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("overrides", [
    dict(tie_embeddings=True),
    dict(tie_embeddings=False),
    dict(tie_embeddings=False, n_kv_heads=1, head_dim=6, d_ff=40, n_layers=3),
    dict(n_heads=8, n_kv_heads=8, vocab_size=100),
])
def test_param_count_matches_config(tiny_model_cfg, overrides):
    cfg = tiny_model_cfg(**overrides)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    hd = cfg.resolved_head_dim
    per_layer = cfg.d_model * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.d_model * cfg.d_ff + 2 * cfg.d_model
    head = 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size
    assert _n_params(model) == cfg.vocab_size * cfg.d_model + cfg.n_layers * per_layer + cfg.d_model + head
    assert (model.lm_head is None) == cfg.tie_embeddings


def test_same_seed_same_params_different_seed_different(tiny_model_cfg):
    cfg = tiny_model_cfg()
    a, b, c = (nnx.state(Transformer(cfg, rngs=nnx.Rngs(s)), nnx.Param) for s in (0, 0, 1))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    wq_a, wq_c = a["blocks"][0]["attn"]["wq"][...], c["blocks"][0]["attn"]["wq"][...]
    assert not np.allclose(np.asarray(wq_a), np.asarray(wq_c))


# --- KV-cache decoding equals the full forward pass ----------------------------------------------

DECODE_CASES = {
    "mha-half": dict(n_kv_heads=4, rope_style="half"),
    "gqa-half": dict(n_kv_heads=2, rope_style="half"),
    "mqa-interleaved": dict(n_kv_heads=1, rope_style="interleaved"),
    "gqa-interleaved-untied": dict(n_kv_heads=2, rope_style="interleaved", tie_embeddings=False),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_prefill_then_decode_equals_forward(tiny_model_cfg, case):
    cfg = tiny_model_cfg(**DECODE_CASES[case], init_std=0.1)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12)).astype(np.int32)
    full = _forward(model, tokens)

    cache = model.init_cache(2, 16)
    logits, cache = _extend(model, jnp.asarray(tokens[:, :5]), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :5], **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 5])
    for t in range(5, 9):  # one token at a time
        logits, cache = _extend(model, jnp.asarray(tokens[:, t:t + 1]), cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], **TOL)
    logits, cache = _extend(model, jnp.asarray(tokens[:, 9:12]), cache)  # a chunk at an offset
    np.testing.assert_allclose(np.asarray(logits), full[:, 9:12], **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [12, 12])
    assert cache.capacity == 16 and cache.batch == 2 and len(cache.layers) == cfg.n_layers
    # no eviction: every head holds every token, slot i at position i
    for layer in cache.layers:
        np.testing.assert_array_equal(np.asarray(layer.counts), 12)
        np.testing.assert_array_equal(np.asarray(layer.positions[..., :12]), np.broadcast_to(np.arange(12), (2, cfg.n_kv_heads, 12)))
        assert (np.asarray(layer.positions[..., 12:]) == -1).all()


def test_ragged_prompts_with_valid_lengths(tiny_model_cfg):
    """Rows of different lengths in one batch decode exactly like each row on its own."""
    cfg = tiny_model_cfg(init_std=0.1)
    model = Transformer(cfg, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(1)
    lengths = [3, 7, 5]
    prompts = [rng.integers(1, cfg.vocab_size, size=n).tolist() for n in lengths]
    conts = rng.integers(1, cfg.vocab_size, size=(3, 4)).astype(np.int32)
    padded = np.zeros((3, 7), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    cache = model.init_cache(3, 12)
    pre, cache = _extend(model, jnp.asarray(padded), cache, valid_lengths=jnp.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    steps = []
    for i in range(4):
        logits, cache = _extend(model, jnp.asarray(conts[:, i:i + 1]), cache)
        steps.append(np.asarray(logits[:, 0]))
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths) + 4)
    for b, p in enumerate(prompts):
        alone = _forward(model, np.asarray([p + conts[b].tolist()], np.int32))[0]
        np.testing.assert_allclose(np.asarray(pre[b, :len(p)]), alone[:len(p)], **TOL)
        for i in range(4):
            np.testing.assert_allclose(steps[i][b], alone[len(p) + i], **TOL)


def test_cache_dtype_follows_compute_dtype(tiny_model_cfg):
    model = Transformer(tiny_model_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0))
    cache = model.init_cache(2, 8)
    layer = cache.layers[0]
    assert layer.k.dtype == jnp.bfloat16 and layer.k.shape == (2, 2, 8, 8)  # [B, K, C, D]
    assert layer.positions.shape == (2, 2, 8) and layer.counts.shape == (2, 2)
    assert model.init_cache(2, 8, dtype=jnp.float32).layers[0].v.dtype == jnp.float32


# --- positions and segment ids -------------------------------------------------------------------

def test_segment_ids_isolate_documents(tiny_model_cfg):
    cfg = tiny_model_cfg(init_std=0.1)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(2)
    doc1, doc2, doc3 = (rng.integers(0, cfg.vocab_size, size=n).astype(np.int32) for n in (5, 7, 4))
    packed = np.concatenate([doc1, doc2, doc3])[None]
    seg = np.asarray([[1] * 5 + [2] * 7 + [3] * 4], np.int32)
    pos = np.asarray([list(range(5)) + list(range(7)) + list(range(4))], np.int32)
    out = _forward(model, packed, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))[0]
    np.testing.assert_allclose(out[:5], _forward(model, doc1[None])[0], **TOL)
    np.testing.assert_allclose(out[5:12], _forward(model, doc2[None])[0], **TOL)
    np.testing.assert_allclose(out[12:], _forward(model, doc3[None])[0], **TOL)
    # Without the segment ids document 2 sees document 1: the isolation above is the mask's doing.
    leaky = _forward(model, packed, positions=jnp.asarray(pos))[0]
    assert not np.allclose(leaky[5:12], out[5:12], atol=1e-4)


def test_shifting_all_positions_leaves_logits_unchanged(tiny_model_cfg):
    """RoPE is the only position signal, so only position differences matter."""
    model = Transformer(tiny_model_cfg(init_std=0.1), rngs=nnx.Rngs(4))
    tokens = np.random.default_rng(3).integers(0, 64, size=(2, 9)).astype(np.int32)
    base = _forward(model, tokens)
    shifted = _forward(model, tokens, positions=jnp.broadcast_to(jnp.arange(9) + 37, (2, 9)))
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
    scrambled = _forward(model, tokens, positions=jnp.broadcast_to(jnp.arange(9)[::-1] * 3, (2, 9)))
    assert not np.allclose(scrambled, base, atol=1e-3)


# --- dtypes and remat ------------------------------------------------------------------------------

def test_bf16_compute_is_close_to_f32(tiny_model_cfg):
    tokens = np.random.default_rng(4).integers(0, 64, size=(2, 16)).astype(np.int32)
    f32 = _forward(Transformer(tiny_model_cfg(init_std=0.1), rngs=nnx.Rngs(5)), tokens)
    model16 = Transformer(tiny_model_cfg(init_std=0.1, dtype="bfloat16"), rngs=nnx.Rngs(5))
    graphdef, state = nnx.split(model16)
    out16 = _jit_forward(graphdef, state, jnp.asarray(tokens), None, None)
    assert out16.dtype == jnp.bfloat16
    bf16 = np.asarray(out16.astype(jnp.float32))
    assert np.all(np.isfinite(bf16))
    err = np.abs(bf16 - f32).max()
    assert 0 < err <= 0.03 * np.abs(f32).max(), err  # really bf16, and close
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_remat_gives_same_gradients(tiny_model_cfg):
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, 64, size=(2, 12)), jnp.int32)
    seg = jnp.asarray([[1] * 6 + [2] * 6, [1] * 12], jnp.int32)

    def grads_for(remat):
        graphdef, params = nnx.split(Transformer(tiny_model_cfg(remat=remat, init_std=0.1), rngs=nnx.Rngs(6)))

        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(tokens[:, :-1], segment_ids=seg[:, :-1])
            return cross_entropy(logits, tokens[:, 1:])[0]

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        return jax.jit(jax.value_and_grad(loss))(params), jaxpr

    (l0, g0), jaxpr0 = grads_for(False)
    (l1, g1), jaxpr1 = grads_for(True)
    assert "remat" in jaxpr1 or "checkpoint" in jaxpr1
    assert "remat" not in jaxpr0 and "checkpoint" not in jaxpr0
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(leaves0) == len(leaves1) > 0
    for a, b in zip(leaves0, leaves1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


# --- generate ------------------------------------------------------------------------------------

@pytest.fixture
def gen_model(tiny_model_cfg):
    # A larger init spreads the logits so greedy choices are far from ties.
    return Transformer(tiny_model_cfg(init_std=0.3), rngs=nnx.Rngs(7))


def test_greedy_is_deterministic_and_matches_argmax_of_forward(gen_model):
    prompt = [5, 17, 3]
    n = 8
    out = generate(gen_model, prompt, n, temperature=0.0)
    assert out == generate(gen_model, prompt, n, temperature=0.0, seed=123)
    assert out[:3] == prompt and len(out) == 3 + n
    graphdef, state = nnx.split(gen_model)
    fwd = jax.jit(lambda s, toks: nnx.merge(graphdef, s)(toks)[0])
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, 3 + n), np.int32)
        padded[0, :len(seq)] = seq
        logits = np.asarray(fwd(state, jnp.asarray(padded)))[0, len(seq) - 1]
        seq.append(int(logits.argmax()))
    assert out == seq
    assert top_gap_ok(fwd, state, seq, 3)


def top_gap_ok(fwd, state, seq, prompt_len) -> bool:
    """The greedy choices are not near-ties (so the comparison above is not luck)."""
    padded = jnp.asarray([seq], jnp.int32)
    logits = np.sort(np.asarray(fwd(state, padded))[0, prompt_len - 1:-1], axis=-1)
    return bool(np.all(logits[:, -1] - logits[:, -2] > 1e-4))


def test_top_k_1_equals_greedy(gen_model):
    greedy = generate(gen_model, [1, 2, 3], 10, temperature=0.0)
    for seed in (0, 1):
        assert generate(gen_model, [1, 2, 3], 10, temperature=1.5, top_k=1, seed=seed) == greedy


def test_sampling_seeds(gen_model):
    a = generate(gen_model, [4, 4], 16, temperature=1.0, seed=0)
    assert a == generate(gen_model, [4, 4], 16, temperature=1.0, seed=0)
    b = generate(gen_model, [4, 4], 16, temperature=1.0, seed=1)
    assert a != b
    assert all(0 <= t < 64 for t in a + b)


def test_sampling_respects_top_k(gen_model):
    """With top_k=3 every sampled token is among the 3 largest logits at its step."""
    prompt = [9, 8, 7]
    out = generate(gen_model, prompt, 10, temperature=5.0, top_k=3, seed=2)
    logits = _forward(gen_model, np.asarray([out[:-1]], np.int32))[0]
    for i in range(len(prompt), len(out)):
        top3 = np.argsort(logits[i - 1])[-3:]
        assert out[i] in top3


def test_batched_ragged_generate_equals_one_by_one(gen_model):
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 6, 9]]
    batched = generate(gen_model, prompts, 6, temperature=0.0)
    singles = [generate(gen_model, p, 6, temperature=0.0) for p in prompts]
    assert batched == singles
    assert len({tuple(s[-6:]) for s in singles}) == 3  # the rows really differ
    arr = generate(gen_model, np.asarray([prompts[0], [3, 1, 4, 1, 5]], np.int32), 6, temperature=0.0)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 11)
    assert arr[0].tolist() == singles[0]


def test_eos_cuts_continuation(gen_model):
    full = generate(gen_model, [3, 1], 8, temperature=0.0)
    cont = full[2:]
    eos = cont[3]
    cut = generate(gen_model, [3, 1], 8, temperature=0.0, eos_id=eos)
    assert cut == [3, 1] + cont[:cont.index(eos) + 1]
    assert len(cut) < len(full)


@pytest.mark.parametrize("prompt, kwargs, match", [
    ([], {}, "at least one token"),
    ([[1, 2], []], {}, "at least one token"),
    ([1] * 60, dict(max_new_tokens=10), r"prompt length 60 \+ max_new_tokens 10 exceeds .*max_seq_len 64"),
    ([1, 64], {}, r"prompt token 64 is outside the vocabulary \[0, 64\)"),
    ([[1], [-3]], {}, "prompt token -3 is outside"),
    ([1], dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    ([1], dict(temperature=-0.5), "temperature must be >= 0"),
    ([1], dict(top_k=0), "top_k must be >= 1"),
    (np.array([1, 2, 3]), {}, r"must be \[batch, length\]"),
])
def test_generate_errors(gen_model, prompt, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(gen_model, prompt, **kwargs)

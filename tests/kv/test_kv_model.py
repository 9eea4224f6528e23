"""KV compression on a real (small, random) Transformer: no eviction changes nothing (prefill and
decoding, every policy), RoPE positions after eviction against an independent masked forward
pass, keys stored before RoPE (with and without StreamingLLM's position shift), per-head counts,
GQA statistics, generate's timing and capacity, no retracing, and the argument checks."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import ModelConfig, Transformer, generate
from jaxeff.kv import Budget, KVCompression, compress_once, policy, policy_names, pre_rope_cache
from jaxeff.kv.rope_cache import RopeLayerKV, rotate
from jaxeff.nn import cache_attend
from jaxeff.ops import masked_attention_reference

CFG = ModelConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=96,
                  init_std=0.2)
P, N = 20, 4  # prompt, decode steps
OPTS = {"snapkv": {"window": 4}, "pyramidkv": {"window": 4}, "lazy_eviction": {"window": 4},
        "quest": {"page": 4, "skip_layers": 1}, "kivi": {"group": 8, "residual": 8}, "bfp_ksort": {"block": 8}}
EVICTING = [n for n in policy_names() if policy(n).uses_budget]


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def _tokens(seed, b=2, t=P):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)).astype(np.int32)


def _decode_logits(model, prompt, steps, transform=None, every=None, capacity=None):
    """Prefill (+ compression), then ``steps`` teacher-forced decode steps (compressing every
    ``every``); the logits of the prompt's last token and of each step, and the final cache."""
    graphdef, state = nnx.split(model)
    b, p = prompt.shape
    cap = capacity or p + steps + 1
    feed = _tokens(99, b, steps)

    @jax.jit
    def run(state, prompt, feed):
        m = nnx.merge(graphdef, state)
        lengths = jnp.full((b,), p, jnp.int32)
        if transform is None:
            logits, cache, _ = m.extend(prompt, m.init_cache(b, cap))
            tstate = ()
        else:
            logits, cache, tstate = compress_once(m, prompt, lengths, transform, cap)
        kw = {}
        if transform is not None:
            kw = {"stats_rows": min(transform.stats_rows, 1), "stats_sums": transform.stats_sums}

        def step(carry, xs):
            cache, tstate = carry
            tok, i = xs
            logits, cache, stats = m.extend(tok[:, None], cache, **kw)
            if transform is not None:
                tstate = transform.observe(cache, tstate, stats)
                if every:
                    cache, tstate = jax.lax.cond((i + 1) % every == 0, lambda c, s: transform(c, s, stats),
                                                 lambda c, s: (c, s), cache, tstate)
            return (cache, tstate), logits[:, 0]

        (cache, _), steps_logits = jax.lax.scan(step, (cache, tstate), (feed.T, jnp.arange(steps)))
        return jnp.concatenate([logits[:, -1:], jnp.swapaxes(steps_logits, 0, 1)], 1), cache

    logits, cache = run(state, jnp.asarray(prompt), jnp.asarray(feed))
    return np.asarray(logits), cache


def test_cache_path_equals_the_full_forward_pass(model):
    tokens = _tokens(0, t=P + N)
    full = np.asarray(jax.jit(lambda s, t: nnx.merge(*nnx.split(model)[:1], s)(t)[0])(nnx.split(model)[1], tokens))
    logits, _ = _decode_logits(model, tokens[:, :P], 0)
    np.testing.assert_allclose(logits[:, 0], full[:, P - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EVICTING)
def test_budget_at_least_the_length_changes_nothing_at_prefill_and_decoding(model, name):
    prompt = _tokens(1)
    plain, _ = _decode_logits(model, prompt, N)
    budget = 1.0 if EVICTING.index(name) % 2 else P + N  # a ratio or a token count
    t = KVCompression(policy(name, **OPTS.get(name, {})), budget, 1)
    got, cache = _decode_logits(model, prompt, N, t, every=1)
    np.testing.assert_array_equal(got, plain)
    assert int(cache.layers[-1].counts.min()) == P + N


def test_generate_with_a_full_budget_gives_the_plain_tokens(model):
    prompts = [list(range(1, 25)), list(range(3, 17))]
    plain = generate(model, prompts, 5, temperature=0)
    for name in ("snapkv", "h2o", "streaming_llm"):
        assert generate(model, prompts, 5, temperature=0, kv_policy=name, kv_budget=1.0, compress_every=1,
                        kv_options=OPTS.get(name)) == plain


def _masked_forward(model, tokens, kept):
    """An independent reference: the whole sequence through the blocks, the last token's
    attention restricted per layer and key/value head to ``kept[l][b][h]`` (positions), every
    other token causal; keys rotated at their absolute positions."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = model.embed(jnp.asarray(tokens))
    for l, block in enumerate(model.blocks):
        mask = np.tril(np.ones((t, t), bool))[None, None].repeat(b, 0).repeat(CFG.n_kv_heads, 1)
        for i in range(b):
            for h in range(CFG.n_kv_heads):
                row = np.zeros(t, bool)
                row[kept[l][i][h]] = True
                row[t - 1] = True
                mask[i, h, t - 1] = row
        x, _, _ = block(x, pos, lambda q, k, v, m=jnp.asarray(mask): (masked_attention_reference(q, k, v, m), None))
    return np.asarray(model.logits(x))[:, -1]


@pytest.mark.parametrize("name", ["streaming_llm", "snapkv", "knorm", "h2o"])
def test_rope_positions_after_eviction_match_a_masked_forward_pass(model, name):
    prompt = _tokens(2)
    t = KVCompression(policy(name, **OPTS.get(name, {})), 9, None)
    logits, cache = _decode_logits(model, prompt, 1, t)
    kept = [[[[int(p) for p in np.asarray(layer.positions[i, h]) if 0 <= p < P] for h in range(CFG.n_kv_heads)]
              for i in range(2)] for layer in cache.layers]
    assert all(len(kept[l][i][h]) == 9 for l in range(3) for i in range(2) for h in range(2))
    full_tokens = np.concatenate([prompt, _tokens(99, 2, 1)], 1)
    np.testing.assert_allclose(logits[:, 1], _masked_forward(model, full_tokens, kept), rtol=2e-5, atol=2e-5)


def test_keys_stored_before_rope_read_at_their_positions_match_the_post_rope_cache(model):
    prompt = _tokens(3)
    plain, _ = _decode_logits(model, prompt, N)

    @dataclasses.dataclass(frozen=True)
    class PreRope(type(policy("knorm"))):
        def prepare(self, cache, m):
            return pre_rope_cache(cache, rope_base=CFG.rope_base, rope_style=CFG.rope_style, shift=False)

    got, cache = _decode_logits(model, prompt, N, KVCompression(PreRope(), 1.0, 1), every=1)
    assert isinstance(cache.layers[0], RopeLayerKV)
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4)
    # with eviction too: the same kept tokens as the post-RoPE cache, the same logits
    a, _ = _decode_logits(model, prompt, N, KVCompression(PreRope(), 8, 2), every=2)
    b, _ = _decode_logits(model, prompt, N, KVCompression(policy("knorm"), 8, 2), every=2)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_position_shift_without_eviction_is_the_plain_model(model):
    """Before anything is evicted slot = position, so StreamingLLM's shift changes nothing."""
    prompt = _tokens(4)
    plain, _ = _decode_logits(model, prompt, N)
    got, _ = _decode_logits(model, prompt, N, KVCompression(policy("streaming_llm", position_shift=True), 1.0, 1),
                            every=1)
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4)


def test_position_shift_reads_keys_at_their_slot_and_the_query_at_its_own():
    """cache_attend over a pre-RoPE layer with gaps: numpy re-rotates key c to position c and the
    new query to its slot (StreamingLLM section 3.2)."""
    rng = np.random.default_rng(5)
    b, kh, g, d, c = 1, 2, 2, 8, 10
    raw = rng.normal(size=(b, kh, c, d)).astype(np.float32)
    pos = np.full((b, kh, c), -1, np.int32)
    pos[0, :, :6] = [0, 1, 2, 3, 11, 12]  # sinks 0-3 and a recent window, positions 4-10 evicted
    raw[pos < 0] = 0
    layer = RopeLayerKV(k=jnp.asarray(raw), v=jnp.asarray(rng.normal(size=(b, kh, c, d)).astype(np.float32)),
                        positions=jnp.asarray(pos), counts=jnp.asarray([[6, 6]]), rope_base=100.0, shift=True)
    p = 13
    q_raw = rng.normal(size=(b, 1, kh * g, d)).astype(np.float32)
    k_new = rng.normal(size=(b, 1, kh, d)).astype(np.float32)
    v_new = rng.normal(size=(b, 1, kh, d)).astype(np.float32)
    posj = jnp.asarray([[p]])
    q = rotate(jnp.asarray(q_raw), posj[:, :, None], 100.0, "half")  # the model hands over rotated q, k
    k = rotate(jnp.asarray(k_new), posj[:, :, None], 100.0, "half")
    o, (new, _) = cache_attend(layer, posj, "xla")(q, k, jnp.asarray(v_new))
    keys = np.concatenate([raw[0, :, :6], k_new[0, 0][:, None]], 1)  # [K, 7, D]
    vals = np.concatenate([np.asarray(layer.v)[0, :, :6], v_new[0, 0][:, None]], 1)
    keys_rot = np.asarray(rotate(jnp.asarray(keys), jnp.arange(7)[None, :], 100.0, "half"))
    q_rot = np.asarray(rotate(jnp.asarray(q_raw), jnp.asarray([[6]])[:, :, None], 100.0, "half"))[0, 0]
    for h in range(kh * g):
        s = keys_rot[h // g] @ q_rot[h] / math.sqrt(d)
        w = np.exp(s - s.max())
        np.testing.assert_allclose(np.asarray(o)[0, 0, h], (w / w.sum()) @ vals[h // g], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new.k)[0, :, 6], k_new[0, 0], rtol=1e-5, atol=1e-5)  # stored un-rotated


def test_headwise_budgets_give_per_head_counts_and_decode(model):
    prompt = _tokens(6)
    t = KVCompression(policy("snapkv", window=4), Budget(10, headwise=True), 2)
    logits, cache = _decode_logits(model, prompt, 4, t, every=2)
    counts = np.asarray(cache.layers[1].counts)
    assert counts.sum(-1).tolist() == [2 * 10] * 2  # the layer's total, split unevenly
    assert np.isfinite(logits).all()
    assert len({tuple(np.asarray(l.counts).ravel()) for l in cache.layers}) >= 1


def test_statistics_cover_each_rows_last_valid_queries(model):
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(_tokens(7))
    lengths = jnp.asarray([P, 11])
    _, _, stats = jax.jit(lambda s: nnx.merge(graphdef, s).extend(prompt, model.init_cache(2, P + 2),
                                                                   valid_lengths=lengths, stats_rows=3,
                                                                   stats_sums=True))(state)
    np.testing.assert_array_equal(np.asarray(stats["q_positions"][0]), [[17, 18, 19], [8, 9, 10]])
    probs = np.asarray(stats["probs"][0])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert (probs[1, :, :, 11:] == 0).all() and (probs[1, :, 0, 9:] == 0).all()
    sums = np.asarray(stats["sums"][0])
    np.testing.assert_allclose(sums.sum(-1), [[P] * 4, [11] * 4], rtol=1e-5)  # one unit per valid query
    # GQA: group statistics are the mean of the group's query heads, per key/value head
    from jaxeff.kv import group_mean
    np.testing.assert_allclose(np.asarray(group_mean(stats["probs"][0], 2)), probs.reshape(2, 2, 2, 3, -1).mean(2),
                               rtol=1e-6)


def test_generate_compresses_during_decoding_as_a_manual_loop(model):
    prompt, n, every = list(range(2, 22)), 9, 3
    t = KVCompression(policy("h2o", recent=2), 8, every)
    out = generate(model, prompt, n, temperature=0, kv_policy=policy("h2o", recent=2), kv_budget=8,
                   compress_every=every)
    assert t.capacity(len(prompt), n) == len(prompt)  # max(prompt, budget + every)
    assert KVCompression(policy("h2o"), Budget(8), every).capacity(10, 30, 2) == 11  # budget + every
    assert KVCompression(policy("h2o"), Budget(8, headwise=True), every).capacity(10, 30, 2) == 19  # one head: all
    graphdef, state = nnx.split(model)

    @jax.jit
    def by_hand(state):
        m = nnx.merge(graphdef, state)
        logits, cache, ts = compress_once(m, jnp.asarray([prompt]), jnp.asarray([len(prompt)]), t, len(prompt))
        toks = [jnp.argmax(logits[0, -1])]
        counts = [cache.layers[0].counts]
        for i in range(1, n):
            logits, cache, stats = m.extend(toks[-1][None, None].astype(jnp.int32), cache, stats_rows=0,
                                            stats_sums=True)
            ts = t.observe(cache, ts, stats)
            if i % every == 0:
                cache, ts = t(cache, ts, stats)
            counts.append(cache.layers[0].counts)
            toks.append(jnp.argmax(logits[0, -1]))
        return jnp.stack(toks), jnp.stack(counts)

    toks, counts = by_hand(state)
    assert out == prompt + [int(x) for x in toks]
    assert int(counts.max()) <= 8 + every - 1 and int(counts[-1].max()) <= 8 + (n - 1) % every


TRACES = {"n": 0}


@dataclasses.dataclass(frozen=True)
class CountingH2O(type(policy("h2o"))):
    def __call__(self, cache, state, obs):
        TRACES["n"] += 1
        return super().__call__(cache, state, obs)


def test_no_retracing_across_decode_steps_and_calls(model):
    TRACES["n"] = 0
    generate(model, [[1, 2, 3, 4, 5, 6, 7, 8]], 8, temperature=0, kv_policy=CountingH2O(recent=2), kv_budget=5,
             compress_every=2)
    first = TRACES["n"]
    assert first == 2  # once after the prompt, once in the scanned decode step
    generate(model, [[9, 8, 7, 6, 5, 4, 3, 2]], 8, temperature=0, kv_policy=CountingH2O(recent=2), kv_budget=5,
             compress_every=2)
    assert TRACES["n"] == first


def test_quantised_caches_decode_close_to_full_precision(model):
    prompt = _tokens(8)
    plain, _ = _decode_logits(model, prompt, N)
    for name, opts, tol in (("kivi", {"bits": 8, "group": 8, "residual": 8}, 0.05), ("bfp_ksort", {"block": 8,
                                                                                                  "mantissa_bits": 8}, 0.05)):
        got, cache = _decode_logits(model, prompt, N, KVCompression(policy(name, **opts), None, None))
        assert np.abs(got - plain).max() < tol, name
        assert type(cache.layers[0]).__name__ != "LayerKV"


def test_argument_errors_name_the_argument(model):
    with pytest.raises(ValueError, match="kv_budget: 100 slots per head exceed the cache capacity"):
        generate(model, [1, 2, 3, 4, 5, 6], 4, kv_policy="h2o", kv_budget=100)
    with pytest.raises(ValueError, match="fewer than the 4 slots policy 'streaming_llm' always keeps"):
        generate(model, list(range(1, 12)), 4, kv_policy="streaming_llm", kv_budget=2)
    with pytest.raises(ValueError, match="window 32 exceeds the cache capacity"):
        generate(model, list(range(1, 12)), 4, kv_policy="snapkv", kv_budget=0.5)
    with pytest.raises(ValueError, match="compress_every must be an integer >= 1"):
        generate(model, [1, 2, 3], 4, kv_policy="h2o", kv_budget=0.5, compress_every=0)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        generate(model, [1, 2, 3], 4, kv_policy="nope", kv_budget=0.5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sink'\]"):
        generate(model, [1, 2, 3], 4, kv_policy="streaming_llm", kv_budget=0.5, kv_options={"sink": 2})
    with pytest.raises(ValueError, match="needs a budget"):
        generate(model, [1, 2, 3], 4, kv_policy="h2o")
    with pytest.raises(ValueError, match="need a kv_policy"):
        generate(model, [1, 2, 3], 4, kv_budget=0.5)
    other = Transformer(dataclasses.replace(CFG, n_layers=2), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="cache has 2 layers, the model 3 .a cache from another model shape"):
        model.extend(jnp.asarray([[1, 2]]), other.init_cache(1, 4))
    wide = Transformer(dataclasses.replace(CFG, n_kv_heads=4), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="4 key/value heads of dimension 8, the model 2 of 8"):
        model.extend(jnp.asarray([[1, 2]]), wide.init_cache(1, 4))

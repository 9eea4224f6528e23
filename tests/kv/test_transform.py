"""Cache transforms inside generate's jit: the identity changes nothing and nothing retraces;
a real transform runs after the prompt and every k decode steps, exactly as a manual loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import ModelConfig, Transformer, generate
from jaxeff.kv import IdentityTransform, KVCache
from jaxeff.models.decoder import Decoder

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, init_std=0.2)
TRACES = {"n": 0}


@dataclasses.dataclass(frozen=True)
class CountingIdentity(IdentityTransform):
    def __call__(self, cache, state, stats):
        TRACES["n"] += 1  # Python side effect: runs once per trace, not per call
        return cache, state


@dataclasses.dataclass(frozen=True)
class KeepLast:
    """Forgets every slot but the last ``n`` positions of each row (a sliding window), to make
    the transform's timing visible in the outputs."""

    n: int = 2
    stats_rows: int = 0

    def init(self, cache):
        return jnp.zeros((), jnp.int32)

    def __call__(self, cache: KVCache, state, stats):
        cut = cache.lengths[:, None, None] - self.n
        layers = tuple(dataclasses.replace(l, positions=jnp.where(l.positions >= cut, l.positions, -1))
                       for l in cache.layers)
        return dataclasses.replace(cache, layers=layers), state + 1


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def test_models_implement_the_decoder_protocol(model):
    assert isinstance(model, Decoder)


def test_identity_transform_changes_nothing_and_does_not_retrace(model):
    prompts = [[1, 2, 3, 4], [5, 6]]
    plain = generate(model, prompts, 6, temperature=0)
    TRACES["n"] = 0
    t = CountingIdentity()
    assert generate(model, prompts, 6, temperature=0, cache_transform=t, transform_every=2) == plain
    traced = TRACES["n"]
    assert traced >= 1
    other = [[7, 8, 9, 10], [11, 12]]  # same shapes, new values: no new trace
    generate(model, other, 6, temperature=0, cache_transform=t, transform_every=2)
    assert TRACES["n"] == traced


def test_transform_runs_after_prefill_and_every_k_steps(model):
    prompt, n, k = [3, 14, 15, 9, 26, 5], 7, 3
    t = KeepLast(n=2)
    out = generate(model, prompt, n, temperature=0, cache_transform=t, transform_every=k)
    # the same by hand: prefill, transform, then decode, transforming after every k-th step
    graphdef, state = nnx.split(model)
    ext = jax.jit(lambda s, tok, c: nnx.merge(graphdef, s).extend(tok, c)[:2])

    def by_hand(transform):
        cache = model.init_cache(1, len(prompt) + n)
        logits, cache = ext(state, jnp.asarray([prompt]), cache)
        tstate = None
        if transform:
            cache, tstate = t(cache, t.init(cache), {})
        toks, last = [int(jnp.argmax(logits[0, -1]))], [np.asarray(logits[0, -1])]
        for i in range(1, n):
            logits, cache = ext(state, jnp.asarray([[toks[-1]]]), cache)
            if transform and i % k == 0:
                cache, tstate = t(cache, tstate, {})
            toks.append(int(jnp.argmax(logits[0, -1])))
            last.append(np.asarray(logits[0, -1]))
        return toks, np.stack(last)

    toks, logits_t = by_hand(True)
    assert out == prompt + toks
    _, logits_plain = by_hand(False)
    assert np.abs(logits_t - logits_plain).max() > 1e-3  # the transform really changed the attention


def test_transform_arguments_are_checked(model):
    with pytest.raises(ValueError, match="transform_every must be an integer >= 1"):
        generate(model, [1, 2], 3, cache_transform=IdentityTransform(), transform_every=0)
    with pytest.raises(ValueError, match="transform_every needs a cache_transform"):
        generate(model, [1, 2], 3, transform_every=2)


def test_extend_hands_back_attention_statistics(model):
    graphdef, state = nnx.split(model)
    cache = model.init_cache(2, 8)
    logits, cache, stats = nnx.merge(graphdef, state).extend(jnp.asarray([[1, 2, 3], [4, 5, 6]]), cache,
                                                             valid_lengths=jnp.asarray([3, 2]), stats_rows=2)
    probs, queries = stats["probs"], stats["queries"]
    assert len(probs) == CFG.n_layers and probs[0].shape == (2, CFG.n_heads, 2, 8)
    assert queries[0].shape == (2, 2, CFG.n_heads, CFG.resolved_head_dim)
    p = np.asarray(probs[0])
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert (p[1, :, :, 2:] == 0).all() and (p[0, :, 0, 2:] == 0).all()  # empty slots and future positions

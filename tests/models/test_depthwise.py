"""Continuous depth-wise batching (jaxeff.decode.depthwise): a queue of prompts of different
lengths, decoded through a few slots whose tokens sit at different recursion depths, gives every
sequence exactly what jaxeff.generate gives it decoded alone (greedy), for expert- and
token-choice routing, recursion-wise caches and KV sharing, capacity-sized caches, LoRA, and
models with and without unique first/last layers; the routers really send tokens to different
depths (scaled as in test_mor_decode), and tokens really wait for exit lanes."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import ModelConfig, RecursionConfig, RecursiveTransformer, generate
from jaxeff.decode import DepthwiseDecoder, depthwise_generate

VOCAB = 61
BASE = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=48, init_std=0.1)
MC5 = dict(strategy="middle_cycle", n_recursions=3)
CY6 = dict(strategy="cycle", n_recursions=3)
CASES = {
    "expert-recursion": (5, dict(MC5, routing="expert")),
    "expert-share-update-cycle": (6, dict(CY6, routing="expert", kv_strategy="share", kv_share_update=True)),
    # capacities below 1 at step 1: some tokens skip the shared stack altogether
    "expert-tanh-aux-step1routed": (6, dict(CY6, routing="expert", router_func="tanh", aux_router=True,
                                            capacities="0.7,0.5,0.3")),
    "token-recursion": (5, dict(MC5, routing="token")),
    "expert-lora": (5, dict(MC5, routing="expert", lora_rank=2)),
    "none-recursion": (5, dict(MC5)),
}
PROMPTS = [[5, 17, 3, 44, 9, 12], [8, 2, 30], [1, 2, 3, 4, 5, 6], [40, 41, 42], [7, 7, 7, 7, 7, 7], [11, 3, 9]]
N_NEW = 6


def _make(case: str, seed: int = 0, **rc_extra) -> RecursiveTransformer:
    n_layers, rc = CASES[case]
    model = RecursiveTransformer(ModelConfig(**BASE, n_layers=n_layers), RecursionConfig(**rc, **rc_extra),
                                 rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    if model.lora is not None:  # B starts at zero; make each recursion's weights really differ
        for lora in model.lora:
            for name in model.shared[0].lora_targets():
                b = getattr(lora, f"{name}_b")
                b[...] = jnp.asarray(rng.normal(0.0, 0.05, b.shape), jnp.float32)
    if model.router is not None:  # decisions far from the threshold, depth choices far from ties
        model.router.w[...] = model.router.w[...] * 60.0
        if getattr(model.router, "aux_w", None) is not None:
            model.router.aux_w[...] = model.router.aux_w[...] * 60.0
    return model


def _alone(model, prompts, n, **kw):
    return [generate(model, p, n, temperature=0.0, **kw) for p in prompts]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_unbatched_generate(case):
    model = _make(case)
    dec = DepthwiseDecoder(model, slots=3, lanes=1, max_prompt_len=6, max_new_tokens=N_NEW, capacity=12)
    got = dec.generate(PROMPTS)
    # jaxeff.generate allocates prompt + N_NEW slots; without kv_slack the capacity changes nothing
    assert got == _alone(model, PROMPTS, N_NEW)
    st, n_r = dec.stats, model.rcfg.n_recursions
    assert st["exits"] == len(PROMPTS) * (N_NEW - 1)  # every decoded token left through an exit lane once
    depth = st["shared_passes"] / st["exits"]  # average recursion steps a decoded token ran
    if model.rcfg.routing == "none":
        assert depth == n_r
    else:  # tokens at different depths shared the stack
        assert 0.5 < depth < n_r - 0.2, st
    assert st["waited"] > 0 and st["admitted"] == len(PROMPTS)  # queueing and lane waits happened


def test_capacity_sized_caches_and_overflow():
    """kv_slack = 1: the recursion caches hold ceil(c_r * C) tokens and full ones stop tokens;
    with jaxeff.generate's capacity (prompt + new tokens) the outputs are the same."""
    model = _make("expert-recursion", seed=1, kv_slack=1.0)
    prompts = [p for p in PROMPTS if len(p) == 6]
    dec = DepthwiseDecoder(model, slots=2, max_prompt_len=6, max_new_tokens=N_NEW)
    assert dec.layout.segments == model.stored_capacities(12) == (12, 8, 4)
    assert dec.generate(prompts) == _alone(model, prompts, N_NEW)


def test_sampling_does_not_depend_on_the_schedule():
    model = _make("expert-recursion", seed=2)
    kw = dict(temperature=1.0, seed=3)
    one = depthwise_generate(model, PROMPTS, 5, slots=1, **kw)
    many = depthwise_generate(model, PROMPTS, 5, slots=4, lanes=1, **kw)
    assert one == many and len({tuple(r) for r in one}) == len(PROMPTS)


def test_per_request_lengths_and_eos():
    model = _make("expert-recursion", seed=4)
    dec = DepthwiseDecoder(model, slots=2, max_prompt_len=6, max_new_tokens=N_NEW)
    ref = _alone(model, PROMPTS[:3], N_NEW)
    got = dec.generate(PROMPTS[:3], [1, 4, 6])
    assert [g for g in got] == [r[:len(p) + n] for r, p, n in zip(ref, PROMPTS[:3], [1, 4, 6])]
    eos = ref[0][len(PROMPTS[0]) + 2]  # the third token of the first continuation
    got = dec.generate(PROMPTS[:1], eos_id=eos)[0]
    cont = ref[0][len(PROMPTS[0]):]
    assert got == PROMPTS[0] + cont[:cont.index(eos) + 1]


def test_rejects_bad_settings():
    model = _make("expert-recursion")
    with pytest.raises(ValueError, match="lanes"):
        DepthwiseDecoder(model, slots=2, lanes=3, max_prompt_len=4, max_new_tokens=2)
    with pytest.raises(ValueError, match="capacity"):
        DepthwiseDecoder(model, slots=2, max_prompt_len=40, max_new_tokens=20)
    dec = DepthwiseDecoder(model, slots=2, max_prompt_len=4, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0"):
        dec.generate([[1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="RecursiveTransformer"):
        from jaxeff import Transformer
        DepthwiseDecoder(Transformer(ModelConfig(**BASE, n_layers=2), rngs=nnx.Rngs(0)), slots=1, max_prompt_len=2,
                         max_new_tokens=2)

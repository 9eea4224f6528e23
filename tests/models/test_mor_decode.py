"""Mixture-of-Recursions decoding (RecursiveTransformer.extend with a RecursiveCache): ragged
prefill plus one-token steps equal the causal full forward (mode='threshold') for every routing
and KV strategy, greedy ``generate`` equals repeated full forwards, and the compacted caches hold
exactly the keys of the tokens that reached each recursion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import ModelConfig, RecursionConfig, RecursiveTransformer, generate

VOCAB = 61
BASE = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, init_std=0.1)
TOL = dict(rtol=1e-4, atol=1e-4)

# (n_layers, recursion config); middle_cycle L=5 has one shared block, cycle L=6 / middle_sequence
# L=6 have two, so the order of blocks within a recursion matters too.
MC5 = dict(strategy="middle_cycle", n_recursions=3)
CY6 = dict(strategy="cycle", n_recursions=3)
MS6 = dict(strategy="middle_sequence", n_recursions=2, lora_rank=2)
CASES = {
    "none-middle_cycle-recursion": (5, dict(MC5)),
    "none-middle_cycle-share": (5, dict(MC5, kv_strategy="share")),
    "none-middle_sequence-lora-recursion": (6, dict(MS6)),
    "none-middle_sequence-lora-share": (6, dict(MS6, kv_strategy="share")),
    "none-cycle-recursion": (6, dict(CY6)),
    "none-cycle-share": (6, dict(CY6, kv_strategy="share")),
    "expert-sigmoid-recursion": (5, dict(MC5, routing="expert")),
    "expert-sigmoid-share": (5, dict(MC5, routing="expert", kv_strategy="share")),
    "expert-sigmoid-aux-recursion": (5, dict(MC5, routing="expert", aux_router=True)),
    "expert-sigmoid-aux-share": (6, dict(CY6, routing="expert", aux_router=True, kv_strategy="share")),
    # capacities below 1 at step 1 put the very first recursion under the threshold rule too
    "expert-tanh-recursion-step1routed": (6, dict(CY6, routing="expert", router_func="tanh",
                                                  capacities="0.7,0.5,0.3")),
    "expert-tanh-share-step1routed": (6, dict(CY6, routing="expert", router_func="tanh", capacities="0.7,0.5,0.3",
                                              kv_strategy="share")),
    "expert-tanh-aux-recursion": (6, dict(CY6, routing="expert", router_func="tanh", aux_router=True,
                                          router_alpha=0.5)),
    "expert-tanh-aux-share": (5, dict(MC5, routing="expert", router_func="tanh", aux_router=True,
                                      kv_strategy="share")),
    "token-recursion": (5, dict(MC5, routing="token")),
    "token-share": (6, dict(CY6, routing="token", kv_strategy="share")),
}


def _make(case: str, seed: int = 0) -> RecursiveTransformer:
    n_layers, rc = CASES[case]
    model = RecursiveTransformer(ModelConfig(**BASE, n_layers=n_layers), RecursionConfig(**rc), rngs=nnx.Rngs(seed))
    if model.lora is not None:  # B starts at zero; make each recursion's weights really differ
        rng = np.random.default_rng(seed)
        for lora in model.lora:
            for name in model.shared[0].lora_targets():
                b = getattr(lora, f"{name}_b")
                b[...] = jnp.asarray(rng.normal(0.0, 0.05, b.shape), jnp.float32)
    router = model.router
    if router is not None:
        # Large router weights: logits far from the threshold (0) and depth choices far from ties,
        # so float rounding never flips a decision between the two computations.
        router.w[...] = router.w[...] * 60.0
        if getattr(router, "aux_w", None) is not None:
            router.aux_w[...] = router.aux_w[...] * 60.0
    return model


class _Jitted:
    """The model's forward and extend, jitted once per model (graphdef closed over)."""

    def __init__(self, model):
        graphdef, self.state = nnx.split(model)
        self._fwd = jax.jit(lambda s, t, seg: nnx.merge(graphdef, s)(t, segment_ids=seg, mode="threshold"))
        self._ext = jax.jit(lambda s, t, c, vl: nnx.merge(graphdef, s).extend(t, c, valid_lengths=vl)[:2])

    def forward(self, tokens, segment_ids=None):
        logits, aux = self._fwd(self.state, jnp.asarray(tokens), segment_ids)
        self.depth = np.asarray(aux["depth"]) if "depth" in aux else None
        return np.asarray(logits), {k: float(v) for k, v in aux.items() if np.ndim(v) == 0}

    def extend(self, tokens, cache, valid_lengths=None):
        return self._ext(self.state, jnp.asarray(tokens), cache, valid_lengths)


def _reached(aux: dict, n_valid: int, n_r: int) -> list[int]:
    """Tokens that took part in each recursion step, from the forward's selected fractions."""
    return [int(round(aux[f"mor/selected_frac_r{r + 1}"] * n_valid)) for r in range(n_r)]


B, T, P, N_DECODE = 3, 12, 7, 5
LENGTHS = np.array([7, 4, 6])  # ragged prompts in one prefill, as jaxeff.generate does


@pytest.mark.parametrize("case", list(CASES))
def test_ragged_prefill_then_decode_equals_threshold_forward(case):
    """Prefill of ragged prompts, then one token per call, equals the causal forward; afterwards
    the cache holds the keys of exactly the tokens that reached each stored recursion."""
    model = _make(case)
    rc = model.rcfg
    run = _Jitted(model)
    tokens = np.random.default_rng(1).integers(1, VOCAB, size=(B, T)).astype(np.int32)
    seen = LENGTHS + N_DECODE  # tokens each row has taken in by the end
    # The forward over the same tokens, with what a row never takes in marked as padding: causal,
    # so the logits of the rest are unaffected, and the selected fractions count the tokens.
    seg = (np.arange(T)[None, :] < seen[:, None]).astype(np.int32)
    full, aux = run.forward(tokens, jnp.asarray(seg))
    if rc.routing != "none":  # the per-token depth agrees with the per-step counts
        valid = seg.astype(bool)
        assert run.depth.shape == (B, T) and np.all(run.depth[~valid] == 0)
        assert np.all((run.depth[valid] >= 0) & (run.depth[valid] <= rc.n_recursions))
        assert [int((run.depth >= r + 1).sum()) for r in range(rc.n_recursions)] == _reached(
            aux, int(valid.sum()), rc.n_recursions)

    prompt = np.where(np.arange(P)[None, :] < LENGTHS[:, None], tokens[:, :P], 0)  # padded like generate
    cache = model.init_cache(B, T)
    pre, cache = run.extend(prompt, cache, jnp.asarray(LENGTHS, jnp.int32))
    pre = np.asarray(pre)
    for b in range(B):
        np.testing.assert_allclose(pre[b, :LENGTHS[b]], full[b, :LENGTHS[b]], **TOL, err_msg=f"prefill row {b}")
    for i in range(N_DECODE):
        step_tokens = tokens[np.arange(B), LENGTHS + i][:, None]
        logits, cache = run.extend(step_tokens, cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[np.arange(B), LENGTHS + i], **TOL,
                                   err_msg=f"decode step {i}")
    np.testing.assert_array_equal(np.asarray(cache.lengths), seen)

    # The routing really decided something: some tokens stop early, some go the whole way.
    n_valid, n_r = int(seen.sum()), rc.n_recursions
    reached = _reached(aux, n_valid, n_r) if rc.routing != "none" else [n_valid] * n_r
    if rc.routing != "none":
        assert reached[-1] > 0 and reached[1] < n_valid, reached
        assert (reached[0] < n_valid) == (rc.routing == "expert" and model.capacities[0] < 1), reached
        assert all(a >= b for a, b in zip(reached, reached[1:]))
    if rc.routing == "token":
        # a token routed to depth d takes part in exactly the first d recursions
        loads = [aux[f"mor/load_depth{d + 1}"] for d in range(n_r)]
        assert sum(x > 0 for x in loads) >= 2, loads
        for r in range(n_r):
            assert aux[f"mor/selected_frac_r{r + 1}"] == pytest.approx(sum(loads[r:]), abs=1e-6)

    # --- KV memory: the compacted caches hold exactly the tokens that reached each step.
    held = cache.held_entries()
    u = model.n_shared
    assert held["tokens"] == n_valid
    assert held["unique"] == (2 * n_valid if model.first is not None else 0)
    # tokens held by each stored recursion (every block of a recursion holds the same ones)
    counts = np.asarray([int(cache.layer(s, 0).counts[:, 0].sum()) for s in range(cache.n_stored)])
    if rc.kv_strategy == "recursion":
        np.testing.assert_array_equal(counts, reached)
        assert held["shared"] == u * sum(reached)
    else:
        np.testing.assert_array_equal(counts, reached[:1])
        assert held["shared"] == u * reached[0]
    if rc.routing == "none":
        # every token at every recursion: N_r (or, sharing, 1) times a vanilla block's entries
        assert held["shared"] == u * n_valid * (n_r if rc.kv_strategy == "recursion" else 1)
    elif rc.kv_strategy == "recursion":
        assert held["shared"] < u * n_r * n_valid


@pytest.mark.parametrize("case", ["expert-sigmoid-recursion", "token-share"])
def test_equal_chunks_at_an_offset(case):
    """Several tokens per extend call, after earlier ones: attention within a chunk and into the
    compacted caches by position."""
    model = _make(case, seed=2)
    run = _Jitted(model)
    tokens = np.random.default_rng(3).integers(1, VOCAB, size=(2, 12)).astype(np.int32)
    full, _ = run.forward(tokens)
    cache = model.init_cache(2, 12)
    for c in range(3):
        logits, cache = run.extend(tokens[:, 4 * c: 4 * c + 4], cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, 4 * c: 4 * c + 4], **TOL, err_msg=f"chunk {c}")


@pytest.mark.parametrize("case", ["none-middle_sequence-lora-recursion", "expert-tanh-aux-recursion", "token-recursion"])
def test_greedy_generate_equals_repeated_full_forwards(case):
    model = _make(case, seed=4)
    run = _Jitted(model)
    prompts = [[5, 17, 3, 44, 9, 12], [8, 2, 30]]
    n = 5
    out = generate(model, prompts, n, temperature=0.0)
    width = max(map(len, prompts)) + n
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(n):
            padded = np.zeros((1, width), np.int32)
            padded[0, :len(seq)] = seq
            logits = run.forward(padded)[0][0, len(seq) - 1]
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] > 1e-4  # not a near-tie: the comparison is meaningful
            seq.append(int(logits.argmax()))
        assert out[b] == seq


def test_aux_router_decides_at_inference_only():
    """With ``aux_router`` the threshold rule reads the auxiliary logits; top-k training selects
    by the gating logits, so the auxiliary weights leave its output alone."""
    model = _make("expert-sigmoid-aux-recursion", seed=5)
    graphdef, _ = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(6).integers(1, VOCAB, size=(2, 10)), jnp.int32)
    fwd = jax.jit(lambda s, mode: nnx.merge(graphdef, s)(tokens, mode=mode), static_argnums=1)
    w = model.router.w[...]
    out = {}
    for name, aux_w in [("zero", jnp.zeros_like(w)), ("same", w), ("negated", -w)]:
        model.router.aux_w[...] = aux_w
        state = nnx.split(model)[1]
        out[name] = fwd(state, "threshold")[1], np.asarray(fwd(state, "topk")[0])
    frac = {k: float(aux["mor/selected_frac_r2"]) for k, (aux, _) in out.items()}
    assert frac["zero"] == 1.0  # every decision logit is 0: all tokens go on
    assert 0.0 < frac["same"] < 1.0
    assert frac["same"] + frac["negated"] == pytest.approx(1.0)  # step 2 of 3: the complementary tokens
    np.testing.assert_array_equal(out["negated"][1], out["same"][1])
    np.testing.assert_array_equal(out["zero"][1], out["same"][1])

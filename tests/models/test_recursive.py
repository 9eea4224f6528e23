"""Recursive transformers and Mixture-of-Recursions (jaxeff/models/recursive.py): sharing maps,
parameter counts, equivalence with a vanilla Transformer, the compacted expert-choice forward
against a plain-numpy oracle and the masked top-k path (values and gradients), selection
semantics, compiled FLOPs that really shrink with the capacities, and one training step."""

import math
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import Config, ModelConfig, RecursionConfig, RecursiveTransformer, Transformer
from jaxeff.config import TrainConfig
from jaxeff.models.mor import ExpertChoiceRouter
from jaxeff.models.recursive import flops_per_token, layer_sources, sharing_map
from jaxeff.ops import routing
from jaxeff.train import init_state, make_optimizer, make_train_step
from jaxeff.train.loop import build_model

VOCAB = 61
BASE = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128, init_std=0.1)


def _cfg(n_layers: int = 5, **kw) -> ModelConfig:
    return ModelConfig(**{**BASE, "n_layers": n_layers, **kw})


def _model(n_layers: int = 5, seed: int = 0, model_kw: dict | None = None, **rc) -> RecursiveTransformer:
    return RecursiveTransformer(_cfg(n_layers, **(model_kw or {})), RecursionConfig(**rc), rngs=nnx.Rngs(seed))


def _forward(model, tokens, *, positions=None, segment_ids=None, mode="topk"):
    """Logits and aux as numpy, jitted. The graphdef is closed over, not a static argument: a
    model with LoRA has an unhashable graphdef (see test_mor_decode.py::test_generate_with_lora)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t, p, g: nnx.merge(graphdef, s)(t, positions=p, segment_ids=g, mode=mode))
    logits, aux = fn(state, jnp.asarray(tokens), positions, segment_ids)
    return np.asarray(logits), {k: np.asarray(v) for k, v in aux.items()}


def _randomize_lora(model, seed: int, scale: float = 0.05):
    """LoRA B starts at zero (a no-op); random B makes every recursion's weights really differ."""
    rng = np.random.default_rng(seed)
    for lora in model.lora:
        for name in lora.shapes:
            b = getattr(lora, f"{name}_b")
            b[...] = jnp.asarray(rng.normal(0.0, scale, b.shape), b.dtype)


def _tokens(seed: int, b: int, t: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, size=(b, t)).astype(np.int32)


# --- 1. sharing maps ------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, n_layers, n_r, blocks", [
    ("cycle", 6, 2, [0, 1, 2, 0, 1, 2]),
    ("sequence", 6, 2, [0, 0, 1, 1, 2, 2]),
    ("cycle", 6, 3, [0, 1, 0, 1, 0, 1]),
    ("sequence", 6, 3, [0, 0, 0, 1, 1, 1]),
    ("cycle", 4, 4, [0, 0, 0, 0]),
    ("cycle", 3, 1, [0, 1, 2]),
    ("sequence", 3, 1, [0, 1, 2]),
    ("middle_cycle", 8, 3, ["first", 0, 1, 0, 1, 0, 1, "last"]),
    ("middle_sequence", 8, 3, ["first", 0, 0, 0, 1, 1, 1, "last"]),
    ("middle_cycle", 5, 3, ["first", 0, 0, 0, "last"]),
    ("middle_sequence", 6, 2, ["first", 0, 0, 1, 1, "last"]),
    ("middle_cycle", 6, 2, ["first", 0, 1, 0, 1, "last"]),
])
def test_sharing_map_and_layer_sources(strategy, n_layers, n_r, blocks):
    expected_sources = [b if isinstance(b, str) else f"shared[{b}]" for b in blocks]
    assert layer_sources(strategy, n_layers, n_r) == expected_sources
    smap = sharing_map(strategy, n_layers, n_r)
    assert [j for j, _ in smap] == [b for b in blocks if not isinstance(b, str)]
    u = len(smap) // n_r
    # Recursion r is the r-th visit of its block; every block serves every recursion once.
    for j in range(u):
        assert sorted(r for jj, r in smap if jj == j) == list(range(n_r))
    if strategy.endswith("cycle"):
        assert [r for _, r in smap] == [i // u for i in range(len(smap))]
    else:
        assert [r for _, r in smap] == [i % n_r for i in range(len(smap))]


def test_sharing_map_rejects_none():
    with pytest.raises(ValueError, match="sharing strategy"):
        sharing_map("none", 4, 1)


def test_model_uses_the_sharing_map():
    model = _model(8, strategy="middle_sequence", n_recursions=3)
    assert model.layer_map == sharing_map("middle_sequence", 8, 3)
    assert model.n_shared == 2 and len(model.shared) == 2
    assert model.first is not None and model.last is not None
    cyc = _model(6, strategy="cycle", n_recursions=2)
    assert cyc.first is None and cyc.last is None and len(cyc.shared) == 3


def test_constructor_errors():
    with pytest.raises(ValueError, match="strategy is 'none'"):
        RecursiveTransformer(_cfg(4), RecursionConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_recursions"):
        RecursiveTransformer(_cfg(6), RecursionConfig(strategy="middle_cycle", n_recursions=3), rngs=nnx.Rngs(0))
    model = _model(5, strategy="middle_cycle", n_recursions=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        _forward(model, _tokens(0, 1, 4), mode="dense")


# --- 2. parameter counts --------------------------------------------------------------------------

def _count(model_fn) -> int:
    """Parameter count without allocating (or computing) any parameter."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(model_fn), nnx.Param)))


@pytest.mark.parametrize("strategy, n_layers, n_r", [
    ("cycle", 6, 1), ("cycle", 6, 2), ("cycle", 6, 3), ("sequence", 6, 2), ("sequence", 8, 4),
    ("middle_cycle", 5, 3), ("middle_cycle", 8, 2), ("middle_sequence", 8, 3), ("middle_cycle", 4, 1),
])
@pytest.mark.parametrize("tie", [True, False])
def test_param_count(strategy, n_layers, n_r, tie):
    cfg = _cfg(n_layers, tie_embeddings=tie)
    d, v = cfg.d_model, cfg.vocab_size
    non_layer = v * d + d + (0 if tie else d * v)
    per_layer = ModelConfig(**{**BASE, "n_layers": 1, "tie_embeddings": tie}).param_count() - non_layer
    n_blocks = 2 + (n_layers - 2) // n_r if strategy.startswith("middle_") else n_layers // n_r
    rc = RecursionConfig(strategy=strategy, n_recursions=n_r)
    assert _count(lambda: RecursiveTransformer(cfg, rc, rngs=nnx.Rngs(0))) == non_layer + n_blocks * per_layer
    if n_r == 1 and not strategy.startswith("middle_"):
        assert non_layer + n_blocks * per_layer == cfg.param_count()  # no sharing: the dense model


@pytest.mark.parametrize("rc, extra", [
    (dict(lora_rank=3), "lora"),
    (dict(routing="expert"), "router"),
    (dict(routing="expert", aux_router=True), "router2"),
    (dict(routing="token"), "token"),
    (dict(routing="token", lora_rank=2), "token+lora"),
])
def test_lora_and_router_param_counts(rc, extra):
    cfg = _cfg(8)
    n_r = 3
    rcfg = RecursionConfig(strategy="middle_cycle", n_recursions=n_r, **rc)
    plain = _count(lambda: RecursiveTransformer(cfg, RecursionConfig(strategy="middle_cycle", n_recursions=n_r),
                                                rngs=nnx.Rngs(0)))
    d, h, kh, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff
    u = (8 - 2) // n_r
    # fan_in + fan_out of wq, wk, wv, wo, w_gate, w_up, w_down
    lora_per_rank = (d + h * hd) + 2 * (d + kh * hd) + (h * hd + d) + 2 * (d + f) + (f + d)
    expected = {"lora": u * n_r * 3 * lora_per_rank, "router": n_r * d, "router2": 2 * n_r * d,
                "token": d * n_r + n_r, "token+lora": d * n_r + n_r + u * n_r * 2 * lora_per_rank}[extra]
    assert _count(lambda: RecursiveTransformer(cfg, rcfg, rngs=nnx.Rngs(0))) == plain + expected


# --- 3. equivalence with the vanilla Transformer ---------------------------------------------------

def _as_vanilla(rec: RecursiveTransformer) -> tuple[Transformer, dict]:
    """A dense Transformer whose layer l holds the weights layer l of ``rec`` uses (LoRA merged)."""
    cfg = rec.cfg
    dense = Transformer(cfg, rngs=nnx.Rngs(99))
    graphdef, state = nnx.split(dense)
    p = nnx.to_pure_dict(nnx.state(rec))
    out = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    out["embed"], out["final_norm"] = p["embed"], p["final_norm"]
    if not cfg.tie_embeddings:
        out["lm_head"] = p["lm_head"]
    layers = ([("first", None)] if rec.first is not None else []) + list(rec.layer_map) + (
        [("last", None)] if rec.last is not None else [])
    for l, (j, r) in enumerate(layers):
        src = p[j] if isinstance(j, str) else jax.tree.map(np.asarray, p["shared"][j])
        src = jax.tree.map(np.array, src)
        if rec.lora is not None and not isinstance(j, str):
            for name, delta in rec.lora[j].deltas(r).items():
                part = "attn" if name.startswith("w") and name[1:] in ("q", "k", "v", "o") else "mlp"
                src[part][name] = src[part][name] + np.asarray(delta)
        out["blocks"][l] = src
    return nnx.merge(graphdef, out), out


@pytest.mark.parametrize("strategy, n_layers, n_r, lora, tie", [
    ("cycle", 4, 1, 0, True),
    ("middle_cycle", 4, 1, 0, False),
    ("cycle", 6, 3, 0, True),
    ("sequence", 6, 2, 0, False),
    ("middle_cycle", 8, 3, 0, True),
    ("middle_sequence", 8, 3, 2, True),
    ("cycle", 4, 2, 3, False),
])
def test_equals_vanilla_transformer_with_copied_blocks(strategy, n_layers, n_r, lora, tie):
    """Without routing (and with recursion-wise KV), the recursive model IS the dense model whose
    layers repeat the shared blocks in the sharing map's order (with each recursion's LoRA)."""
    rec = _model(n_layers, seed=1, model_kw=dict(tie_embeddings=tie), strategy=strategy, n_recursions=n_r,
                 lora_rank=lora)
    if lora:
        _randomize_lora(rec, seed=2)
    dense, _ = _as_vanilla(rec)
    tokens = _tokens(3, 2, 10)
    seg = jnp.asarray([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3], jnp.int32)
    want = np.asarray(jax.jit(lambda m, t, s: m(t, segment_ids=s)[0])(dense, tokens, seg))
    got, aux = _forward(rec, tokens, segment_ids=seg)
    assert aux == {}
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # No routing: 'threshold' runs the same plain path.
    np.testing.assert_allclose(_forward(rec, tokens, segment_ids=seg, mode="threshold")[0], got, rtol=1e-6, atol=1e-6)


def test_n_r1_cycle_equals_vanilla_with_hand_built_dict():
    """N_r = 1, cycle: the params of a vanilla Transformer copied in (blocks -> shared) give its logits."""
    cfg = _cfg(3)
    dense = Transformer(cfg, rngs=nnx.Rngs(5))
    rec = RecursiveTransformer(cfg, RecursionConfig(strategy="cycle", n_recursions=1), rngs=nnx.Rngs(6))
    dp = nnx.to_pure_dict(nnx.state(dense))
    graphdef, _ = nnx.split(rec)
    pure = {"embed": dp["embed"], "final_norm": dp["final_norm"], "shared": dict(dp["blocks"])}
    tokens = _tokens(4, 2, 9)
    want = np.asarray(jax.jit(lambda m, t: m(t)[0])(dense, tokens))
    before, _ = _forward(rec, tokens)
    assert not np.allclose(before, want, atol=1e-3)
    got, _ = _forward(nnx.merge(graphdef, pure), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # KV sharing with N_r = 1 changes nothing either.
    shared_kv = RecursiveTransformer(cfg, RecursionConfig(strategy="cycle", n_recursions=1, kv_strategy="share"),
                                     rngs=nnx.Rngs(6))
    np.testing.assert_allclose(_forward(nnx.merge(nnx.split(shared_kv)[0], pure), tokens)[0], want,
                               rtol=1e-5, atol=1e-5)


def test_kv_sharing_changes_the_function_when_n_r_above_1():
    a = _model(6, seed=7, strategy="cycle", n_recursions=3)
    b = _model(6, seed=7, strategy="cycle", n_recursions=3, kv_strategy="share")
    tokens = _tokens(5, 1, 8)
    la, lb = _forward(a, tokens)[0], _forward(b, tokens)[0]
    assert not np.allclose(la, lb, atol=1e-4)


# --- 4. compacted expert-choice forward against oracles -------------------------------------------

def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x_NxHxD, pos_N, base):
    d = x_NxHxD.shape[-1]
    ang = pos_N[:, None].astype(np.float64) * base ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x_NxHxD[..., : d // 2], x_NxHxD[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_block(p, x_NxD, pos_N, seg_N, cfg, keys=None):
    """One pre-norm block on N tokens (one row); ``keys = (k, v, pos, seg)`` replaces its own
    keys/values (KV sharing). Returns (x, (k, v, pos, seg)) with the block's own keys."""
    a = _np_rms(x_NxD, p["attn_norm"]["scale"], cfg.norm_eps)
    q = _np_rope(np.einsum("nd,dhk->nhk", a, p["attn"]["wq"]), pos_N, cfg.rope_base)
    k = _np_rope(np.einsum("nd,dhk->nhk", a, p["attn"]["wk"]), pos_N, cfg.rope_base)
    v = np.einsum("nd,dhk->nhk", a, p["attn"]["wv"])
    own = (k, v, pos_N, seg_N)
    kk, vv, kpos, kseg = own if keys is None else keys
    g = cfg.n_heads // cfg.n_kv_heads
    kk, vv = np.repeat(kk, g, axis=1), np.repeat(vv, g, axis=1)
    mask = (kpos[None, :] <= pos_N[:, None]) & (kseg[None, :] == seg_N[:, None])
    mask |= ~mask.any(-1, keepdims=True)  # padding queries: any finite value, compared nowhere
    s = np.einsum("qhd,shd->hqs", q, kk) / math.sqrt(q.shape[-1])
    s = np.where(mask[None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    x = x_NxD + np.einsum("qhd,hde->qe", np.einsum("hqs,shd->qhd", w, vv), p["attn"]["wo"])
    m = _np_rms(x, p["mlp_norm"]["scale"], cfg.norm_eps)
    gate, up = m @ p["mlp"]["w_gate"], m @ p["mlp"]["w_up"]
    return x + (gate / (1 + np.exp(-gate)) * up) @ p["mlp"]["w_down"], own


def _np_block_params(p, model, j, r):
    blk = jax.tree.map(lambda x: np.asarray(x, np.float64), p["shared"][j])
    if model.lora is not None:
        for name, delta in model.lora[j].deltas(r).items():
            part = "attn" if name in ("wq", "wk", "wv", "wo") else "mlp"
            blk[part][name] = blk[part][name] + np.asarray(delta, np.float64)
    return blk


def _np_mor_topk(model, tokens_BxT, seg_BxT=None):
    """Expert-choice MoR written from the paper, row by row in float64: at step r the router
    scores the previous step's survivors, the top k_r = max(1, int(c_r T)) go on (sorted), the
    shared stack runs on them alone at their own positions, and h += gate * stack(h) there."""
    cfg, rc = model.cfg, model.rcfg
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model)))
    table, w_router = p["embed"]["table"], p["router"]["w"]
    gate = {"sigmoid": lambda x: rc.router_alpha / (1 + np.exp(-x)), "tanh": lambda x: rc.router_alpha * np.tanh(x)}
    b, t = tokens_BxT.shape
    out = []
    for row in range(b):
        pos = np.arange(t)
        seg = np.ones(t, np.int64) if seg_BxT is None else np.asarray(seg_BxT[row])
        valid = seg != 0
        h = table[tokens_BxT[row]]
        if model.first is not None:
            h = _np_block(p["first"], h, pos, seg, cfg)[0]
        cand, first_keys = np.arange(t), {}
        for r, cap in enumerate(model.capacities):
            logit = h[cand] @ w_router[r]
            k = max(1, int(cap * t + 1e-9))
            if k >= len(cand):
                local = np.arange(len(cand))
            else:
                local = np.sort(np.argsort(-np.where(valid[cand], logit, -np.inf), kind="stable")[:k])
            sel = cand[local]
            x = h[sel]
            for j in range(model.n_shared):
                keys = first_keys[j] if (rc.kv_strategy == "share" and r > 0) else None
                x, own = _np_block(_np_block_params(p, model, j, r), x, pos[sel], seg[sel], cfg, keys)
                if r == 0:
                    first_keys[j] = own
            h = h.copy()
            h[sel] += gate[rc.router_func](logit[local])[:, None] * x
            cand = sel
        if model.last is not None:
            h = _np_block(p["last"], h, pos, seg, cfg)[0]
        hn = _np_rms(h, p["final_norm"]["scale"], cfg.norm_eps)
        out.append(hn @ table.T if cfg.tie_embeddings else hn @ p["lm_head"]["w"])
    return np.stack(out)


def _masked_topk(model, tokens_BxT, segment_ids=None):
    """The dense masked path with top-k decisions (same pieces as ``model.__call__``)."""
    b, t = tokens_BxT.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
    h = model.embed(tokens_BxT)
    if model.first is not None:
        h = model.first(h, pos, segment_ids_BxT=segment_ids)[0]
    h, aux = model._forward_masked(h, pos, segment_ids, valid, model._decider("topk"))
    if model.last is not None:
        h = model.last(h, pos, segment_ids_BxT=segment_ids)[0]
    return model.logits(h), aux


def _both_paths(model, tokens, seg):
    graphdef, state = nnx.split(model)

    def run(state):
        m = nnx.merge(graphdef, state)
        return m(tokens, segment_ids=seg, mode="topk"), _masked_topk(m, tokens, seg)
    return jax.jit(run)(state)


# Packed documents; row 1 has 5 real tokens then padding, so some steps select padding as well.
SEG = np.asarray([[1] * 6 + [2] * 8 + [3] * 6, [1] * 3 + [2] * 2 + [0] * 15], np.int32)

ORACLE_CASES = {
    "middle-recursion-default-sigmoid": dict(n_layers=5, kv="recursion", seg=False, caps="", func="sigmoid"),
    "middle-share-default-tanh": dict(n_layers=5, kv="share", seg=False, caps="", func="tanh"),
    "middle-recursion-packed-custom-tanh": dict(n_layers=5, kv="recursion", seg=True, caps="1,0.5,0.25",
                                                func="tanh"),
    "middle-share-packed-custom-sigmoid": dict(n_layers=5, kv="share", seg=True, caps="1,0.5,0.25",
                                               func="sigmoid"),
    "cycle-recursion-packed-step1routed-lora": dict(n_layers=6, kv="recursion", seg=True, caps="0.75,0.5,0.25",
                                                    func="sigmoid", lora=2),
    "cycle-share-step1routed-tanh-untied": dict(n_layers=6, kv="share", seg=False, caps="0.75,0.5,0.25",
                                                func="tanh", tie=False),
}


def _caps(model) -> tuple[float, ...]:
    return model.rcfg.resolved_capacities


def _oracle_model(case, seed=0):
    c = ORACLE_CASES[case]
    model = _model(c["n_layers"], seed=seed, model_kw=dict(tie_embeddings=c.get("tie", True)),
                   strategy="middle_cycle" if c["n_layers"] == 5 else "cycle", n_recursions=3, routing="expert",
                   capacities=c["caps"], router_func=c["func"], router_alpha=0.5, kv_strategy=c["kv"],
                   lora_rank=c.get("lora", 0))
    if c.get("lora"):
        _randomize_lora(model, seed + 1)
    return model, (jnp.asarray(SEG) if c["seg"] else None)


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_compact_topk_equals_numpy_oracle_and_masked_topk(case):
    model, seg = _oracle_model(case)
    tokens = _tokens(11, 2, 20)
    (compact, aux), (masked, _) = _both_paths(model, jnp.asarray(tokens), seg)
    compact, masked = np.asarray(compact), np.asarray(masked)
    oracle = _np_mor_topk(model, tokens, None if seg is None else np.asarray(seg))
    valid = np.ones((2, 20), bool) if seg is None else np.asarray(seg) != 0
    np.testing.assert_allclose(compact[valid], oracle[valid], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(compact[valid], masked[valid], rtol=1e-4, atol=1e-4)
    # Each step kept k_r tokens of each row, padding last: the selected fractions say so.
    n_valid = valid.sum(1)
    for r, c in enumerate(_caps(model)):
        k = max(1, int(c * 20 + 1e-9))
        assert float(aux[f"mor/selected_frac_r{r + 1}"]) == pytest.approx(np.minimum(k, n_valid).sum() / valid.sum())


def test_routing_is_not_a_no_op():
    """Same weights, all capacities 1: the oracle comparison above would catch a wrong selection."""
    model, _ = _oracle_model("middle-recursion-default-sigmoid")
    full = _model(5, seed=0, strategy="middle_cycle", n_recursions=3, routing="expert", capacities="1,1,1",
                  router_alpha=0.5)
    tokens = _tokens(11, 2, 20)
    a, b = _forward(model, tokens)[0], _forward(full, tokens)[0]
    assert np.abs(a - b).max() > 1e-2


@pytest.mark.parametrize("case", ["middle-share-packed-custom-sigmoid", "cycle-recursion-packed-step1routed-lora"])
def test_compact_topk_gradients_equal_masked_topk(case):
    model, seg = _oracle_model(case, seed=3)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tokens = jnp.asarray(_tokens(12, 2, 20))
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(2, 20, VOCAB)), jnp.float32)
    weights = weights * (seg != 0)[..., None]

    def loss(p, compact):
        m = nnx.merge(graphdef, p)
        logits = m(tokens, segment_ids=seg)[0] if compact else _masked_topk(m, tokens, seg)[0]
        return jnp.sum(logits * weights)

    g_compact, g_masked = jax.jit(lambda p: (jax.grad(loss)(p, True), jax.grad(loss)(p, False)))(params)
    flat_c, flat_m = jax.tree_util.tree_leaves_with_path(g_compact), jax.tree.leaves(g_masked)
    assert len(flat_c) == len(flat_m)
    for (path, a), b in zip(flat_c, flat_m):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4, err_msg=str(path))
    # The router and every recursion's weights receive a gradient.
    assert np.abs(np.asarray(g_compact["router"]["w"])).min(axis=1).max() > 0
    assert all(np.abs(np.asarray(g_compact["router"]["w"][r])).sum() > 0 for r in range(3))

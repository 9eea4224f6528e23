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
from jaxeff.models import count_params
from jaxeff.models.recursive import layer_sources, sharing_map
from jaxeff.nn.routers import ExpertChoiceRouter
from jaxeff.ops import AttentionMask, routing
from jaxeff.train import init_state, make_optimizer, make_train_step
from jaxeff.models import build_model

VOCAB = 61
BASE = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128, init_std=0.1)


def _cfg(n_layers: int = 5, **kw) -> ModelConfig:
    return ModelConfig(**{**BASE, "n_layers": n_layers, **kw})


def _model(n_layers: int = 5, seed: int = 0, model_kw: dict | None = None, **rc) -> RecursiveTransformer:
    return RecursiveTransformer(_cfg(n_layers, **(model_kw or {})), RecursionConfig(**rc), rngs=nnx.Rngs(seed))


def _forward(model, tokens, *, positions=None, segment_ids=None, mode="topk"):
    """Logits and aux as numpy, jitted (one compilation per call: each test builds its own model)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t, p, g: nnx.merge(graphdef, s)(t, positions=p, segment_ids=g, mode=mode))
    logits, aux = fn(state, jnp.asarray(tokens), positions, segment_ids)
    return np.asarray(logits), {k: np.asarray(v) for k, v in aux.items()}


def _randomize_lora(model, seed: int, scale: float = 0.05):
    """LoRA B starts at zero (a no-op); random B makes every recursion's weights really differ."""
    rng = np.random.default_rng(seed)
    for lora in model.lora:
        for name in model.shared[0].lora_targets():
            b = getattr(lora, f"{name}_b")
            b[...] = jnp.asarray(rng.normal(0.0, scale, b.shape), b.dtype)


def _tokens(seed: int, b: int, t: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, size=(b, t)).astype(np.int32)


# --- sharing maps ------------------------------------------------------------------------------

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
    model = nnx.eval_shape(lambda: _model(8, strategy="middle_sequence", n_recursions=3))
    assert model.layer_map == sharing_map("middle_sequence", 8, 3)
    assert model.n_shared == 2 and len(model.shared) == 2
    assert model.first is not None and model.last is not None
    cyc = nnx.eval_shape(lambda: _model(6, strategy="cycle", n_recursions=2))
    assert cyc.first is None and cyc.last is None and len(cyc.shared) == 3


def test_constructor_errors():
    with pytest.raises(ValueError, match="strategy is 'none'"):
        RecursiveTransformer(_cfg(4), RecursionConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_recursions"):
        RecursiveTransformer(_cfg(6), RecursionConfig(strategy="middle_cycle", n_recursions=3), rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _model(5, strategy="middle_cycle", n_recursions=3)))
    with pytest.raises(ValueError, match="mode must be one of"):
        jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t, mode="dense"), abstract, jnp.zeros((1, 4), jnp.int32))


# --- parameter counts --------------------------------------------------------------------------

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
    per_layer = count_params(Config(model=ModelConfig(**{**BASE, "n_layers": 1, "tie_embeddings": tie}), train=TrainConfig(seq_len=64))) - non_layer
    n_blocks = 2 + (n_layers - 2) // n_r if strategy.startswith("middle_") else n_layers // n_r
    rc = RecursionConfig(strategy=strategy, n_recursions=n_r)
    assert _count(lambda: RecursiveTransformer(cfg, rc, rngs=nnx.Rngs(0))) == non_layer + n_blocks * per_layer
    if n_r == 1 and not strategy.startswith("middle_"):
        assert non_layer + n_blocks * per_layer == count_params(Config(model=cfg, train=TrainConfig(seq_len=64)))  # no sharing: the dense model


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


# --- equivalence with the vanilla Transformer ---------------------------------------------------

def _as_vanilla(rec: RecursiveTransformer) -> Transformer:
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
        src = jax.tree.map(np.array, p[j] if isinstance(j, str) else p["shared"][j])
        if rec.lora is not None and not isinstance(j, str):
            for name, delta in rec.lora[j].deltas(r).items():
                part = "attn" if name in ("wq", "wk", "wv", "wo") else "mlp"
                src[part][name] = src[part][name] + np.asarray(delta)
        out["blocks"][l] = src
    return nnx.merge(graphdef, out)


@pytest.mark.parametrize("strategy, n_layers, n_r, lora, tie", [
    ("middle_cycle", 4, 1, 0, False),
    ("cycle", 6, 3, 0, True),
    ("sequence", 6, 2, 0, False),
    ("middle_sequence", 8, 3, 2, True),
    ("middle_cycle", 6, 2, 3, False),
])
def test_equals_vanilla_transformer_with_copied_blocks(strategy, n_layers, n_r, lora, tie):
    """Without routing (and with recursion-wise KV), the recursive model IS the dense model whose
    layers repeat the shared blocks in the sharing map's order (with each recursion's LoRA)."""
    rec = _model(n_layers, seed=1, model_kw=dict(tie_embeddings=tie), strategy=strategy, n_recursions=n_r,
                 lora_rank=lora)
    if lora:
        _randomize_lora(rec, seed=2)
    dense = _as_vanilla(rec)
    tokens = _tokens(3, 2, 10)
    seg = jnp.asarray([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3], jnp.int32)
    want = np.asarray(jax.jit(lambda m, t, s: m(t, segment_ids=s)[0])(dense, tokens, seg))
    got, aux = _forward(rec, tokens, segment_ids=seg)
    assert aux == {}
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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


# --- compacted expert-choice forward against oracles -------------------------------------------

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


def _np_mor_topk(model, tokens_BxT, seg_BxT=None, caps=None, pos_BxT=None):
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
        pos = np.arange(t) if pos_BxT is None else np.asarray(pos_BxT[row])
        seg = np.ones(t, np.int64) if seg_BxT is None else np.asarray(seg_BxT[row])
        valid = seg != 0
        h = table[tokens_BxT[row]]
        if model.first is not None:
            h = _np_block(p["first"], h, pos, seg, cfg)[0]
        cand, first_keys = np.arange(t), {}
        for r, cap in enumerate(model.capacities if caps is None else caps):
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


def _masked_topk(model, tokens_BxT, segment_ids=None, positions=None):
    """The dense masked path with top-k decisions (same pieces as ``model.__call__``)."""
    b, t = tokens_BxT.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
    valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
    h = model.embed(tokens_BxT)
    auxes = []
    mask = AttentionMask.training(segment_ids)
    if model.first is not None:
        h = model._unique(model.first, h, pos, mask, auxes)
    h, aux = model._forward_masked(h, pos, segment_ids, valid, model._decider("topk"), auxes)
    if model.last is not None:
        h = model._unique(model.last, h, pos, mask, auxes)
    return model.logits(h), aux


def _both_paths(model, tokens, seg, pos):
    graphdef, state = nnx.split(model)

    def run(state):
        m = nnx.merge(graphdef, state)
        return m(tokens, positions=pos, segment_ids=seg, mode="topk"), _masked_topk(m, tokens, seg, pos)
    return jax.jit(run)(state)


# Packed documents; row 1 has 5 real tokens then padding, so some steps select padding as well.
SEG = np.asarray([[1] * 6 + [2] * 8 + [3] * 6, [1] * 3 + [2] * 2 + [0] * 15], np.int32)
# Positions restart per document; document 2 counts in steps of 3 so that RoPE sees positions,
# not indices (a per-document shift alone would not change any attention score).
DOC_POS = np.asarray([list(range(6)) + list(range(0, 24, 3)) + list(range(6)),
                      list(range(3)) + list(range(2)) + list(range(15))], np.int32)

ORACLE_CASES = {
    "middle-recursion-default-sigmoid": dict(n_layers=5, kv="recursion", seg=False, caps="", func="sigmoid"),
    "middle-share-default-tanh": dict(n_layers=5, kv="share", seg=False, caps="", func="tanh"),
    "middle-recursion-packed-custom-tanh": dict(n_layers=5, kv="recursion", seg=True, caps="1,0.5,0.25",
                                                func="tanh"),
    "middle-share-packed-docpositions-custom-sigmoid": dict(n_layers=5, kv="share", seg=True, caps="1,0.5,0.25",
                                                            func="sigmoid", doc_pos=True),
    "cycle-recursion-packed-step1routed-lora": dict(n_layers=6, kv="recursion", seg=True, caps="0.75,0.5,0.25",
                                                    func="sigmoid", lora=2),
    "cycle-share-step1routed-tanh-untied": dict(n_layers=6, kv="share", seg=False, caps="0.75,0.5,0.25",
                                                func="tanh", tie=False),
    # every step keeps every token: the compacted path skips its gather/scatter entirely
    "middle-share-packed-all-tokens": dict(n_layers=5, kv="share", seg=True, caps="1,1,1", func="sigmoid"),
}


def _oracle_model(case, seed=0):
    c = ORACLE_CASES[case] if isinstance(case, str) else case
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
    pos = DOC_POS if ORACLE_CASES[case].get("doc_pos") else None
    tokens = _tokens(11, 2, 20)
    (compact, aux), (masked, _) = _both_paths(model, jnp.asarray(tokens), seg,
                                              None if pos is None else jnp.asarray(pos))
    compact, masked = np.asarray(compact), np.asarray(masked)
    oracle = _np_mor_topk(model, tokens, None if seg is None else np.asarray(seg), pos_BxT=pos)
    valid = np.ones((2, 20), bool) if seg is None else np.asarray(seg) != 0
    np.testing.assert_allclose(compact[valid], oracle[valid], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(compact[valid], masked[valid], rtol=1e-4, atol=1e-4)
    # Each step kept k_r tokens of each row, padding last: the selected fractions say so.
    n_valid = valid.sum(1)
    for r, c in enumerate(model.capacities):
        k = max(1, int(c * 20 + 1e-9))
        assert float(aux[f"mor/selected_frac_r{r + 1}"]) == pytest.approx(np.minimum(k, n_valid).sum() / valid.sum())


def test_routing_is_not_a_no_op():
    """The oracle comparisons above would catch a wrong selection: the same weights with every
    token at every step give clearly different logits."""
    model, _ = _oracle_model("middle-recursion-default-sigmoid")
    tokens = _tokens(11, 2, 20)
    routed = _np_mor_topk(model, tokens)
    everyone = _np_mor_topk(model, tokens, caps=(1.0, 1.0, 1.0))
    assert np.abs(routed - everyone).max() > 1e-2


def test_compact_topk_gradients_equal_masked_topk():
    case = dict(n_layers=6, kv="share", seg=True, caps="0.75,0.5,0.25", func="tanh", lora=2)
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


# --- selection semantics -----------------------------------------------------------------------

def test_expert_choice_selection_semantics(monkeypatch):
    """Hand-set router (step r scores channel r of h) and recorded internals: each step keeps the
    k_r = max(1, int(c_r T)) highest logits among the previous step's survivors, in order, and
    leaves every other token's hidden state exactly as it was."""
    t, caps = 16, (0.75, 0.5, 0.25)
    model = _model(6, seed=4, strategy="cycle", n_recursions=3, routing="expert",
                   capacities=",".join(map(str, caps)), router_alpha=0.5)
    rng = np.random.default_rng(5)
    table = np.array(model.embed.table[...])
    table[:, 0] = rng.permutation(VOCAB) * 0.02 - 0.6  # distinct step-1 scores per token id
    model.embed.table[...] = jnp.asarray(table)
    model.router.w[...] = jnp.eye(3, 32, dtype=jnp.float32)
    tokens = np.stack([rng.choice(np.arange(1, VOCAB), t, replace=False) for _ in range(2)]).astype(np.int32)

    logits_seen, scatters = [], []
    orig_logits, orig_scatter = ExpertChoiceRouter.logits, routing.scatter_add_rows

    def rec_logits(self, step, x):
        out = orig_logits(self, step, x)
        logits_seen.append((step, x, out[0]))
        return out

    def rec_scatter(h, idx, upd):
        out = orig_scatter(h, idx, upd)
        scatters.append((h, idx, upd, out))
        return out

    monkeypatch.setattr(ExpertChoiceRouter, "logits", rec_logits)
    monkeypatch.setattr(routing, "scatter_add_rows", rec_scatter)
    graphdef, state = nnx.split(model)

    def run(state):
        del logits_seen[:], scatters[:]
        logits, aux = nnx.merge(graphdef, state)(jnp.asarray(tokens))
        return logits, aux, [(x, lg) for _, x, lg in logits_seen], scatters[:]

    logits, aux, seen, scat = jax.device_get(jax.jit(run)(state))
    assert [s for s, _, _ in logits_seen] == [0, 1, 2] and len(scat) == 3

    cand = np.broadcast_to(np.arange(t), (2, t))
    h_prev = None
    for r, ((x_c, logit), (h, idx, upd, out)) in enumerate(zip(seen, scat)):
        k = max(1, int(caps[r] * t))
        assert idx.shape == (2, k)
        if h_prev is not None:
            np.testing.assert_array_equal(h, h_prev)  # the steps chain
        for b in range(2):
            np.testing.assert_allclose(x_c[b], h[b, cand[b]], rtol=1e-6, atol=1e-6)  # router reads current h
            np.testing.assert_allclose(logit[b], x_c[b, :, r], rtol=1e-6, atol=1e-6)  # the hand-set router
            assert np.all(np.diff(idx[b]) > 0)  # sorted, distinct: causal order kept
            assert set(idx[b]) <= set(cand[b])  # hierarchical
            top = cand[b][np.argsort(-logit[b])[:k]]
            assert set(idx[b]) == set(top)
            if r == 0:  # step 1 scores are the hand-set table column: known from the token ids alone
                assert set(idx[b]) == set(np.argsort(-table[tokens[b], 0])[:k])
            rest = np.setdiff1d(np.arange(t), idx[b])
            np.testing.assert_array_equal(out[b, rest], h[b, rest])
            np.testing.assert_allclose(out[b, idx[b]], h[b, idx[b]] + upd[b], rtol=1e-6, atol=1e-6)
            assert np.abs(upd[b]).min(axis=-1).max() > 0
        sel_mask = np.stack([np.isin(cand[b], idx[b]) for b in range(2)])  # every step has k_r < candidates
        assert float(aux[f"mor/sampling_acc_r{r + 1}"]) == pytest.approx(np.mean((logit >= 0) == sel_mask))
        assert float(aux[f"mor/selected_frac_r{r + 1}"]) == pytest.approx(k / t)
        cand, h_prev = idx, out
    dead = 1 - len(set(cand[0]) | set(cand[1])) / t
    assert float(aux["mor/dead_token_ratio"]) == pytest.approx(dead)

    # From the outside: a token step 1 did not select keeps its embedding to the end (cycle has no
    # unique layers), so its logits are those of its bare embedding; selected tokens' are not.
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(state))
    for b in range(2):
        bare = _np_rms(table[tokens[b]], p["final_norm"]["scale"], model.cfg.norm_eps) @ table.T
        skipped = np.setdiff1d(np.arange(t), scat[0][1][b])
        assert len(skipped) == t - int(0.75 * t)
        np.testing.assert_allclose(logits[b, skipped], bare[skipped], rtol=1e-5, atol=1e-5)
        assert np.abs(logits[b, scat[0][1][b]] - bare[scat[0][1][b]]).max() > 1e-3


def test_softmax_router_has_no_causal_decoding():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _model(5, strategy="middle_cycle", n_recursions=3,
                                                                 routing="expert", router_func="softmax")))

    def shapes(fn):  # traces without computing anything
        return jax.eval_shape(lambda s, t: fn(nnx.merge(graphdef, s), t), abstract, jnp.zeros((2, 8), jnp.int32))

    logits, aux = shapes(lambda m, t: m(t))  # top-k training is fine
    assert logits.shape == (2, 8, VOCAB) and "mor/sampling_acc_r2" in aux
    with pytest.raises(ValueError, match="softmax"):
        shapes(lambda m, t: m(t, mode="threshold"))
    with pytest.raises(ValueError, match="softmax"):
        shapes(lambda m, t: m.extend(t, m.init_cache(2, 8)))


# --- FLOPs -------------------------------------------------------------------------------------

def _compiled_flops(model, t: int, mode: str) -> float:
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, t), jnp.int32)
    cost = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, mode=mode)[0]).lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_compiled_flops_shrink_with_capacity_only_on_the_compacted_path():
    t = 64
    flops = {}
    for caps, mode in [("1,1,1", "topk"), ("1,0.5,0.5", "topk"), ("1,0.5,0.25", "topk"),
                       ("1,1,1", "threshold"), ("1,0.5,0.25", "threshold")]:
        model = _model(6, strategy="cycle", n_recursions=3, routing="expert", capacities=caps,
                       model_kw=dict(max_seq_len=t))
        flops[caps, mode] = _compiled_flops(model, t, mode)
    full, half, quarter = flops["1,1,1", "topk"], flops["1,0.5,0.5", "topk"], flops["1,0.5,0.25", "topk"]
    assert quarter < half < full
    assert quarter < 0.8 * full  # capacities summing to 1.75 of 3
    # Dropping the last step from 0.5 to 0.25 saves far less than dropping steps 2-3 from 1 to 0.5
    # (1/4 of the token-steps for the matmuls, less still for attention, which scales with c^2).
    assert 3.0 < (full - half) / (half - quarter) < 10.0
    # The dense masked path computes every token at every step whatever the capacities.
    thr_full, thr_quarter = flops["1,1,1", "threshold"], flops["1,0.5,0.25", "threshold"]
    assert thr_quarter >= 0.98 * thr_full
    assert thr_full >= 0.95 * full


# --- training integration ----------------------------------------------------------------------

def _train_setup(**rc):
    cfg = Config(model=_cfg(5, max_seq_len=32),
                 train=TrainConfig(steps=10, warmup_steps=0, lr=1e-2, schedule="constant", batch_size=4, seq_len=16),
                 recursion=RecursionConfig(strategy="middle_cycle", n_recursions=3, **rc))
    graphdef, state = nnx.split(build_model(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(cfg.train, params)
    return cfg, graphdef, params, tx


def _train_batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(4, 17)).astype(np.int32)
    # 61 valid inputs (prime, so no depth load can equal the mean 1/3 exactly)
    seg = np.array([[1] * 17, [1] * 9 + [2] * 8, [1] * 14 + [0] * 3, [1] * 15 + [0] * 2], np.int32)
    assert (seg[:, :-1] != 0).sum() == 61
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg)}


def test_train_step_expert_choice():
    _, graphdef, params, tx = _train_setup(routing="expert")
    step = jax.jit(make_train_step(graphdef, tx))
    state, m = step(init_state(params, tx), _train_batch(0))
    m = jax.device_get(m)
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and int(state["nonfinite_step"]) == -1
    for key in ("mor/sampling_acc_r2", "mor/sampling_acc_r3", "loss/router_bce_r2", "loss/router_bce_r3",
                "mor/router_bce_r2", "mor/dead_token_ratio", "mor/selected_frac_r1", "mor/selected_frac_r3"):
        assert key in m, key
    assert "mor/sampling_acc_r1" not in m  # step 1 has capacity 1: nothing to choose
    assert 0.0 <= m["mor/sampling_acc_r2"] <= 1.0
    assert m["loss/router_bce_r2"] == pytest.approx(1e-3 * m["mor/router_bce_r2"], rel=1e-5)
    aux_losses = sum(v for k, v in m.items() if k.startswith("loss/"))
    assert m["objective"] == pytest.approx(m["loss"] + aux_losses, rel=1e-5)
    moved = np.abs(np.asarray(state["params"]["router"]["w"]) - np.asarray(params["router"]["w"]))
    assert moved.min(axis=1).max() > 0  # the router trains (through the gates and the BCE)


def test_train_step_token_choice_loss_free():
    cfg, graphdef, params, tx = _train_setup(routing="token", balance="loss_free")
    step = jax.jit(make_train_step(graphdef, tx))
    state = init_state(params, tx)
    rate = cfg.recursion.bias_update_rate
    for i in range(2):
        bias_before = np.asarray(state["params"]["router"]["bias"])
        state, m = step(state, _train_batch(i))
        m = jax.device_get(m)
        assert np.isfinite(m["loss"]) and "state_deltas" not in m
        assert "mor/max_violation" in m and "mor/assignment_entropy" in m
        load = np.asarray([m[f"mor/load_depth{d}"] for d in (1, 2, 3)], np.float32)
        assert load.sum() == pytest.approx(1.0, abs=1e-6)
        assert m["mor/max_violation"] == pytest.approx((load.max() - load.mean()) / load.mean(), rel=1e-5)
        bias_after = np.asarray(state["params"]["router"]["bias"])
        # No gradient reaches the bias (it only moves the argmax): the loss-free rule alone moves it.
        expected = np.float32(rate) * np.sign(load.mean() - load)
        assert np.all(expected != 0)
        if i == 0:
            np.testing.assert_array_equal(bias_after - bias_before, expected)
        np.testing.assert_allclose(bias_after - bias_before, expected, rtol=1e-5, atol=0)
        assert "loss/balance" not in m and m["objective"] == pytest.approx(m["loss"], rel=1e-6)

"""Vanilla -> (Relaxed) Recursive Transformer conversion (Bae et al., 2024, arXiv 2410.20672):
each looped-layer initialisation against hand-written layer tables, exact reproduction at
N_r = 1 and with full-rank SVD LoRA, the truncated-SVD error at small rank, and the errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.config import ModelConfig, RecursionConfig
from jaxeff.models.recursive import RecursiveTransformer
from jaxeff.models.recursive_convert import convert_from_vanilla, convert_transformer, svd_lora_factors
from jaxeff.models.transformer import Transformer
from jaxeff.nn import Block
from jaxeff.nn.lora import fan_in_out


# the weights a block's LoRA relaxes, as the modules report them
TARGETS = nnx.eval_shape(lambda: Block(ModelConfig(vocab_size=61, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2,
                                                   d_ff=64, max_seq_len=64), rngs=nnx.Rngs(0))).lora_targets()
NAMES = tuple(TARGETS)

def _cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _vanilla(cfg: ModelConfig, seed: int = 0, *, tie_norms_from: int | None = None) -> Transformer:
    """A vanilla model whose every leaf (norm scales included) is perturbed, so no two layers agree.
    ``tie_norms_from=l`` gives layers l..L-2 the same norm scales (what LoRA cannot relax)."""
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0.0, 0.1 if x.ndim == 1 else 0.03, x.shape)
                          .astype(np.float32), nnx.to_pure_dict(state))
    if tie_norms_from is not None:
        for l in range(tie_norms_from + 1, cfg.n_layers - 1):
            for norm in ("attn_norm", "mlp_norm"):
                params["blocks"][l][norm] = params["blocks"][tie_norms_from][norm]
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model))


def _template(cfg, rcfg, seed=1):
    return _params(RecursiveTransformer(cfg, rcfg, rngs=nnx.Rngs(seed)))


@nnx.jit
def _jit_logits(model, tokens):
    return model(tokens)[0]


def _logits(model, tokens):
    return np.asarray(_jit_logits(model, tokens))


def _tokens(cfg, seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 12), 0, cfg.vocab_size)


# --- looped-layer initialisation (section 3.1) ---------------------------------------------------

# (strategy, n_recursions, {init: vanilla layers averaged into shared block j, for each j}) at L = 6.
LAYER_TABLES = [
    ("cycle", 2, {"stepwise": [[0], [2], [5]], "average": [[0, 3], [1, 4], [2, 5]], "lower": [[0], [1], [2]]}),
    ("cycle", 3, {"stepwise": [[0], [5]], "average": [[0, 2, 4], [1, 3, 5]], "lower": [[0], [1]]}),
    ("sequence", 2, {"stepwise": [[0], [2], [5]], "average": [[0, 1], [2, 3], [4, 5]], "lower": [[0], [1], [2]]}),
    ("sequence", 3, {"stepwise": [[0], [5]], "average": [[0, 1, 2], [3, 4, 5]], "lower": [[0], [1]]}),
    ("middle_cycle", 2, {"stepwise": [[1], [4]], "average": [[1, 3], [2, 4]], "lower": [[1], [2]]}),
    ("middle_sequence", 2, {"stepwise": [[1], [4]], "average": [[1, 2], [3, 4]], "lower": [[1], [2]]}),
]


@pytest.mark.parametrize("strategy,n_r,table", LAYER_TABLES)
def test_shared_blocks_follow_the_layer_tables(strategy, n_r, table):
    cfg = _cfg(tie_embeddings=False)
    routing = "expert" if strategy.endswith("cycle") else "none"
    rcfg = RecursionConfig(strategy=strategy, n_recursions=n_r, routing=routing)
    vanilla = _np(_params(_vanilla(cfg)))
    template = _template(cfg, rcfg)
    template_before = _np(template)
    for init, sources in table.items():
        out = convert_from_vanilla(vanilla, template, cfg, rcfg, init=init)
        assert jax.tree.structure(out) == jax.tree.structure(template)
        assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, template)
        for j, layers in enumerate(sources):
            want = jax.tree.map(lambda *ws: np.mean(np.stack(ws), axis=0), *[vanilla["blocks"][l] for l in layers])
            close = partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
            jax.tree.map(close, _np(out["shared"][j]), want)
        for name in ("embed", "final_norm", "lm_head"):
            jax.tree.map(np.testing.assert_array_equal, _np(out[name]), vanilla[name])
        if strategy.startswith("middle_"):
            jax.tree.map(np.testing.assert_array_equal, _np(out["first"]), vanilla["blocks"][0])
            jax.tree.map(np.testing.assert_array_equal, _np(out["last"]), vanilla["blocks"][5])
        if routing != "none":  # routers have no pretrained counterpart: they keep the fresh values
            jax.tree.map(np.testing.assert_array_equal, _np(out["router"]), template_before["router"])
    jax.tree.map(np.testing.assert_array_equal, _np(template), template_before)  # not mutated


def test_bfloat16_params_keep_their_dtype():
    cfg = _cfg(n_layers=4, param_dtype="bfloat16")
    rcfg = RecursionConfig(strategy="middle_cycle", n_recursions=2, lora_rank=4)
    vanilla = _params(_vanilla(cfg))
    template = _template(cfg, rcfg)
    out = convert_from_vanilla(vanilla, template, cfg, rcfg, init="average")
    assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_one_recursion_reproduces_the_vanilla_model(init):
    cfg = _cfg(n_layers=5)
    vanilla = _vanilla(cfg)
    model = convert_transformer(vanilla, RecursionConfig(strategy="cycle", n_recursions=1), init=init)
    tokens = _tokens(cfg)
    np.testing.assert_allclose(_logits(model, tokens), _logits(vanilla, tokens), rtol=1e-5, atol=1e-5)


# --- SVD initialisation of LoRA (section 3.2) ----------------------------------------------------

@pytest.mark.parametrize("init", ["average", "stepwise"])
def test_full_rank_svd_lora_reproduces_the_vanilla_model(init):
    # Full rank: min(fan_in, fan_out) is at most d_model for every target (wk/wv: 16, zero-padded).
    cfg = _cfg()
    vanilla = _vanilla(cfg, tie_norms_from=1)  # LoRA relaxes the matrices, not the norm scales
    tokens = _tokens(cfg)
    want = _logits(vanilla, tokens)
    relaxed = convert_transformer(vanilla, RecursionConfig(strategy="middle_cycle", n_recursions=2,
                                                           lora_rank=cfg.d_model), init=init)
    np.testing.assert_allclose(_logits(relaxed, tokens), want, rtol=1e-4, atol=1e-4)
    tied_only = convert_transformer(vanilla, RecursionConfig(strategy="middle_cycle", n_recursions=2), init=init)
    assert np.abs(_logits(tied_only, tokens) - want).max() > 1e-2  # so the check above means something


@pytest.mark.parametrize("strategy,n_r", [("cycle", 3), ("middle_sequence", 2)])
def test_small_rank_svd_is_the_truncated_svd_of_the_residual(strategy, n_r):
    cfg, rank = _cfg(), 3
    rcfg = RecursionConfig(strategy=strategy, n_recursions=n_r, lora_rank=rank)
    vanilla = _np(_params(_vanilla(cfg)))
    out = _np(convert_from_vanilla(vanilla, _template(cfg, rcfg), cfg, rcfg, init="average"))
    offset = 1 if strategy.startswith("middle_") else 0
    u = (cfg.n_layers - 2 * offset) // n_r
    for j in range(u):
        for r in range(n_r):
            layer = offset + (j + r * u if strategy.endswith("cycle") else j * n_r + r)
            for name, (module, shape, n_in) in TARGETS.items():
                w_shared = out["shared"][j][module][name]
                fin, fout = fan_in_out(shape, n_in)
                residual = (vanilla["blocks"][layer][module][name] - w_shared).reshape(fin, fout).astype(np.float64)
                delta = out["lora"][j][f"{name}_a"][r] @ out["lora"][j][f"{name}_b"][r]
                u_, s, vt = np.linalg.svd(residual, full_matrices=False)
                best = (u_[:, :rank] * s[:rank]) @ vt[:rank]
                np.testing.assert_allclose(delta, best, atol=1e-5)
                np.testing.assert_allclose(np.linalg.norm(residual - delta), np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-4)


def test_svd_factors_split_the_singular_values_evenly():
    r_IxO = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    a, b = svd_lora_factors(r_IxO, 8)  # rank above min(I, O): exact, zero-padded
    assert a.shape == (7, 8) and b.shape == (8, 5)
    np.testing.assert_allclose(a @ b, r_IxO, atol=1e-5)
    np.testing.assert_array_equal(a[:, 5:], 0)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0)[:5], np.linalg.norm(b, axis=1)[:5], rtol=1e-5)


def test_zero_lora_init_keeps_a_and_zeroes_b():
    cfg = _cfg()
    rcfg = RecursionConfig(strategy="middle_cycle", n_recursions=2, lora_rank=4)
    template = _template(cfg, rcfg)
    out = convert_from_vanilla(_params(_vanilla(cfg)), template, cfg, rcfg, lora_init="zero")
    for j in out["lora"]:
        for name in NAMES:
            lora, fresh = _np(out["lora"][j]), _np(template["lora"][j])
            np.testing.assert_array_equal(lora[f"{name}_a"], fresh[f"{name}_a"])
            np.testing.assert_array_equal(lora[f"{name}_b"], 0)


# --- errors --------------------------------------------------------------------------------------

def test_unknown_init_or_lora_init_is_named():
    cfg = _cfg()
    rcfg = RecursionConfig(strategy="cycle", n_recursions=2, lora_rank=2)
    vanilla, template = _params(_vanilla(cfg)), _template(cfg, rcfg)
    with pytest.raises(ValueError, match="init must be one of.*'middle'"):
        convert_from_vanilla(vanilla, template, cfg, rcfg, init="middle")
    with pytest.raises(ValueError, match="lora_init must be one of.*'pissa'"):
        convert_from_vanilla(vanilla, template, cfg, rcfg, lora_init="pissa")


@pytest.mark.parametrize("vanilla_overrides,field", [
    (dict(n_layers=4), "n_layers"), (dict(d_model=48), "d_model"), (dict(vocab_size=67), "vocab_size"),
    (dict(d_ff=96), "d_ff"), (dict(tie_embeddings=False), "tie_embeddings"),
])
def test_mismatched_configs_are_named(vanilla_overrides, field):
    cfg = _cfg()
    rcfg = RecursionConfig(strategy="middle_sequence", n_recursions=2)
    vanilla = _params(Transformer(_cfg(**vanilla_overrides), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=field):
        convert_from_vanilla(vanilla, _template(cfg, rcfg), cfg, rcfg)


@pytest.mark.slow
def test_convert_run_from_a_dense_checkpoint(tmp_path):
    """A trained dense run's checkpoint converts; with N_r = 1 it computes the same logits."""
    from jaxeff.config import get_preset
    from jaxeff.train import convert_run, restore_run, train

    cfg = get_preset("tiny").override([
        f"run_dir={tmp_path / 'dense'}", "train.steps=2", "train.warmup_steps=1", "train.ckpt_every=2",
        "train.eval_every=2", "train.eval_batches=1", "train.sample_tokens=0", "model.n_layers=3",
        "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64", "data.tokenizer=byte",
        "model.vocab_size=258", "train.batch_size=8", "train.seq_len=32", "model.max_seq_len=32"])
    train(cfg, verbose=False)
    _, graphdef, params, _ = restore_run(str(tmp_path / "dense"))
    dense = nnx.merge(graphdef, params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (2, 16)), jnp.int32)
    same = convert_run(str(tmp_path / "dense"), RecursionConfig(strategy="cycle", n_recursions=1))
    np.testing.assert_allclose(np.asarray(same(tokens)[0]), np.asarray(dense(tokens)[0]), atol=1e-5)
    mor = convert_run(str(tmp_path / "dense"), RecursionConfig(strategy="middle_cycle", n_recursions=1,
                                                               routing="expert"), init="average")
    assert mor(tokens)[0].shape == (2, 16, 258)
    with pytest.raises(ValueError, match="n_recursions"):
        convert_run(str(tmp_path / "dense"), RecursionConfig(strategy="cycle", n_recursions=2))

    # Uptraining through the loop: recursion.init_from starts the run from the converted weights
    # (and the dense run's tokenizer); with N_r = 1 and a negligible step it scores like the dense run.
    dense_val = train(cfg, verbose=False)["val_loss"]  # finished run: reports its validation loss
    up = cfg.override([f"run_dir={tmp_path / 'up'}", "train.steps=1", "train.warmup_steps=0", "train.lr=1e-12",
                       "recursion.strategy=cycle", f"recursion.init_from={tmp_path / 'dense'}"])
    assert train(up, verbose=False)["val_loss"] == pytest.approx(dense_val, abs=1e-4)
    with pytest.raises(FileNotFoundError, match="init_from"):
        train(up.override([f"run_dir={tmp_path / 'up2'}", f"recursion.init_from={tmp_path / 'nowhere'}"]),
              verbose=False)

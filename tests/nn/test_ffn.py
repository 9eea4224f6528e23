"""The FFN seam: make_ffn, the (y, aux) contract, aux collected from every layer into the
model's aux (losses summed, metrics averaged), LoRA targets and FLOP counts asked of the
module, and the fused SwiGLU as a config field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxeff.nn.ffn as ffn_mod
from jaxeff import ModelConfig, RecursionConfig, RecursiveTransformer, Transformer
from jaxeff.nn import Block, SwiGLU, ffn_matmul_params, make_ffn, merge_layer_aux, register_ffn

CFG = ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=32)


class ScaledFFN(nnx.Module):
    """A test FFN: a SwiGLU whose aux reports a loss and a metric that depend on its layer."""

    def __init__(self, cfg, layer, rngs):
        self.inner = SwiGLU(cfg.d_model, cfg.d_ff, std=0.02, out_std=0.02, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, rngs=rngs)
        self.layer = layer

    def lora_targets(self):
        return {"w_up": (self.inner.w_up.shape, 1)}

    def __call__(self, x, lora=None):
        y, _ = self.inner(x)
        return y, {"loss/test": jnp.asarray(float(self.layer + 1)), "test/metric": jnp.asarray(float(self.layer))}


@pytest.fixture
def scaled_kind(monkeypatch):
    register_ffn("scaled", lambda cfg, layer, rngs: ScaledFFN(cfg, layer, rngs), lambda cfg, layer: 7.0 * layer)
    monkeypatch.setattr(ffn_mod, "ffn_kind", lambda cfg, layer: "scaled" if layer > 0 else "swiglu")
    yield
    del ffn_mod.FFN_KINDS["scaled"]


def test_make_ffn_builds_swiglu_and_rejects_unknown_kinds(monkeypatch):
    assert isinstance(make_ffn(CFG, 0, nnx.Rngs(0)), SwiGLU)
    assert ffn_matmul_params(CFG, 0) == 3 * 16 * 32
    monkeypatch.setattr(ffn_mod, "ffn_kind", lambda cfg, layer: "moe?")
    with pytest.raises(ValueError, match="unknown FFN kind 'moe\\?' for layer 2"):
        make_ffn(CFG, 2, nnx.Rngs(0))


def test_merge_layer_aux_sums_losses_and_averages_metrics():
    out = merge_layer_aux([{"loss/a": 1.0, "m": 2.0}, {"loss/a": 3.0, "m": 4.0, "n": 5.0}, {}])
    assert out == {"loss/a": 4.0, "m": 3.0, "n": 5.0}


def test_layer_aux_reaches_the_model_aux(scaled_kind):
    """Per-layer FFN kinds (dense first layer) and their aux collected by both model kinds."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    dense = Transformer(CFG, rngs=nnx.Rngs(0))
    assert isinstance(dense.blocks[0].mlp, SwiGLU) and isinstance(dense.blocks[1].mlp, ScaledFFN)
    _, aux = dense(tokens)
    assert float(aux["loss/test"]) == 2 + 3 and float(aux["test/metric"]) == 1.5
    assert ffn_matmul_params(CFG, 2) == 14.0
    mor = RecursiveTransformer(CFG, RecursionConfig(strategy="middle_cycle", n_recursions=1), rngs=nnx.Rngs(0))
    _, aux = mor(tokens)
    assert float(aux["loss/test"]) == 2 + 3  # the shared block (layer 1) and the last layer (2)
    # LoRA targets come from the modules: the test FFN names only w_up
    assert set(Block(CFG, 1, rngs=nnx.Rngs(0)).lora_targets()) == {"wq", "wk", "wv", "wo", "w_up"}


def test_swiglu_fused_is_a_config_field_with_equal_outputs():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 8)), jnp.int32)
    plain = Transformer(CFG, rngs=nnx.Rngs(1))
    fused = Transformer(ModelConfig(**{**CFG.__dict__, "swiglu_fused": True}), rngs=nnx.Rngs(1))
    assert fused.blocks[0].mlp.fuse_gate_up and not plain.blocks[0].mlp.fuse_gate_up
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, t: m(t)[0])(fused, tokens)),
                               np.asarray(jax.jit(lambda m, t: m(t)[0])(plain, tokens)), rtol=1e-5, atol=1e-5)

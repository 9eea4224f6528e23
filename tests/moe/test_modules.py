"""The MoE FFN modules inside jaxeff models: per-layer kinds from the config (``--set moe.*``),
each kind training a tiny model whose loss falls, BlockFFN inside a Mixture-of-Recursions model,
the batch context (packed documents reach the locality loss), the chunk-sparse kernel as the
BlockFFN's inference path, FLOP counts of active parameters, and clear errors for bad settings."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxeff
from jaxeff.config import Config, ModelConfig, MoEConfig, get_preset
from jaxeff.moe import BlockFFN, ReMoE, TopKMoE, context, losses
from jaxeff.nn import SwiGLU, ffn_matmul_params
from jaxeff.train import train

CFG = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


def model_cfg(**moe) -> ModelConfig:
    return ModelConfig(**CFG, moe=MoEConfig(**{"n_experts": 8, "expert_dim": 8, **moe}))


def losses_of(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


def test_the_config_picks_the_ffn_of_each_layer():
    m = jaxeff.Transformer(model_cfg(kind="blockffn", dense_layers=(0,)), rngs=nnx.Rngs(0))
    assert isinstance(m.blocks[0].mlp, SwiGLU) and all(isinstance(b.mlp, BlockFFN) for b in m.blocks[1:])
    assert isinstance(jaxeff.Transformer(model_cfg(kind="topk"), rngs=nnx.Rngs(0)).blocks[0].mlp, TopKMoE)
    remoe = jaxeff.Transformer(model_cfg(kind="remoe"), rngs=nnx.Rngs(0)).blocks[2].mlp
    assert isinstance(remoe, ReMoE) and remoe.w_gate is None
    gated = jaxeff.Transformer(model_cfg(kind="blockffn", gated_experts=True), rngs=nnx.Rngs(0)).blocks[0].mlp
    assert gated.w_gate.shape == (8, 32, 8)
    assert all(isinstance(b.mlp, SwiGLU) for b in jaxeff.Transformer(ModelConfig(**CFG), rngs=nnx.Rngs(0)).blocks)


def test_set_moe_is_an_alias_of_model_moe_and_config_json_keeps_it():
    cfg = get_preset("tiny").override(["moe.kind=blockffn", "moe.n_experts=16", "model.moe.dense_layers=0",
                                       "moe.cs_coef=0.1"])
    assert cfg.model.moe == MoEConfig(kind="blockffn", n_experts=16, dense_layers=(0,), cs_coef=0.1)
    d = json.loads(cfg.to_json())
    assert d["model"]["moe"]["kind"] == "blockffn" and d["model"]["moe"]["dense_layers"] == [0]
    assert Config.from_dict(d) == cfg
    del d["model"]["moe"]  # a config.json written before the moe section
    assert Config.from_dict(d).model.moe == MoEConfig()
    assert get_preset("tiny").override(["moe.dense_layers=0,2"]).model.moe.dense_layers == (0, 2)


@pytest.mark.parametrize("setting, match", [
    ("moe.kind=switch", r"MoEConfig.kind: must be one of"),
    ("moe.top_k=9", r"MoEConfig.top_k: must be <= n_experts=8"),
    ("moe.cs_chunk_len=0", r"MoEConfig.cs_chunk_len"),
    ("moe.n_experts=0", r"MoEConfig.n_experts"),
    ("moe.dense_layers=4", r"MoEConfig.dense_layers: layer 4 does not exist"),
    ("moe.dense_layers=-1", r"MoEConfig.dense_layers"),
    ("moe.capacity_factor=-1", r"MoEConfig.capacity_factor"),
    ("moe.chunk_kernel=portable", r"MoEConfig.chunk_kernel: applies to kind='blockffn'"),
    ("moe.remoe_alpha=1", r"MoEConfig.remoe_alpha"),
    ("moe.color=red", r"MoEConfig has no field 'color'"),
])
def test_bad_settings_name_the_field(setting, match):
    with pytest.raises(ValueError, match=match):
        get_preset("tiny").override(["moe.kind=topk", "moe.n_experts=8", setting])


def test_flops_count_active_parameters():
    cfg = model_cfg(kind="topk", top_k=2, dense_layers=(0,))
    assert ffn_matmul_params(cfg, 0) == 3 * 32 * 64  # the dense layer
    assert ffn_matmul_params(cfg, 1) == 32 * 8 + 2 * (2 * 32 * 8)  # router + 2 non-gated experts
    assert ffn_matmul_params(model_cfg(kind="blockffn", top_k=3, gated_experts=True), 1) == 32 * 8 + 3 * (3 * 32 * 8)


@pytest.mark.parametrize("kind, extra", [
    ("blockffn", ()), ("topk", ()), ("topk", ("moe.capacity_factor=1.5",)), ("remoe", ())])
@pytest.mark.slow
def test_each_kind_trains_and_its_loss_falls(train_cfg, kind, extra):
    cfg = train_cfg(f"moe.kind={kind}", "moe.n_experts=4", "moe.expert_dim=16", "model.n_layers=2",
                    "moe.dense_layers=0", "train.steps=8", *extra)
    out = train(cfg, verbose=False)
    recs = losses_of(cfg_dir(cfg))
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3, [r["loss"] for r in recs]
    assert np.isfinite(out["val_loss"])
    assert "moe/tls" in recs[-1] and "moe/cls8" in recs[-1]  # logged in metrics.jsonl
    if kind == "blockffn":
        assert {"loss/moe_al", "loss/moe_cs", "sched/moe_cs"} <= set(recs[-1])
    if kind == "remoe":
        assert recs[-1]["sched/remoe_l1"] > recs[0]["sched/remoe_l1"]  # sparsity below target: lambda grows


def cfg_dir(cfg):
    return Path(cfg.resolved_run_dir)


@pytest.mark.slow
def test_blockffn_inside_a_mixture_of_recursions_model_trains(train_cfg):
    cfg = train_cfg("moe.kind=blockffn", "moe.n_experts=4", "moe.expert_dim=16", "model.n_layers=3",
                    "recursion.strategy=middle_cycle", "recursion.n_recursions=1", "recursion.routing=expert",
                    "recursion.capacities=0.5", "train.steps=8")
    out = train(cfg, verbose=False)
    recs = losses_of(cfg_dir(cfg))
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3
    assert np.isfinite(out["val_loss"]) and "moe/tls" in recs[-1]
    # the shared block saw a gathered half of the tokens: no segment ids for it, still a loss
    assert recs[-1]["loss/moe_cs"] > 0


def test_the_batch_context_brings_packed_documents_to_the_losses():
    cfg = model_cfg(kind="blockffn")
    ffn = BlockFFN(cfg, 0, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 32))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0], [3] * 8])
    _, plain = ffn(x)
    with context.batch_context(segment_ids=seg, coefs={"moe_cs": jnp.float32(0.5)}):
        _, packed = ffn(x)
        _, other = ffn(x[:, :4])  # another length (a gathered subset): no segment ids
    a0 = jnp.einsum("btd,de->bte", x, ffn.w_router[...])
    n_layers = 3
    want = float(losses.activation_locality_loss(a0, segment_ids_BxT=seg))
    assert float(packed["moe/al_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(plain["moe/al_loss"]) == pytest.approx(float(losses.activation_locality_loss(a0)), rel=1e-5)
    assert float(packed["loss/moe_cs"]) == pytest.approx(0.5 * float(packed["moe/cs_loss"]) / n_layers, rel=1e-5)
    assert float(plain["loss/moe_cs"]) == pytest.approx(5e-2 * float(plain["moe/cs_loss"]) / n_layers, rel=1e-5)
    assert float(other["moe/al_loss"]) == pytest.approx(float(losses.activation_locality_loss(a0[:, :4])), rel=1e-5)


@pytest.mark.parametrize("impl", ["reference", "portable"])
def test_the_chunk_sparse_kernel_serves_prefill_and_decoding(impl):
    dense = jaxeff.Transformer(model_cfg(kind="blockffn"), rngs=nnx.Rngs(0))
    sparse = jaxeff.Transformer(model_cfg(kind="blockffn", chunk_kernel=impl, chunk_len=4), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
    np.testing.assert_allclose(np.asarray(sparse(tokens)[0]), np.asarray(dense(tokens)[0]), atol=1e-5, rtol=1e-5)
    out_dense = jaxeff.generate(dense, [[1, 2, 3], [4, 5]], max_new_tokens=4, temperature=0)
    out_sparse = jaxeff.generate(sparse, [[1, 2, 3], [4, 5]], max_new_tokens=4, temperature=0)
    assert out_dense == out_sparse

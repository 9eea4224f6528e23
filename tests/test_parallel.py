"""Meshes and logical sharding rules, and the headline property: training on any mesh layout gives
the single-device result (8 simulated CPU devices from conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxeff.config import Config, MeshConfig, ModelConfig, TrainConfig
from jaxeff.parallel import LOGICAL_RULES, batch_sharding, constrain, logical_to_spec, make_mesh, state_shardings
from jaxeff.train import make_optimizer, make_train_step
from jaxeff.models import abstract_model
from jaxeff.train.loop import init_params
from jaxeff.train.step import init_state

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (JAX_NUM_CPU_DEVICES=8)")

MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}


def test_conftest_gives_eight_cpu_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("axes, shape, mesh_shape, expected", [
    (("embed", "mlp"), (32, 64), MESH_222, P("fsdp", "tensor")),
    (("mlp", "embed"), (64, 32), MESH_222, P("tensor", "fsdp")),
    (("embed", "heads", "head_dim"), (32, 4, 8), MESH_222, P("fsdp", "tensor", None)),
    (("vocab", "embed"), (260, 32), {"data": 2, "fsdp": 1, "tensor": 4}, P("tensor", None)),
    # divisibility fallback: 258 % 4 != 0 and 33 % 2 != 0 leave those dimensions replicated
    (("vocab", "embed"), (258, 33), {"data": 1, "fsdp": 2, "tensor": 4}, P(None, None)),
    (("embed", "mlp"), (33, 64), MESH_222, P(None, "tensor")),
    # batch takes data then fsdp; only the prefix whose product divides the dimension is kept
    (("batch", "seq"), (8, 16), {"data": 2, "fsdp": 4, "tensor": 1}, P(("data", "fsdp"), None)),
    (("batch", "seq"), (6, 16), {"data": 2, "fsdp": 4, "tensor": 1}, P("data", None)),
    (("batch", "seq"), (3, 16), {"data": 2, "fsdp": 4, "tensor": 1}, P(None, None)),
    # size-1 mesh axes are never named
    (("embed", "mlp"), (32, 64), {"data": 8, "fsdp": 1, "tensor": 1}, P(None, None)),
    # a mesh axis is used at most once per array: 'heads' takes tensor, 'mlp' cannot
    (("heads", "mlp"), (4, 64), MESH_222, P("tensor", None)),
    (("batch", "embed"), (8, 32), MESH_222, P(("data", "fsdp"), None)),
    ((None, "norm"), (5, 32), MESH_222, P(None, None)),
])
def test_logical_to_spec(axes, shape, mesh_shape, expected):
    assert logical_to_spec(axes, shape, mesh_shape) == expected


def test_logical_to_spec_never_reuses_a_mesh_axis():
    rules = {"a": ("tensor", "fsdp"), "b": ("fsdp", "tensor"), "c": ("tensor",)}
    spec = logical_to_spec(("a", "b", "c"), (8, 8, 8), {"data": 1, "fsdp": 2, "tensor": 2}, rules)
    assert spec == P(("tensor", "fsdp"), None, None)
    named = [a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))]
    assert len(named) == len(set(named))


def test_logical_to_spec_errors():
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_to_spec(("nonsense",), (4,), MESH_222)
    with pytest.raises(ValueError, match="do not match array rank"):
        logical_to_spec(("embed",), (4, 4), MESH_222)
    assert set(LOGICAL_RULES) >= {"batch", "vocab", "embed", "heads", "kv_heads", "mlp", "head_dim", "norm", "expert"}
    assert logical_to_spec(("expert", "embed", "mlp"), (8, 16, 32), {"expert": 4, "fsdp": 2, "tensor": 2}) == \
        P("expert", "fsdp", "tensor")


def test_make_mesh():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor") and mesh.devices.shape == (2, 2, 1, 2)
    moe = make_mesh(MeshConfig(data=2, expert=4))
    assert dict(zip(moe.axis_names, moe.devices.shape)) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    one = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    assert one.size == 1
    with pytest.raises(ValueError, match="do not divide"):
        make_mesh(MeshConfig(data=3))


def test_batch_sharding_and_constrain():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)
    assert batch_sharding(mesh, 3).spec == P(("data", "fsdp", "expert"), None, None)
    x = jnp.ones((8, 6))
    assert constrain(x, ("batch", "vocab")) is x  # no mesh set: a no-op
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "mlp")))(x)
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 6)))


def _cfg(**train_kw) -> Config:
    # Heads, kv heads, d_ff, vocab and d_model all divisible by 4.
    model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=64, max_seq_len=32,
                        tie_embeddings=False, head_dim=8)
    train = TrainConfig(**{**dict(steps=10, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=0,
                                  schedule="constant"), **train_kw})
    return Config(model=model, train=train)


def test_state_shardings_follow_the_rules():
    cfg = _cfg()
    _, abstract = abstract_model(cfg)
    sh = state_shardings(abstract, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    blk = sh["blocks"][0]
    assert blk["mlp"]["w_gate"].spec == P("fsdp", "tensor")
    assert blk["mlp"]["w_down"].spec == P("tensor", "fsdp")
    assert blk["attn"]["wq"].spec == P("fsdp", "tensor", None)
    assert blk["attn"]["wk"].spec == P("fsdp", "tensor", None)
    assert blk["attn"]["wo"].spec == P("tensor", None, "fsdp")
    assert blk["attn_norm"]["scale"].spec == P(None)
    assert sh["embed"]["table"].spec == P("tensor", "fsdp")
    assert sh["lm_head"]["w"].spec == P("fsdp", "tensor")


def _batches(n):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, 64, size=(8, 17)).astype(np.int32)
        seg = np.ones((8, 17), np.int32)
        seg[::2, 9:] = 2
        seg[1::4, 13:] = 0
        out.append({"tokens": tokens, "segment_ids": seg})
    return out


def _train_on(mesh, cfg, batches):
    """The loop's own recipe: parameters created in their shards, a jitted step with explicit
    in/out shardings, batches split over data x fsdp."""
    with jax.set_mesh(mesh):
        graphdef, params, _ = init_params(cfg, mesh)
        init = jax.device_get(params)
        tx = make_optimizer(cfg.train, params)
        state = jax.jit(lambda p: init_state(p, tx))(params)
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        bsh = batch_sharding(mesh)
        step = jax.jit(make_train_step(graphdef, tx, grad_accum=cfg.train.grad_accum),
                       in_shardings=(state_sh, bsh), out_shardings=(state_sh, None))
        losses, norms = [], []
        for b in batches:
            state, m = step(state, jax.device_put(b, bsh))
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
    return {"init": init, "losses": losses, "norms": norms, "state": state,
            "params": jax.device_get(state["params"])}


@pytest.fixture(scope="module")
def single_device():
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return _train_on(mesh, _cfg(), _batches(3))


@pytest.mark.parametrize("mesh_cfg, grad_accum, expect_w_gate, w_gate_shard", [
    (MeshConfig(data=8), 1, P(None, None), (32, 64)),
    (MeshConfig(data=2, fsdp=4), 1, P("fsdp", None), (8, 64)),
    (MeshConfig(data=2, tensor=4), 1, P(None, "tensor"), (32, 16)),
    (MeshConfig(data=2, fsdp=2, tensor=2), 2, P("fsdp", "tensor"), (16, 32)),
], ids=["data8", "data2-fsdp4", "data2-tensor4", "data2-fsdp2-tensor2-accum2"])
def test_sharded_training_equals_single_device(single_device, mesh_cfg, grad_accum, expect_w_gate, w_gate_shard):
    mesh = make_mesh(mesh_cfg)
    run = _train_on(mesh, _cfg(grad_accum=grad_accum), _batches(3))
    # The layout is really the one asked for ...
    w_gate = run["state"]["params"]["blocks"][0]["mlp"]["w_gate"]
    assert w_gate.sharding.is_equivalent_to(NamedSharding(mesh, expect_w_gate), 2), w_gate.sharding
    assert w_gate.addressable_shards[0].data.shape == w_gate_shard
    sizes = mesh_cfg.resolve(8)
    wq = run["state"]["params"]["blocks"][0]["attn"]["wq"]
    if sizes["tensor"] > 1:
        assert wq.sharding.spec[1] == "tensor"
        assert wq.addressable_shards[0].data.shape[1] == 8 // sizes["tensor"]
    # ... the initial parameters do not depend on it ...
    for a, b in zip(jax.tree.leaves(run["init"]), jax.tree.leaves(single_device["init"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and neither does training, up to float reassociation.
    np.testing.assert_allclose(run["losses"], single_device["losses"], rtol=1e-5)
    np.testing.assert_allclose(run["norms"], single_device["norms"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(run["params"]), jax.tree.leaves(single_device["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    # The parameters moved well beyond the tolerance (the comparison is not between untouched ones).
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree.leaves(single_device["params"]), jax.tree.leaves(single_device["init"]))]
    assert min(moved) > 1e-3

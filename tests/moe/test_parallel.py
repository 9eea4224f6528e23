"""Expert parallelism on 8 simulated CPU devices against the unsharded layer, values and
gradients: the ReLU routers' all_gather / psum_scatter exchange, top-k's two all_to_alls
(dropless, and with a capacity per device), whole models with each MoE kind under a mesh with
an expert axis, and the check that the expert axis divides the experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.config import MeshConfig, ModelConfig, MoEConfig
from jaxeff.models import Transformer
from jaxeff.moe import experts, parallel, routers
from jaxeff.parallel import make_mesh
from jaxeff.train import train

B, T, D, E, F, K = 8, 6, 16, 8, 8, 2


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return f32(B, T, D), f32(E, D, F) * 0.3, f32(E, F, D) * 0.3, f32(E, D, F) * 0.3, f32(D, E)


def _check(loss, args, mesh, atol=2e-5):
    want = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("layout, gated", [(dict(data=2, expert=4), False), (dict(data=1, expert=8), True)])
def test_relu_router_experts(inputs, layout, gated):
    x, w_up, w_down, w_gate, w_r = inputs

    def loss(x, w_up, w_down, w_gate):
        _, _, a = routers.blockffn_router(x, w_r, jnp.ones(E))
        wg = w_gate if gated else None
        if parallel.expert_axis_size() > 1:
            y = parallel.ep_dense_experts(x, a, w_up, w_down, wg)
        else:
            y = experts.dense_experts(x.reshape(-1, D), a.reshape(-1, E), w_up, w_down, wg).reshape(B, T, D)
        return jnp.sum(jnp.sin(y))

    _check(loss, (x, w_up, w_down, w_gate), make_mesh(MeshConfig(**layout)))


@pytest.mark.parametrize("layout", [dict(data=2, expert=4), dict(data=1, expert=8)])
def test_topk_dropless(inputs, layout):
    x, w_up, w_down, _, w_r = inputs

    def loss(x, w_up, w_down):
        g, c, _ = routers.topk_route(routers.router_logits(x, w_r), K)
        if parallel.expert_axis_size() > 1:
            y, kept = parallel.ep_topk_experts(x, g, c, w_up, w_down)
        else:
            y = experts.ragged_experts(x.reshape(-1, D), g.reshape(-1, K), c.reshape(-1, K), w_up, w_down)
        return jnp.sum(jnp.sin(y))

    _check(loss, (x, w_up, w_down), make_mesh(MeshConfig(**layout)))


def test_topk_capacity_is_per_device(inputs):
    """With a capacity factor each device's buffers hold ceil(cf * N_local * k / E) slots: the
    same as the unsharded layer applied to each device's rows on its own."""
    x, w_up, w_down, _, w_r = inputs
    cf = 1.0
    g, c, _ = routers.topk_route(routers.router_logits(x, w_r), K)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, expert=4))):
        y, kept = jax.jit(lambda *a: parallel.ep_topk_experts(*a, capacity_factor=cf))(x, g, c, w_up, w_down)
    rows = B // 8
    cap = experts.expert_capacity(rows * T, K, E, cf)
    for i in range(8):
        sl = slice(i * rows, (i + 1) * rows)
        want, want_kept = experts.capacity_experts(x[sl].reshape(-1, D), g[sl].reshape(-1, K), c[sl].reshape(-1, K),
                                                   w_up, w_down, capacity=cap)
        np.testing.assert_allclose(np.asarray(y[sl]).reshape(-1, D), np.asarray(want), atol=2e-5, rtol=1e-4)
        np.testing.assert_array_equal(np.asarray(kept[sl]).reshape(-1, K), np.asarray(want_kept))
    assert not bool(kept.all())  # some assignments really were dropped


@pytest.mark.parametrize("kind", ["blockffn", "topk", "remoe"])
def test_models_under_an_expert_mesh_match_one_device(kind):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                      moe=MoEConfig(kind=kind, n_experts=8, expert_dim=8, dense_layers=(0,)))
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (8, 12)), jnp.int32)

    def loss(params):
        logits, aux = nnx.merge(graphdef, params)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + sum(v for k, v in aux.items() if k.startswith("loss/"))

    want = jax.jit(jax.value_and_grad(loss))(params)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, expert=4))):
        got = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-3)


def test_n_experts_must_divide_over_the_expert_axis(inputs, train_cfg):
    x, w_up, w_down, _, _ = inputs
    with jax.set_mesh(make_mesh(MeshConfig(data=2, expert=4))), pytest.raises(ValueError, match="n_experts=6"):
        parallel.ep_dense_experts(x, jnp.ones((B, T, 6)), w_up[:6], w_down[:6])
    cfg = train_cfg("moe.kind=blockffn", "moe.n_experts=6", "mesh.data=2", "mesh.expert=4")
    with pytest.raises(ValueError, match=r"MoEConfig.n_experts=6 must be divisible by the mesh's expert axis"):
        train(cfg, verbose=False)


@pytest.mark.slow
def test_training_with_expert_parallelism_matches_one_device(train_cfg, tmp_path):
    base = ("moe.kind=topk", "moe.n_experts=4", "moe.expert_dim=16", "train.steps=3")
    one = train(train_cfg(*base, "mesh.data=8", run_dir=tmp_path / "dp"), verbose=False)
    ep = train(train_cfg(*base, "mesh.data=2", "mesh.expert=4", run_dir=tmp_path / "ep"), verbose=False)
    assert ep["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    for a, b in zip(jax.tree.leaves(one["final_params"]), jax.tree.leaves(ep["final_params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

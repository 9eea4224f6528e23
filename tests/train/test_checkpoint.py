"""Checkpointer: exact round trips, retention, shardings, errors; the run-config guard."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxeff.parallel import make_mesh
from jaxeff.config import MeshConfig
from jaxeff.train import Checkpointer, CheckpointError, check_run_config, load_run_config


def _state(seed):
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                   "b16": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16),
                   "blocks": {"0": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}},
        "step": jnp.asarray(seed, jnp.int32),
        "nonfinite_step": jnp.asarray(-1, jnp.int32),
    }


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))


def test_save_restore_is_exact_and_keeps_the_last_n(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    for step in (1, 2, 3):
        ckpt.save(step, _state(step))
    assert ckpt.latest_step() == 3
    assert sorted(ckpt.all_steps()) == [2, 3]
    like = jax.tree.map(jnp.zeros_like, _state(0))
    _assert_same(ckpt.restore(3, like), _state(3))
    _assert_same(ckpt.restore(2, like), _state(2))
    ckpt.close()
    # A new Checkpointer on the same directory sees the same steps (what a resumed run does).
    again = Checkpointer(str(tmp_path), keep=2)
    assert again.latest_step() == 3
    _assert_same(again.restore(3, like), _state(3))
    again.close()


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
def test_restore_into_a_sharded_layout(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    state = _state(5)
    ckpt.save(5, state)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    shard = {"params": {"w": NamedSharding(mesh, P("fsdp", None)), "b16": NamedSharding(mesh, P(("data", "fsdp"))),
                        "blocks": {"0": {"scale": NamedSharding(mesh, P())}}},
             "step": NamedSharding(mesh, P()), "nonfinite_step": NamedSharding(mesh, P())}
    like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shard)
    out = ckpt.restore(5, like)
    _assert_same(out, state)
    assert out["params"]["w"].sharding.spec == P("fsdp", None)
    assert out["params"]["w"].addressable_shards[0].data.shape == (2, 4)
    ckpt.close()


def test_restore_errors_are_checkpoint_errors(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, _state(1))
    like = jax.tree.map(jnp.zeros_like, _state(0))
    with pytest.raises(CheckpointError, match="step 7"):
        ckpt.restore(7, like)
    wrong = {**like, "params": {**like["params"], "w": jnp.zeros((3, 3), jnp.float32)}}
    with pytest.raises(CheckpointError, match=r"checkpoint at step 1 .* could not be restored"):
        ckpt.restore(1, wrong)
    assert ckpt.latest_step() == 1  # nothing was removed
    ckpt.close()


def test_check_run_config_guards_a_run_with_checkpoints(tmp_path):
    run = tmp_path / "run"
    cfg = {"model": {"d_model": 32, "n_layers": 1}, "data": {"corpus": "a.txt"}, "train": {"steps": 10}}
    check_run_config(str(run), cfg)
    assert load_run_config(str(run)) == cfg
    (run / "checkpoints" / "5").mkdir(parents=True)  # a completed step directory
    check_run_config(str(run), cfg)  # same config: fine
    # train.steps may change on resume, and config.json follows it; other train fields may not.
    assert check_run_config(str(run), {**cfg, "train": {"steps": 99}}) == {"train.steps": (10, 99)}
    cfg = {**cfg, "train": {"steps": 99}}
    assert load_run_config(str(run)) == cfg
    with pytest.raises(CheckpointError,
                       match=r"train\.lr: saved None vs now 0\.1\); on resume only these train fields may change: st"):
        check_run_config(str(run), {**cfg, "train": {"steps": 99, "lr": 0.1}})
    with pytest.raises(CheckpointError, match=r"train\.steps=4 is below the step of the latest checkpoint"):
        check_run_config(str(run), {**cfg, "train": {"steps": 4}})
    with pytest.raises(CheckpointError, match=r"holds checkpoints .*model\.d_model: saved 32 vs now 64"):
        check_run_config(str(run), {**cfg, "model": {"d_model": 64, "n_layers": 1}})
    with pytest.raises(CheckpointError, match=r"data\.corpus: saved 'a.txt' vs now 'b.txt'"):
        check_run_config(str(run), {**cfg, "data": {"corpus": "b.txt"}})
    with pytest.raises(CheckpointError, match=r"model\.rope_style: saved None vs now 'half'"):
        check_run_config(str(run), {**cfg, "model": {**cfg["model"], "rope_style": "half"}})
    assert load_run_config(str(run)) == cfg  # never overwritten by a refused config
    (run / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        check_run_config(str(run), cfg)


def test_check_run_config_without_checkpoints_takes_the_new_config(tmp_path):
    """A run that failed before its first checkpoint does not lock its directory to bad settings."""
    run = tmp_path / "run"
    cfg = {"model": {"vocab_size": 200}, "data": {"corpus": "typo.txt"}}
    check_run_config(str(run), cfg)
    (run / "checkpoints" / "3.orbax-checkpoint-tmp-123").mkdir(parents=True)  # an unfinished save
    fixed = {"model": {"vocab_size": 260}, "data": {"corpus": "a.txt"}}
    check_run_config(str(run), fixed)
    assert load_run_config(str(run)) == fixed
    # Once a tokenizer was built from the data settings, changing them is refused (it would be reused) ...
    (run / "tokenizer").mkdir()
    with pytest.raises(CheckpointError, match=r"holds a tokenizer .*data\.corpus: saved 'a.txt' vs now 'b.txt'"):
        check_run_config(str(run), {**fixed, "data": {"corpus": "b.txt"}})
    # ... while model settings may still change.
    check_run_config(str(run), {**fixed, "model": {"vocab_size": 300}})
    assert load_run_config(str(run))["model"]["vocab_size"] == 300


def test_load_run_config_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jaxeff run directory"):
        load_run_config(str(tmp_path))

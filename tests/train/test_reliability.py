"""Training never loses work (issue 11): the non-finite update guard, the run-directory lock, the
resume policy, checkpoint checksums with fallback, and the clear errors of the CLI's misuses.

Every test here failed on the code before the fix; the docstring of each says how. Runs are the
tiny byte-level ones of tests/conftest.py (seconds each on CPU)."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.cli import main
from jaxeff.train import CheckpointError, NonFiniteLossError, learning_rate_schedule, restore_run, train
from jaxeff.train import loop as loop_module

# A constant schedule after a 2-step warm-up: a run resumed at step 3 equals an uninterrupted one.
REF = ("train.steps=6", "train.ckpt_every=3", "train.warmup_steps=2", "train.schedule=constant")


def _losses(run_dir) -> list[int]:
    """The step of every loss record of metrics.jsonl, in file order (repeats kept)."""
    path = Path(run_dir, "metrics.jsonl")
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _np_tree(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _assert_trees_close(a, b, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def _steps(run_dir) -> list[int]:
    d = Path(run_dir, "checkpoints")
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _tiny_sets(corpus: str, run_dir: Path, *extra: str) -> list[str]:
    sets = [f"data.corpus={corpus}", "data.tokenizer=byte", "model.vocab_size=260", "model.d_model=32",
            "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=64",
            "train.seq_len=32", "train.batch_size=8", "train.steps=3", "train.warmup_steps=1",
            "train.eval_batches=1", "train.log_every=1", "train.sample_tokens=0", f"run_dir={run_dir}", *extra]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def ref(tmp_path_factory, run_config):
    """An uninterrupted 6-step run with checkpoints at 3 and 6 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    cfg = run_config(run_dir, *REF)
    summary = train(cfg, verbose=False)
    return {"cfg": cfg, "dir": run_dir, "params": _np_tree(summary["final_params"])}


def _copy(ref, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(ref["dir"], run_dir)
    return run_dir, ref["cfg"].override([f"run_dir={run_dir}"])


# --- data loss: a non-finite update is never applied or saved --------------------------------------

def _tiny_step_setup(tiny_model_cfg):
    from flax import nnx

    from jaxeff import Transformer
    from jaxeff.train import init_state, make_train_step

    graphdef, state = nnx.split(Transformer(tiny_model_cfg(), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32),
             "segment_ids": jnp.ones((2, 9), jnp.int32)}
    return graphdef, params, batch, init_state, make_train_step


def test_nonfinite_update_is_never_applied(tiny_model_cfg):
    """An infinite learning rate: the loss and gradient are finite, the update is not. Before the
    fix the guard looked at the loss and gradient only and applied NaN parameters."""
    graphdef, params, batch, init_state, make_train_step = _tiny_step_setup(tiny_model_cfg)
    tx = optax.sgd(float("inf"))
    state = init_state(params, tx)
    new, m = jax.jit(make_train_step(graphdef, tx))(state, batch)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert int(new["nonfinite_step"]) == 0
    _assert_trees_close(_np_tree(new["params"]), _np_tree(params), atol=0)


def test_nonfinite_optimizer_state_is_never_applied(tiny_model_cfg):
    """A transformation whose updates are finite but whose state becomes NaN: nothing is applied."""
    graphdef, params, batch, init_state, make_train_step = _tiny_step_setup(tiny_model_cfg)

    def update(updates, st, params=None):
        return jax.tree.map(jnp.zeros_like, updates), {"acc": st["acc"] * jnp.nan}

    tx = optax.chain(optax.GradientTransformation(lambda p: {"acc": jnp.ones(())}, update), optax.sgd(1e-2))
    state = init_state(params, tx)
    new, _ = jax.jit(make_train_step(graphdef, tx))(state, batch)
    assert int(new["nonfinite_step"]) == 0
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new["opt_state"]))


def test_huge_lr_never_reaches_a_checkpoint(train_cfg):
    """lr=1e39 is a finite Python float but overflows float32: the first update is NaN. Before the
    fix checkpoint 1 held all-NaN parameters; now training stops at step 1 with nothing saved."""
    cfg = train_cfg("train.steps=3", "train.lr=1e39", "train.ckpt_every=1")
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 1\b"):
        train(cfg, verbose=False)
    assert _steps(cfg.run_dir) == []


@pytest.mark.parametrize("setting, field", [
    ("train.lr=inf", "TrainConfig.lr"),
    ("train.lr=nan", "TrainConfig.lr"),
    ("train.clip_norm=nan", "TrainConfig.clip_norm"),
    ("recursion.router_alpha=nan", "RecursionConfig.router_alpha"),
])
def test_cli_rejects_non_finite_settings(corpus_glob, tmp_path, capsys, setting, field):
    """Before the fix lr=inf / nan, clip_norm=nan and router_alpha=nan were accepted."""
    assert main(["train", "--config", "tiny", *_tiny_sets(corpus_glob, tmp_path / "run", setting)]) == 2
    err = capsys.readouterr().err
    assert field in err and "finite" in err
    assert not (tmp_path / "run").exists()


# --- data loss: one run directory, one process -------------------------------------------------------

PAUSED_TRAIN = textwrap.dedent("""
    import json, os, sys, time
    import jax
    import numpy as np
    from jaxeff.config import Config
    from jaxeff.train import loop

    real = loop.prepare_dataset

    def paused(*args, **kwargs):  # called once the run directory is locked
        print("READY", flush=True)
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.05)
        return real(*args, **kwargs)

    loop.prepare_dataset = paused
    summary = loop.train(Config.from_dict(json.load(open(sys.argv[1]))), verbose=False)
    np.savez(sys.argv[3], *[np.asarray(x) for x in jax.tree.leaves(summary["final_params"])])
""")


def _start_paused(tmp_path, cfg):
    (tmp_path / "paused.py").write_text(PAUSED_TRAIN)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    proc = subprocess.Popen([sys.executable, str(tmp_path / "paused.py"), str(tmp_path / "cfg.json"),
                             str(tmp_path / "go"), str(tmp_path / "final.npz")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    line = proc.stdout.readline()
    assert line.strip() == "READY", line + proc.stdout.read()[-3000:]
    return proc


def test_second_process_on_a_locked_run_dir_exits_2_at_once(run_config, corpus_glob, tmp_path, capsys):
    """Before the fix both runs trained into the directory and exited 0; the checkpoint held the
    second run's parameters and config.json the first's lr."""
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, "train.steps=3", "train.lr=3e-3")
    first = _start_paused(tmp_path, cfg)
    try:
        t0 = time.perf_counter()
        rc = main(["train", "--config", "tiny", *_tiny_sets(corpus_glob, run_dir, "train.lr=1e-4")])
        elapsed = time.perf_counter() - t0
        err = capsys.readouterr().err
        assert rc == 2, err
        assert elapsed < 10 and f"pid {first.pid}" in err and "in use" in err, err
        (tmp_path / "go").touch()
        out = first.communicate(timeout=300)[0]
        assert first.returncode == 0, out[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 3e-3
    _, _, params, step = restore_run(str(run_dir))
    assert step == 3
    saved = np.load(tmp_path / "final.npz")
    for i, leaf in enumerate(jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])  # the first run's own parameters


def test_stale_lock_after_kill_9_does_not_block(run_config, corpus_glob, tmp_path, capsys):
    """The lock holds while its process lives and is gone once it is killed (flock is released by
    the kernel), although the lock file stays. Before the fix nothing was locked at all."""
    run_dir = tmp_path / "run"
    holder = _start_paused(tmp_path, run_config(run_dir, "train.steps=3"))
    try:
        assert main(["train", "--config", "tiny", *_tiny_sets(corpus_glob, run_dir)]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (run_dir / ".lock").is_file() and str(holder.pid) in (run_dir / ".lock").read_text()
    t0 = time.perf_counter()
    assert main(["train", "--config", "tiny", *_tiny_sets(corpus_glob, run_dir)]) == 0
    assert _steps(run_dir) == [3] and time.perf_counter() - t0 < 120
    assert str(os.getpid()) in (run_dir / ".lock").read_text()


def test_run_lock_in_one_process(tmp_path):
    from jaxeff.train.checkpoint import RunDirLockedError, RunLock

    with RunLock(str(tmp_path / "run")):
        with pytest.raises(RunDirLockedError, match=rf"pid {os.getpid()}\b"):
            RunLock(str(tmp_path / "run")).acquire()
    with RunLock(str(tmp_path / "run")):  # released on exit
        pass


# --- data loss: what may change on resume --------------------------------------------------------------

def test_resume_refuses_changed_train_fields_naming_them(ref, tmp_path):
    """Before the fix a resume took any new train settings silently."""
    run_dir, cfg = _copy(ref, tmp_path)
    before = (run_dir / "config.json").read_text()
    with pytest.raises(CheckpointError, match=r"train\.lr: saved 0\.003 vs now 0\.01.*train\.seed: saved 0 vs now 5"):
        train(cfg.override(["train.lr=1e-2", "train.seed=5", "train.steps=8"]), verbose=False)
    assert (run_dir / "config.json").read_text() == before


@pytest.mark.slow
def test_resume_with_more_steps_recomputes_the_schedule(run_config, tmp_path, monkeypatch):
    """Documented policy: train.steps may grow; the schedule is recomputed over the new total from
    the resumed step on, and config.json is rewritten. Checked exactly: the resumed cosine run
    equals a fresh run whose schedule is the old one for steps 1-3 and the new one after. Before
    the fix config.json kept steps=3."""
    over = ("train.warmup_steps=1", "train.schedule=cosine", "train.ckpt_every=3")
    run_dir = tmp_path / "run"
    cfg3, cfg6 = run_config(run_dir, *over, "train.steps=3"), run_config(run_dir, *over, "train.steps=6")
    train(cfg3, verbose=False)
    resumed = train(cfg6, verbose=False)
    assert resumed["start_step"] == 3
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 6
    new = learning_rate_schedule(cfg6.train)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "lr" in rec and rec["step"] > 3:
            assert rec["lr"] == pytest.approx(float(new(rec["step"])))

    from jaxeff.train import optimizer as optimizer_module

    old = learning_rate_schedule(cfg3.train)
    monkeypatch.setattr(optimizer_module, "learning_rate_schedule",
                        lambda tc: lambda count: jnp.where(count < 3, old(count), new(count)))
    piecewise = train(run_config(tmp_path / "piecewise", *over, "train.steps=6"), verbose=False)
    _assert_trees_close(_np_tree(resumed["final_params"]), _np_tree(piecewise["final_params"]), atol=1e-6)


def test_resume_refuses_fewer_steps_than_the_checkpoint(ref, tmp_path):
    run_dir, cfg = _copy(ref, tmp_path)
    with pytest.raises(CheckpointError, match=r"train\.steps=4 is below the step of the latest checkpoint .*step 6"):
        train(cfg.override(["train.steps=4"]), verbose=False)


def test_resume_with_a_recursion_change_is_a_config_change(ref, tmp_path):
    """Before the fix a dense run resumed with recursion.strategy=cycle was reported as a
    damaged checkpoint, with the advice to move its step directory away."""
    run_dir, cfg = _copy(ref, tmp_path)
    with pytest.raises(CheckpointError) as info:
        train(cfg.override(["recursion.strategy=cycle"]), verbose=False)
    msg = str(info.value)
    assert "recursion.strategy: saved 'none' vs now 'cycle'" in msg and "configuration change" in msg
    assert "could not be restored" not in msg and "move that step" not in msg
    # A config.json edited by hand is caught by the parameter tree the checkpoint holds.
    saved = json.loads((run_dir / "config.json").read_text())
    saved["model"]["d_ff"] = 48
    (run_dir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"different parameter tree .*params\..*saved \(\d+, \d+\) float32, now "
                                              r"\(\d+, \d+\) float32.*configuration change, not a damaged checkpoint"):
        restore_run(str(run_dir))


# --- data loss: checksums, and falling back to the previous good step -----------------------------------

def _data_files(step_dir: Path) -> list[Path]:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {step_dir}; has orbax's layout changed?"
    return files


def _overwrite_4kb(step_dir: Path) -> None:
    target = max(_data_files(step_dir), key=lambda p: p.stat().st_size)
    size = target.stat().st_size
    n = min(4096, size)
    with open(target, "r+b") as f:
        f.seek((size - n) // 2)
        old = f.read(n)
        f.seek((size - n) // 2)
        f.write(bytes((b + 1) % 256 for b in old))


def test_overwritten_bytes_fall_back_to_the_previous_step(ref, tmp_path, caplog):
    """4 KB overwritten inside a data file of step 6. Before the fix it restored silently."""
    run_dir, cfg = _copy(ref, tmp_path)
    _overwrite_4kb(run_dir / "checkpoints" / "6")
    with caplog.at_level(logging.WARNING):
        assert restore_run(str(run_dir))[3] == 3
    assert re.search(r"step 6 .*checksum", caplog.text), caplog.text
    assert (run_dir / "checkpoints" / "6").is_dir()  # reading never moves anything

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = train(cfg, verbose=False)
    assert "step 6" in caplog.text
    assert summary["start_step"] == 3
    _assert_trees_close(_np_tree(summary["final_params"]), ref["params"], atol=1e-6)
    assert _steps(run_dir) == [3, 6] and restore_run(str(run_dir))[3] == 6
    assert (run_dir / "bad_checkpoints" / "6").is_dir()  # the damaged step is kept aside, not deleted


def test_step_without_checksum_is_not_trusted(ref, tmp_path, caplog):
    """A crash after orbax's rename but before the checksum write leaves a step without one:
    it does not count as good."""
    from jaxeff.train.checkpoint import CHECKSUM_FILE

    run_dir, _ = _copy(ref, tmp_path)
    (run_dir / "checkpoints" / "6" / CHECKSUM_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        assert restore_run(str(run_dir))[3] == 3
    assert "step 6" in caplog.text and "checksum" in caplog.text


def test_checkpoints_of_an_older_version_still_restore(ref, tmp_path):
    """Steps saved before checksums existed restore unverified (compatibility)."""
    from jaxeff.train.checkpoint import CHECKSUM_FILE, INTEGRITY_FILE

    run_dir, _ = _copy(ref, tmp_path)
    for p in run_dir.rglob(CHECKSUM_FILE):
        p.unlink()
    (run_dir / "checkpoints" / INTEGRITY_FILE).unlink()
    assert restore_run(str(run_dir))[3] == 6


def test_no_intact_step_raises_naming_the_damaged_ones(ref, tmp_path):
    run_dir, cfg = _copy(ref, tmp_path)
    for s in ("3", "6"):
        _overwrite_4kb(run_dir / "checkpoints" / s)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*6.*3"):
        restore_run(str(run_dir))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint"):
        train(cfg, verbose=False)


def test_damaged_checkpoint_message_is_one_clean_sentence(ref, tmp_path):
    """A step that cannot be verified (an older version's) and fails to restore: one sentence
    with the exception's type. Before the fix the message ended in a cut-off TensorStore dump."""
    run_dir, _ = _copy(ref, tmp_path)
    for p in run_dir.rglob("jaxeff_checksum.json"):
        p.unlink()
    for p in (run_dir / "checkpoints").glob("jaxeff_integrity.json"):
        p.unlink()
    for p in _data_files(run_dir / "checkpoints" / "6"):
        os.truncate(p, p.stat().st_size // 2)
    with pytest.raises(CheckpointError) as info:
        restore_run(str(run_dir))
    msg = str(info.value)
    assert re.fullmatch(r"checkpoint at step 6 in \S+ could not be restored \(\w+\)\. [^{}\n]*\.", msg), msg


# --- wrong or unclear answers --------------------------------------------------------------------------

def test_non_finite_sampling_settings_are_rejected(ref, capsys, tiny_model_cfg):
    """Before the fix --temperature nan printed the bare prompt with rc 0."""
    from flax import nnx

    from jaxeff import Transformer, generate

    model = Transformer(tiny_model_cfg(), rngs=nnx.Rngs(0))
    for t in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"temperature must be >= 0 and finite, got (nan|inf)"):
            generate(model, [1, 2], 3, temperature=t)
    assert main(["generate", str(ref["dir"]), "--prompt", "x", "--temperature", "nan"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_out_of_vocabulary_ids_are_named(tmp_path, tiny_model_cfg, caplog):
    """The eager entry points say which id is out of range: generate (already did), packing,
    the data pipeline's token cache, and a GGUF tokenizer's special ids (neither did)."""
    from flax import nnx

    from jaxeff import Transformer, generate
    from jaxeff.config import DataConfig
    from jaxeff.data import pack_documents, prepare_dataset
    from jaxeff.io.tokenizer_gguf import GGUFTokenizer

    model = Transformer(tiny_model_cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"prompt token -1 is outside the vocabulary \[0, 64\) \(prompt 1, position 1"):
        generate(model, [[1, 2], [3, -1]], 2)
    with pytest.raises(ValueError, match=r"document 1.* token id -1"):
        pack_documents([[1, 2, 3], [4, -1]], 4, eos_id=0)
    with pytest.raises(ValueError, match=r"document 0.* token id 300 .*\[0, 260\)"):
        pack_documents([[1, 300]], 4, eos_id=0, vocab_size=260)

    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"document {i} " * 40)
    cfg = DataConfig(corpus=f"{corpus}/*.txt", tokenizer="byte", val_fraction=0.25)
    fresh = prepare_dataset(cfg, 16, tokenizer_dir=str(tmp_path / "tok"))
    for p in (tmp_path / "tok").glob("encoded_*_train_ids.npy"):
        ids = np.load(p)
        ids[3] = 9999
        np.save(p, ids)
    with caplog.at_level(logging.WARNING):
        again = prepare_dataset(cfg, 16, tokenizer_dir=str(tmp_path / "tok"))
    assert "9999" in caplog.text
    np.testing.assert_array_equal(again.train_tokens_NxS, fresh.train_tokens_NxS)  # re-encoded, not used

    with pytest.raises(ValueError, match=r"eos_token_id 7 is outside the vocabulary \[0, 3\)"):
        GGUFTokenizer.build(["a", "b", "ab"], ["a b"], [1, 1, 1], bos_id=0, eos_id=7)


def test_prompt_longer_than_the_model_says_so(ref, capsys, tiny_model_cfg):
    """Before the fix: 'max_new_tokens must be >= 1, got -36'."""
    from flax import nnx

    from jaxeff import Transformer, generate

    assert main(["generate", str(ref["dir"]), "--prompt", "y" * 100]) == 2
    err = capsys.readouterr().err
    assert "prompt is 100 tokens" in err and "max_seq_len 64" in err and "got -" not in err
    model = Transformer(tiny_model_cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"prompt is 64 tokens.*max_seq_len 64"):
        generate(model, [1] * 64, 8)


def test_gguf_perplexity_rejects_the_flag_value(tmp_path, capsys):
    """Before the fix --max-tokens 0 said the corpus 'has no document of at least 2 tokens' (after
    loading the model). The value is checked before anything is loaded."""
    for flag, value in (("--max-tokens", "0"), ("--seq-len", "0"), ("--batch-size", "0"), ("--stride", "0")):
        assert main(["gguf-perplexity", "--gguf", str(tmp_path / "absent.gguf"), "README.md", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be >= 1, got 0" in err and "absent.gguf" not in err


def test_bad_config_json_is_one_line_naming_the_file(ref, tmp_path, capsys):
    """Before the fix: 'Expecting value: line 1 column 1' (no file name), and a TypeError traceback
    for an unknown field."""
    run_dir, _ = _copy(ref, tmp_path)
    path = run_dir / "config.json"
    good = json.loads(path.read_text())
    path.write_text("")
    assert main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not valid JSON" in err and err.count("\n") == 1
    path.write_text(json.dumps({**good, "model": {**good["model"], "depth": 3}}))
    for cmd in (["eval", str(run_dir)], ["generate", str(run_dir), "--prompt", "x"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "ModelConfig has no field 'depth'" in err and err.count("\n") == 1


def test_mesh_is_validated_before_any_work(train_cfg, monkeypatch):
    """Before the fix the mesh was checked only after the data and tokenizer were prepared."""
    def no_data(*args, **kwargs):
        raise AssertionError("the data was prepared before the mesh was checked")

    monkeypatch.setattr(loop_module, "prepare_dataset", no_data)
    cfg = train_cfg("mesh.data=3")
    with pytest.raises(ValueError, match="do not divide the 8 available devices"):
        train(cfg, verbose=False)
    cfg = train_cfg("train.batch_size=4")
    with pytest.raises(ValueError, match=r"train\.batch_size=4 .*mesh"):
        train(cfg, verbose=False)
    assert not Path(cfg.run_dir, "config.json").exists()


def test_eval_and_generate_create_nothing(ref, tmp_path, capsys):
    """Before the fix both created an empty checkpoints/ in a directory that had none."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(ref["dir"] / "config.json", run_dir / "config.json")
    for cmd in (["eval", str(run_dir)], ["generate", str(run_dir), "--prompt", "x"]):
        assert main(cmd) == 2
        assert "no checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_metrics_drop_the_steps_redone_after_resume(ref, tmp_path):
    """Steps 4-6 were logged, then the run died before checkpoint 6: after the resume every step
    is logged once. Before the fix steps 4, 5 and 6 appeared twice."""
    run_dir, cfg = _copy(ref, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    assert _losses(run_dir) == [1, 2, 3, 4, 5, 6]
    train(cfg, verbose=False)
    assert _losses(run_dir) == [1, 2, 3, 4, 5, 6]
    evals = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert evals == [6]


def test_eval_prints_valid_json_for_a_non_finite_loss(ref, capsys, monkeypatch):
    """Before the fix eval printed `"val_loss": NaN`, which is not JSON."""
    from jaxeff.eval import run as eval_run

    monkeypatch.setattr(eval_run, "make_eval_step", lambda graphdef, **kw: lambda p, b: {
        "nll_sum": jnp.float32(jnp.nan), "tokens": jnp.float32(10.0)})
    assert main(["eval", str(ref["dir"])]) == 1
    captured = capsys.readouterr()

    def no_constants(name):
        raise AssertionError(f"not JSON: {name}")

    result = json.loads(captured.out, parse_constant=no_constants)
    assert result["val_loss"] is None and "not finite" in captured.err

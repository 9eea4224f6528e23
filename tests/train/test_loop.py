"""train(): artifacts, resume equivalence, a save killed halfway, corrupted checkpoints (checksum
fallback), incompatible configs and the non-finite guard, all on a tiny byte-level run on 8 CPU
devices. tests/train/test_reliability.py has the rest of issue 11's reliability checks."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxeff.config import Config
from jaxeff.models import count_params
from jaxeff.train import CheckpointError, NonFiniteLossError, learning_rate_schedule, restore_run, train
from jaxeff.train import loop as loop_module

# steps=6 with checkpoints at 3 and 6; warm-up over 2 steps then a constant lr, so a run of 3 steps
# follows the same schedule as the first half of a run of 6 (cosine would depend on the total).
REF_OVERRIDES = ("train.steps=6", "train.ckpt_every=3", "train.warmup_steps=2", "train.schedule=constant")


def read_metrics(run_dir) -> tuple[dict[int, float], dict[int, dict]]:
    """(loss per step, eval record per step) from metrics.jsonl; a step logged twice (a resumed
    run redoing it) keeps its last record."""
    losses, evals = {}, {}
    path = Path(run_dir, "metrics.jsonl")
    for line in (path.read_text().splitlines() if path.exists() else []):
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
        if "val_loss" in rec:
            evals[rec["step"]] = rec
    return losses, evals


def _np_tree(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_close(a, b, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_config):
    """An uninterrupted 6-step run: its config, summary, losses and final parameters."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cfg = run_config(run_dir, *REF_OVERRIDES)
    summary = train(cfg, verbose=False)
    losses, evals = read_metrics(run_dir)
    return {"cfg": cfg, "dir": run_dir, "summary": summary, "losses": losses, "evals": evals,
            "params": _np_tree(summary["final_params"])}


def test_train_writes_a_complete_run(reference):
    cfg, run_dir, summary = reference["cfg"], reference["dir"], reference["summary"]
    assert summary["start_step"] == 0 and summary["steps"] == 6
    assert summary["params"] == count_params(cfg)
    assert summary["n_devices"] == len(jax.devices())
    assert np.isfinite(summary["val_loss"]) and summary["val_loss"] == reference["evals"][6]["val_loss"]
    assert summary["val_ppl"] == pytest.approx(np.exp(summary["val_loss"]))
    assert summary["tokenizer"].kind == "byte"
    assert sorted(reference["losses"]) == [1, 2, 3, 4, 5, 6]
    losses = [reference["losses"][s] for s in range(1, 7)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # it learns
    assert losses[0] == pytest.approx(np.log(cfg.model.vocab_size), abs=0.1)  # starts near uniform
    # lr logged is the schedule's value at the step count.
    sched = learning_rate_schedule(cfg.train)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "lr" in rec:
            assert rec["lr"] == pytest.approx(float(sched(rec["step"])))
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert Config.from_dict(json.loads((run_dir / "config.json").read_text())) == cfg
    assert (run_dir / "tokenizer" / "tokenizer_meta.json").is_file()


def test_restore_run_returns_the_final_parameters(reference):
    cfg, graphdef, params, step = restore_run(str(reference["dir"]))
    assert step == 6 and cfg == reference["cfg"]
    assert_trees_close(_np_tree(params), reference["params"], atol=0)


def test_resume_equivalence(run_config, tmp_path, reference):
    """3 steps, then a second train() with steps=6 on the same run dir: the same per-step losses
    and final parameters as the uninterrupted run."""
    run_dir = tmp_path / "run"
    first = train(run_config(run_dir, *REF_OVERRIDES, "train.steps=3"), verbose=False)
    assert first["start_step"] == 0
    second = train(run_config(run_dir, *REF_OVERRIDES), verbose=False)
    assert second["start_step"] == 3
    losses, evals = read_metrics(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        assert losses[s] == pytest.approx(reference["losses"][s], abs=1e-6), s
    assert_trees_close(_np_tree(second["final_params"]), reference["params"], atol=1e-6)
    assert evals[6]["val_loss"] == pytest.approx(reference["evals"][6]["val_loss"], abs=1e-6)


KILL_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from jaxeff.config import Config
    from jaxeff.train import train
    from orbax.checkpoint._src.path import atomicity

    cfg = Config.from_dict(json.loads(open(sys.argv[1]).read()))
    kill_step = sys.argv[2]
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        # The arrays of this step are written into the temporary directory; die before the
        # rename that would make them a checkpoint, as a preempted job would.
        if self.get_final().name == kill_step:
            sys.stdout.flush()
            os._exit(17)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    train(cfg, verbose=False)
    sys.exit(3)  # not reached when the kill happens
""")


@pytest.mark.slow
def test_kill_during_save_resumes_from_last_complete_checkpoint(run_config, tmp_path, reference):
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, *REF_OVERRIDES)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "cfg.json"), "6"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 17, proc.stderr[-3000:]
    ckpt_dir = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert "3" in names and "6" not in names, names
    assert any(n.startswith("6.orbax-checkpoint-tmp") for n in names), names  # the half-done save
    losses_before, _ = read_metrics(run_dir)
    assert sorted(losses_before) == [1, 2, 3, 4, 5, 6]  # step 6 ran; only its checkpoint is missing

    summary = train(cfg, verbose=False)
    assert summary["start_step"] == 3
    losses, _ = read_metrics(run_dir)
    for s in range(1, 7):
        assert losses[s] == pytest.approx(reference["losses"][s], abs=1e-6), s
    assert_trees_close(_np_tree(summary["final_params"]), reference["params"], atol=1e-6)
    assert (ckpt_dir / "6").is_dir()
    assert restore_run(str(run_dir))[3] == 6


def _truncate_arrays(step_dir: Path) -> list[Path]:
    # OCDBT keeps array chunks in files under `d/` directories (the merged `default/d/` and the
    # per-process `ocdbt.process_0/d/`); cut every one of them in half.
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files found under {step_dir}; has orbax's layout changed?"
    for p in files:
        os.truncate(p, p.stat().st_size // 2)
    return files


def test_corrupted_checkpoint_falls_back_and_is_kept(reference, tmp_path, caplog):
    """Truncated array files fail their checksum: reading falls back to the previous step and
    changes nothing; training resumes from it and moves the damaged step aside (never deletes it)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    step_dir = run_dir / "checkpoints" / "6"
    _truncate_arrays(step_dir)
    listing = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))

    with caplog.at_level("WARNING"):
        assert restore_run(str(run_dir))[3] == 3
    assert "checkpoint step 6" in caplog.text and "does not match its checksum" in caplog.text
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == listing  # reading changes nothing

    bad_files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))
    cfg = reference["cfg"].override([f"run_dir={run_dir}"])
    summary = train(cfg, verbose=False)
    assert summary["start_step"] == 3
    assert_trees_close(_np_tree(summary["final_params"]), reference["params"], atol=1e-6)
    kept = run_dir / "bad_checkpoints" / "6"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == bad_files  # moved whole, not deleted
    assert restore_run(str(run_dir))[3] == 6  # step 6 trained and saved again


def test_incompatible_config_names_the_field(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    base = reference["cfg"].override([f"run_dir={run_dir}"])
    with pytest.raises(CheckpointError, match=r"model\.d_model: saved 32 vs now 64"):
        train(base.override(["model.d_model=64"]), verbose=False)
    with pytest.raises(CheckpointError, match=r"data\.split_seed: saved 0 vs now 1"):
        train(base.override(["data.split_seed=1"]), verbose=False)
    assert json.loads((run_dir / "config.json").read_text())["model"]["d_model"] == 32


@pytest.mark.parametrize("log_every, ckpt_every, ckpts, logged", [
    (10, 1, [1, 2], []),  # caught by the check before the save of step 3
    (1, 2, [2], [1, 2]),  # caught when step 3 is logged
])
def test_nonfinite_loss_stops_training_without_checkpointing_it(train_cfg, monkeypatch, log_every, ckpt_every,
                                                                ckpts, logged):
    """Step index 2 gets an out-of-vocabulary token (NaN embedding): training stops naming that
    step, and checkpoints exist only for the steps before it."""
    real_batch_at = loop_module.batch_at

    def poisoned_batch_at(tokens, segs, step, batch_size, seed):
        batch = real_batch_at(tokens, segs, step, batch_size, seed)
        if step == 2:
            batch = {**batch, "tokens": batch["tokens"].copy()}
            batch["tokens"][0, 5] = 10 ** 6
        return batch

    monkeypatch.setattr(loop_module, "batch_at", poisoned_batch_at)
    cfg = train_cfg("train.steps=5", f"train.ckpt_every={ckpt_every}", f"train.log_every={log_every}")
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 3\b"):
        train(cfg, verbose=False)
    run_dir = Path(cfg.run_dir)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ckpts
    losses, _ = read_metrics(run_dir)
    assert sorted(losses) == logged and all(np.isfinite(list(losses.values())))
    _, _, params, step = restore_run(str(run_dir))
    assert step == ckpts[-1] and all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_grad_accum_run_matches_plain_run(train_cfg, tmp_path):
    """grad_accum=2 through the whole loop (sharded batch, micro-batch reshape) gives the losses of
    grad_accum=1."""
    plain = train(train_cfg("train.steps=3", run_dir=tmp_path / "a"), verbose=False)
    accum = train(train_cfg("train.steps=3", "train.grad_accum=2", run_dir=tmp_path / "b"), verbose=False)
    la, _ = read_metrics(tmp_path / "a")
    lb, _ = read_metrics(tmp_path / "b")
    for s in (1, 2, 3):
        assert lb[s] == pytest.approx(la[s], abs=1e-5)
    assert_trees_close(_np_tree(accum["final_params"]), _np_tree(plain["final_params"]), atol=1e-5)


def test_train_rejects_too_small_vocab_and_too_large_batch(train_cfg):
    with pytest.raises(ValueError, match="model.vocab_size=200 is smaller than the tokenizer's vocabulary"):
        train(train_cfg("model.vocab_size=200"), verbose=False)
    # The same run directory accepts the corrected model settings (no checkpoint was written).
    cfg = train_cfg("train.batch_size=4096")
    with pytest.raises(ValueError, match="train.batch_size=4096 exceeds"):
        train(cfg, verbose=False)
    assert json.loads((Path(cfg.run_dir) / "config.json").read_text())["model"]["vocab_size"] == 260


@pytest.mark.slow
def test_learns_well_below_the_unigram_baseline(train_cfg):
    """400 steps of a 2-layer model on the session corpus: validation loss far below the
    context-free (unigram) baseline, i.e. it uses context (about 1.5 vs 3.0 nats; ~25 s)."""
    cfg = train_cfg("train.steps=400", "train.warmup_steps=10", "train.lr=1e-2", "train.schedule=cosine",
                    "model.d_model=64", "model.d_ff=128", "model.n_layers=2", "train.log_every=50")
    summary = train(cfg, verbose=False)
    assert summary["val_loss"] < summary["unigram_nats"] - 1.0
    losses, _ = read_metrics(cfg.run_dir)
    assert losses[400] < losses[50] - 0.5

"""Two local CPU processes train one model together through the CLI (jax.distributed with gloo
collectives), and agree with each other and with a single process holding the same global
device count and batch."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

# Runs the real CLI; the only addition is that processes other than 0 also log their metrics (to
# metrics.process<i>.jsonl), so the test can compare what every process computed.
DRIVER = textwrap.dedent("""
    import os, sys
    import jax
    from jaxeff.train import loop, metrics

    class EveryProcessLog(metrics.MetricsLog):
        def __init__(self, run_dir):
            super().__init__(run_dir)
            if jax.process_index() != 0:
                self.path = os.path.join(run_dir, f"metrics.process{jax.process_index()}.jsonl")
                self.enabled = True

    loop.MetricsLog = EveryProcessLog
    from jaxeff.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def _val(path: Path) -> float:
    return [r["val_loss"] for r in map(json.loads, path.read_text().splitlines()) if "val_loss" in r][-1]


def _train_args(corpus: str, run_dir: Path) -> list[str]:
    sets = [f"data.corpus={corpus}", "data.tokenizer=byte", "model.vocab_size=260", "model.d_model=32",
            "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=64",
            "train.seq_len=32", "train.batch_size=8", "train.steps=3", "train.warmup_steps=1",
            "train.eval_batches=1", "train.log_every=1", "train.sample_tokens=0", f"run_dir={run_dir}"]
    return ["train", "--config", "tiny", *[a for s in sets for a in ("--set", s)]]


def _env(n_devices: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n_devices), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_two_processes_train_together(corpus_glob, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run_dir = tmp_path / "multi"
    port = _free_port()
    procs = []
    for i in range(2):
        argv = [sys.executable, str(driver), *_train_args(corpus_glob, run_dir),
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_env(2)))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    assert "on 4 x cpu" in outputs[0]  # one mesh over both processes' devices
    assert "[result] validation loss" in outputs[0]

    losses0 = _losses(run_dir / "metrics.jsonl")
    losses1 = _losses(run_dir / "metrics.process1.jsonl")
    assert sorted(losses0) == [1, 2, 3]
    assert losses0 == losses1  # both processes saw the same global loss at every step
    assert _val(run_dir / "metrics.jsonl") == _val(run_dir / "metrics.process1.jsonl")
    assert (run_dir / "checkpoints" / "3").is_dir()

    # One process with the same 4 devices and global batch computes the same losses.
    single_dir = tmp_path / "single"
    proc = subprocess.run([sys.executable, str(driver), *_train_args(corpus_glob, single_dir)],
                          capture_output=True, text=True, timeout=240, env=_env(4))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    single = _losses(single_dir / "metrics.jsonl")
    assert sorted(single) == [1, 2, 3]
    for s in (1, 2, 3):
        assert losses0[s] == pytest.approx(single[s], abs=1e-5), s
    assert _val(run_dir / "metrics.jsonl") == pytest.approx(_val(single_dir / "metrics.jsonl"), abs=1e-5)
    # The checkpoint the two processes wrote together is complete and holds the same parameters.
    import jax
    import numpy as np
    from jaxeff.train import restore_run

    _, _, multi_params, multi_step = restore_run(str(run_dir))
    _, _, single_params, _ = restore_run(str(single_dir))
    assert multi_step == 3
    for a, b in zip(jax.tree.leaves(multi_params), jax.tree.leaves(single_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

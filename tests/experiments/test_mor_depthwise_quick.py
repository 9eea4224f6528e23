"""experiments/mor/depthwise_bench.py end to end in its quick mode (every setting decodes the same
queue; the depth-wise rows agree with plain batching), and the MoR experiment's allocated KV
bytes per strategy (run.allocated_kv_bytes) against the capacities' arithmetic."""

import json
import os
import sys

import pytest

from jaxeff import ModelConfig

from .loader import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name: str):
    sys.path.insert(0, os.path.join(ROOT, "experiments", "mor"))
    return load_experiment("mor", f"{name}.py", name=f"mor_{name}")


@pytest.mark.slow
def test_bench_quick_mode_end_to_end(tmp_path):
    bench = _load("depthwise_bench")
    assert bench.main(["--mode", "quick", "--out", str(tmp_path)]) == 0
    report = json.load(open(tmp_path / "results.json"))
    assert report["hardware"]
    assert report["router_fractions"][0] == 1.0
    assert report["router_fractions"][1:] == pytest.approx([2 / 3, 1 / 3], abs=0.06)  # calibrated routers
    settings = {r["setting"] for r in report["rows"]}
    assert {"vanilla (equal depth)", "vanilla (equal params)", "MoR plain batching"} <= settings
    dw = [r for r in report["rows"] if r["setting"].startswith("MoR depth-wise")]
    assert len(dw) == 2 and all(r["identical_to_plain"] == 1.0 for r in dw)
    assert all(1.0 <= r["avg_recursions"] <= 3.0 and r["tokens_per_s"] > 0 for r in dw)
    eq = {r["setting"]: r["params"] for r in report["rows"]}
    assert abs(eq["vanilla (equal params)"] / eq["MoR plain batching"] - 1) < 0.01
    assert (tmp_path / "throughput.png").stat().st_size > 5_000


def test_allocated_kv_bytes_per_strategy():
    run = _load("run")
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=60)
    b = run.allocated_kv_bytes(cfg, 60)
    blocks = lambda k: b[k]["shared_fraction_of_recursion_blocks"]
    assert b["N_r=3, recursion-wise, full"]["fraction_of_vanilla"] == pytest.approx(1.0, abs=1e-4)
    assert blocks("N_r=3, recursion-wise, kv_slack=1.0") == pytest.approx(4 / 6, rel=2e-3)  # (N_r+1)/(2 N_r)
    assert blocks("N_r=2, recursion-wise, kv_slack=1.0") == pytest.approx(3 / 4, rel=2e-3)
    assert blocks("N_r=3, recursion-wise, kv_slack=1.25") == pytest.approx((60 + 50 + 25) / 180, rel=2e-3)
    assert blocks("N_r=3, shared") == pytest.approx(1 / 3, rel=1e-6) and blocks("N_r=2, shared") == pytest.approx(0.5)
    assert b["N_r=3, recursion-wise, kv_slack=1.0"]["stored_capacities"] == [60, 40, 20]

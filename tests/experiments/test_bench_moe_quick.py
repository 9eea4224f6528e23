"""experiments/bench_moe.py in its quick mode on CPU (mosaic_gpu in interpret mode for the checks,
the portable kernel for the sweep): every part writes rows with finite times, the checks pass,
the figure is drawn; and a kernel that raises turns its cases into FAILs (exit code 1) without
stopping the run."""

import json
import math

from .loader import load_experiment


def _load(name):
    return load_experiment(f"{name}.py", name=f"_{name}")


def test_quick_mode_all_parts(tmp_path):
    bench, plot = _load("bench_moe"), _load("plot_moe")
    out = tmp_path / "bench_moe.json"
    assert bench.main(["--quick", "--inner", "2", "--out", str(out)]) == 0
    res = json.load(open(out))
    assert res["status"] == "done" and res["device"] and res["jax"] and res["date"]
    rows = res["rows"]
    checks = [r for r in rows if r["part"] == "checks"]
    assert checks and all(r["status"] in ("PASS", "N/A") for r in checks)
    assert sum(r["status"] == "PASS" for r in checks) >= 4
    assert {r["dtype"] for r in checks if r["status"] == "PASS"} == {"bfloat16", "float16"}
    assert any(r["status"] == "PASS" and r["D"] == 2048 for r in checks)  # v2: any D % 64 == 0
    assert res["summary"]["checks"]["ok"] and res["summary"]["checks"]["failed"] == 0

    chunk = [r for r in rows if r["part"] == "chunk"]
    assert {r["chunk_len"] for r in chunk} == {64, 8, 1}
    for r in chunk:
        assert math.isfinite(r["kernel_ms"]) and r["kernel_ms"] > 0 and math.isfinite(r["dense_ms"])
        assert r["union_min"] == r["union_max"] == r["union_experts"]  # each chunk's union exactly the target
        assert abs(r["goal_ms"] - 1.25 * r["union_ratio"] * r["dense_ms"]) < 1e-9
        assert r["rel_err_vs_dense"] < 3e-2
    fit = res["summary"]["chunk"]
    assert math.isfinite(fit["overhead_ms"]) and set(fit["fit_per_chunk_len"]) == {"64", "8", "1"}
    assert all(v["c0_ms"] is not None for v in fit["fit_per_chunk_len"].values())

    grouped = [r for r in rows if r["part"] == "grouped"]
    timed = [r for r in grouped if r.get("ms") is not None]
    assert {r["k"] for r in timed} == {1, 2}
    names = {r["impl"] for r in timed}
    assert "jax.lax.ragged_dot" in names and "dense matmul (same FLOPs)" in names
    assert any(n.startswith("jaxeff ragged_dot_impl") for n in names)
    assert "jaxeff ragged_experts (sort+2 matmuls+scatter)" in names
    for r in timed:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and math.isfinite(r["tflops"])
        assert r.get("rel_err") is None or r["rel_err"] < 1e-2
    for s in res["summary"]["grouped"].values():
        assert math.isfinite(s["jaxeff_speedup_vs_lax"]) and math.isfinite(s["jaxeff_fraction_of_dense"])

    png = tmp_path / "bench_moe.png"
    plot.main([str(out), "--out", str(png)])
    assert png.stat().st_size > 10_000


def test_a_raising_kernel_fails_its_cases_and_the_run_goes_on(tmp_path, monkeypatch):
    bench = _load("bench_moe")
    from pallas_kernels.chunk_sparse_ffn import api

    real = api.chunk_sparse_ffn

    def broken(*args, impl="auto", **kw):
        if impl != "reference":
            raise RuntimeError("boom: the kernel did not compile")
        return real(*args, impl=impl, **kw)

    monkeypatch.setattr(api, "chunk_sparse_ffn", broken)
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--parts", "checks,chunk", "--chunk-lens", "64", "--ratios", "1",
                       "--out", str(out)]) == 1
    res = json.load(open(out))
    checks = [r for r in res["rows"] if r["part"] == "checks"]
    assert {r["status"] for r in checks} == {"FAIL"} and res["summary"]["checks"]["failed"] >= 5
    assert all("boom" in r["error"] for r in checks if r["status"] == "FAIL")
    chunk = [r for r in res["rows"] if r["part"] == "chunk"]
    assert chunk and chunk[0]["kernel_ms"] is None and "boom" in chunk[0]["error"] and chunk[0]["dense_ms"] > 0


def test_timeit_reports_time_per_call_over_inner_calls():
    import time

    import jax.numpy as jnp

    bench = _load("bench_moe")
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.02)
        return jnp.zeros(())

    t, n, _ = bench.timeit(fn, reps=4, budget_s=100.0, inner=3)
    assert n == 4 and len(calls) == 3 + 4 * 3  # compile call, warm call, warm-up, then 4 samples of 3
    assert 0.018 < t < 0.04  # per call: a sample of three calls takes >= 0.06 s

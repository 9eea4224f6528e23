"""experiments/bench_decode.py in its quick mode on the CPU: the Hopper decode kernel's checks in
interpret mode (all pass), the bench rows (the kernel at every budget, XLA, cuDNN's refusal
recorded) with finite times and the summary's fit, the end-to-end rows (prefill and decode, with
and without SnapKV, read by XLA and by the kernel), and the plot."""

import json
import math

import pytest

from .loader import load_experiment


def _load(name):
    return load_experiment(f"{name}.py", name=f"{name}_mod")


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_mode_every_part(tmp_path):
    bench = _load("bench_decode")
    out = tmp_path / "bench_decode.json"
    assert bench.main(["--quick", "--parts", "checks,bench,e2e", "--out", str(out)]) == 0
    res = json.load(open(out))
    assert res["quick"] and res["jax"] and res["device"] and res["date"]
    rows = res["rows"]

    checks = [r for r in rows if r["part"] == "checks"]
    assert len(checks) == len(bench.check_cases(True)) and all(r["ok"] for r in checks), checks
    measured = [r for r in checks if not r["expect_error"]]
    assert all(r["o_err"] <= r["tol"] and r["lse_err"] <= r["tol"] and r["empty_exact"] for r in measured)
    assert any(r["empty_rows"] for r in measured) and any(r["t"] > 1 for r in measured)
    assert res["summary"]["checks"]["passed"] and res["summary"]["checks"]["complete"]

    b = [r for r in rows if r["part"] == "bench"]
    kernel = [r for r in b if r["kind"] == "kernel"]
    assert {(r["N"], r["budget"]) for r in kernel} == {(n, f) for n in (256, 128) for f in (1.0, 0.25, 0.0)}
    assert all(_finite(r["ms"]) and r["verify_ok"] for r in kernel)
    assert all(r["kv_bytes"] > 0 and _finite(r["tbps"]) for r in kernel if r["budget"] > 0)
    xla = [r for r in b if r["impl"] == "xla"]
    assert len(xla) == 2 and all(_finite(r["ms"]) for r in xla)
    assert all("error" in r for r in b if r["impl"].startswith("cudnn"))  # no cuDNN on a CPU: recorded
    for n in ("256", "128"):
        s = res["summary"]["bench"][n]["portable"]
        assert _finite(s["t_full_ms"]) and "fit_c0_ms" in s and len(s["budgets"]) == 2 and "bw_ratio_vs_xla" in s

    e2e = [r for r in rows if r["part"] == "e2e"]
    assert all("error" not in r for r in e2e), e2e
    pre = {r["policy"]: r for r in e2e if r["phase"] == "prefill"}
    assert set(pre) == {"full", "snapkv"} and all(_finite(r["prefill_s"]) for r in pre.values())
    assert pre["snapkv"]["kept_frac"] < 1.0 == pre["full"]["kept_frac"]
    dec = {(r["policy"], r["read"]): r for r in e2e if r["phase"] == "decode"}
    assert set(dec) == {(p, r) for p in ("full", "snapkv") for r in ("xla", "portable")}
    assert all(_finite(r["decode_tok_s"]) and _finite(r["decode_s"]) for r in dec.values())
    assert all(r["tokens_agree_with_other_read"] == 1.0 for k, r in dec.items() if "tokens_agree_with_other_read" in r)

    png = tmp_path / "bench_decode.png"
    assert _load("plot_decode").main([str(out), "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000

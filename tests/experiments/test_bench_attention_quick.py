"""experiments/bench_attention.py on a CPU: the jax side's quick case (the portable kernel in
interpret mode, every mask, with --profile) and the merge with a FlexAttention result, whose
effective TFLOP/s the merge derives from the jax side's density."""

import json
import math
import sys

import pytest

from .loader import load_experiment


@pytest.mark.slow
def test_jax_side_and_merge(tmp_path):
    bench = load_experiment("bench_attention.py", name="bench_attention")
    jax_json, tables = tmp_path / "jax.json", tmp_path / "tables.npz"
    common = ["--quick", "--reps", "1", "--inner", "2", "--jax-json", str(jax_json), "--tables", str(tables)]
    argv = sys.argv
    try:
        sys.argv = ["bench_attention.py", "--part", "jax", "--impl", "pallas", "--profile", *common]
        assert bench.main() == 0
        rows = json.load(open(jax_json))["rows"]
        assert [r["mask"] for r in rows] == list(bench.MASKS)
        assert all(math.isfinite(r["fwd_ms"]) and math.isfinite(r["fwdbwd_ms"]) and 0 < r["density"] <= 1
                   for r in rows)
        assert tables.exists()
        torch_json = tmp_path / "torch.json"
        random10 = next(r for r in rows if r["mask"] == "random10")
        json.dump({"torch": "fake", "rows": [dict(case=random10["case"], S=random10["S"], mask="random10",
                                                  impl="torch flex_attention", fwd_ms=2.0, fwdbwd_ms=8.0)]},
                  open(torch_json, "w"))
        out = tmp_path / "merged.json"
        sys.argv = ["bench_attention.py", "--part", "merge", "--jax-json", str(jax_json), "--torch-json",
                    str(torch_json), "--out", str(out), "--quick"]
        assert bench.main() == 0
    finally:
        sys.argv = argv
    merged = json.load(open(out))["rows"]
    flex = [r for r in merged if r["impl"] == "torch flex_attention"]
    assert len(flex) == 1 and len(merged) == len(rows) + 1
    f = bench.flops(random10["B"], random10["H"], random10["S"], random10["D"], random10["density"])
    assert flex[0]["fwd_tflops"] == pytest.approx(f / 2e-3 / 1e12)
    assert flex[0]["fwdbwd_tflops"] == pytest.approx(3.5 * f / 8e-3 / 1e12)

"""experiments/profile_step.py: HLO categories, and the script runs end to end (CPU: no device ops)."""

import json
import os

import pytest

from .loader import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    return load_experiment("profile_step.py", name="profile_step")


def test_categories_and_hlo_lines():
    mod = _load()
    hlo = """
  %custom-call.5 = (bf16[8,8]{1,0}, s8[4]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
  %fusion.2 = bf16[8,8]{1,0} fusion(%p), kind=kLoop, calls=%fused_add
  ROOT %input_reduce_fusion.1 = f32[8]{0} fusion(%p), kind=kInput, calls=%fused_reduce
  %attn = (bf16[1,2,3,4]{3,2,1,0}) custom-call(%q), custom_call_target="__cudnn$fmhaSoftmax"
  %all-reduce.3 = f32[4]{0} all-reduce(%x), replica_groups={}
"""
    lines = mod.hlo_lines(hlo)
    assert set(lines) == {"custom-call.5", "fusion.2", "input_reduce_fusion.1", "attn", "all-reduce.3"}
    cats = {k: mod.category(v) for k, v in lines.items()}
    assert cats == {"custom-call.5": "matmul (cuBLAS)", "fusion.2": "elementwise fusion",
                    "input_reduce_fusion.1": "reduction fusion", "attn": "attention (cuDNN)",
                    "all-reduce.3": "collective"}
    assert mod.category(None) == "unknown"


def test_pick_op_line_prefers_xla_ops_then_the_busiest_stream():
    mod = _load()
    lines = {"/device:GPU:0 | Stream #14(Compute)": {"a": 5.0}, "/device:GPU:0 | Stream #20(Compute)": {"b": 9.0},
             "/device:GPU:0 | XLA Modules": {"jit_step": 20.0}}
    assert mod.pick_op_line(lines) == "/device:GPU:0 | Stream #20(Compute)"
    assert mod.pick_op_line({**lines, "/device:GPU:0 | XLA Ops": {"fusion.1": 3.0}}) == "/device:GPU:0 | XLA Ops"
    assert mod.pick_op_line({"/device:GPU:0 | XLA Modules": {"jit_step": 1.0}}) is None


@pytest.mark.slow
def test_profile_step_runs_on_cpu(tmp_path):
    mod = _load()
    assert mod.main(["--preset", "tiny", "--set", "model.n_layers=1", "--set", "train.batch_size=2",
                     "--steps", "1", "--out", str(tmp_path)]) == 0
    r = json.load(open(tmp_path / "profile.json"))
    assert r["wall_ms_per_step"] > 0 and (tmp_path / "hlo.txt").stat().st_size > 1000

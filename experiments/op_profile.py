"""Device time per op of one jitted call, from a profiler trace: where a kernel benchmark's
milliseconds go (the Pallas kernels themselves, and the XLA ops around them).

    from op_profile import profile_ops
    report = profile_ops(jitted_fn, *args, calls=5)   # {"ops": [...], "device_ms": ..., ...}

The call is compiled and warmed up, then traced ``calls`` times with ``jax.profiler``; the trace
is read back with ``jax.profiler.ProfileData`` (``profile_step.read_trace``) and each op's total
device time is divided by ``calls``. Ops are named as in the compiled HLO, whose line is kept
next to each (a Pallas kernel appears as its custom call). On a CPU the trace has no device
planes: the report then says so and lists nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from profile_step import hlo_lines, pick_op_line, read_trace


def profile_ops(fn, *args, calls: int = 5, top: int = 12) -> dict:
    """``fn`` a jitted function; the ``top`` most expensive ops of one call, in ms."""
    if calls < 1:
        raise ValueError(f"profile_ops: calls must be >= 1, got {calls}")
    hlo = fn.lower(*args).compile().as_text()
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    trace_dir = tempfile.mkdtemp(prefix="jaxeff_ops_")
    try:
        jax.profiler.start_trace(trace_dir)
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        try:
            lines = read_trace(trace_dir)
        except FileNotFoundError:
            lines = {}
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    key = pick_op_line(lines)
    if key is None:
        return {"op_line": None, "device_ms": None, "ops": [], "note": "no device ops in the trace"}
    ops = {op: ns / calls / 1e6 for op, ns in lines[key].items()}
    instr = hlo_lines(hlo)
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    return {"op_line": key, "device_ms": sum(ops.values()), "n_ops": len(ops),
            "ops": [{"op": op, "ms": ms, "hlo": instr.get(op, "")[:200]} for op, ms in ranked]}


def print_profile(title: str, report: dict) -> None:
    if not report["ops"]:
        print(f"[profile] {title}: {report.get('note', 'nothing recorded')}", flush=True)
        return
    print(f"[profile] {title}: {report['device_ms']:.3f} ms of device ops per call ({report['n_ops']} ops)",
          flush=True)
    for r in report["ops"]:
        print(f"[profile]   {r['ms']:8.4f} ms  {r['op'][:40]:40s} {r['hlo'][:90]}", flush=True)


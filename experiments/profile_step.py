"""Where a training step's GPU time goes, kernel by kernel: a profiler trace of a few steps.

Builds the train step exactly as ``bench_train.py`` does (synthetic data), traces ``--steps``
steps with ``jax.profiler``, and reads the trace back with ``jax.profiler.ProfileData`` (no
TensorBoard needed). Each device op is put in a category from the compiled HLO (cuBLAS / Triton
matmul, cuDNN attention, loop or reduction fusion, collective, copy, ...) and the script prints
milliseconds per step for each category and for the most expensive ops, with the HLO line of
each so a fusion can be traced to the model code. Writes ``profile.json`` and ``hlo.txt`` to
``--out``.

    python experiments/profile_step.py --preset small --set train.batch_size=32 --out prof_small
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import build  # noqa: E402

from jaxeff.config import get_preset  # noqa: E402

CATEGORIES = (  # first match wins; matched against the op's HLO line
    ("attention (cuDNN)", re.compile(r"cudnn\$fmha|__cudnn\$fmha|fmha")),
    ("matmul (cuBLAS)", re.compile(r"__cublas\$|cublas")),
    ("matmul (Triton)", re.compile(r"triton_gemm|__triton|kind=kCustom")),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute")),
    ("reduction fusion", re.compile(r"kind=kInput")),
    ("elementwise fusion", re.compile(r"kind=kLoop")),
    ("output fusion", re.compile(r"kind=kOutput")),
    ("copy / transpose", re.compile(r"= \S+ (copy|transpose)\(")),
)

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def hlo_lines(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its HLO line (last definition wins; names are unique per module)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def category(line: str | None) -> str:
    if line is None:
        return "unknown"
    for name, pat in CATEGORIES:
        if pat.search(line):
            return name
    return "other"


def read_trace(trace_dir: str) -> dict[str, dict[str, float]]:
    """{line name: {event name or hlo_op: total ns}} for every device plane of the trace."""
    from jax.profiler import ProfileData
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no .xplane.pb trace under {trace_dir}")
    pd = ProfileData.from_file(files[-1])
    lines: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for plane in pd.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            key = f"{plane.name} | {line.name}"
            for ev in line.events:
                stats = dict(ev.stats)
                op = stats.get("hlo_op") or ev.name
                lines[key][str(op)] += float(ev.duration_ns)
    return {k: dict(v) for k, v in lines.items()}


def pick_op_line(lines: dict[str, dict[str, float]]) -> str | None:
    """The line that holds one event per executed HLO op: 'XLA Ops' when present, else the
    busiest stream."""
    ops = [k for k in lines if k.endswith("| XLA Ops")]
    if ops:
        return ops[0]
    streams = [k for k in lines if "Stream" in k]
    return max(streams, key=lambda k: sum(lines[k].values())) if streams else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--doc-len", type=int, default=700, help="tokens per synthetic document (packed rows)")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", default="profile_out")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    cfg = get_preset(a.preset).override(a.set)
    mesh, step_fn, state, batches = build(cfg, devices=jax.devices()[:1], doc_len=a.doc_len)
    with jax.set_mesh(mesh):
        hlo = step_fn.lower(state, batches[0]).compile().as_text()
        with open(os.path.join(a.out, "hlo.txt"), "w") as f:
            f.write(hlo)
        for i in range(3):  # compile and warm up
            state, m = step_fn(state, batches[i % len(batches)])
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for i in range(a.steps):
            state, m = step_fn(state, batches[i % len(batches)])
        jax.block_until_ready(m)
        wall_ms = 1e3 * (time.perf_counter() - t0) / a.steps
        trace_dir = os.path.join("/tmp", f"jaxeff_trace_{os.getpid()}")
        os.makedirs(trace_dir, exist_ok=True)
        jax.profiler.start_trace(trace_dir)
        for i in range(a.steps):
            state, m = step_fn(state, batches[i % len(batches)])
        jax.block_until_ready(m)
        jax.profiler.stop_trace()
    lines = read_trace(trace_dir)
    print("device lines:", {k: round(sum(v.values()) / a.steps / 1e6, 2) for k, v in lines.items()})
    key = pick_op_line(lines)
    if key is None:
        print("no device ops in the trace (CPU run?)")
        ops: dict[str, float] = {}
    else:
        ops = {k: v / a.steps / 1e6 for k, v in lines[key].items()}  # ms per step
    instr = hlo_lines(hlo)
    by_cat: dict[str, float] = collections.defaultdict(float)
    for op, ms in ops.items():
        by_cat[category(instr.get(op))] += ms
    total = sum(ops.values())
    print(f"\n{a.preset} {a.set}: wall {wall_ms:.1f} ms/step, device ops {total:.1f} ms/step ({key})")
    for c, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {c:22s} {ms:8.2f} ms  {100 * ms / max(total, 1e-9):5.1f}%")
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:a.top]
    print(f"\ntop {len(top)} ops:")
    for op, ms in top:
        line = instr.get(op, "")
        print(f"  {ms:7.3f} ms  {category(instr.get(op)):20s} {op:28s} {line[:150]}")
    res = {"preset": a.preset, "overrides": a.set, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "wall_ms_per_step": wall_ms, "device_ms_per_step": total, "op_line": key,
           "by_category_ms": dict(by_cat), "ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
           "ops_hlo": {op: instr.get(op, "")[:400] for op in ops},
           "lines_ms": {k: sum(v.values()) / a.steps / 1e6 for k, v in lines.items()}}
    with open(os.path.join(a.out, "profile.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

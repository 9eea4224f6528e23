"""Decode attention over a compacted per-head KV cache on one GPU: correctness and speed of
``pallas_kernels.decode_attention`` (``impl='mosaic_gpu'``, the Hopper kernel) against cuDNN and
XLA over the full cache, and ``jaxeff`` decoding end to end with and without SnapKV, in one run.

Parts (``--parts``, default ``checks,bench``):

* ``checks``: the kernel against ``impl='reference'`` computed in float32 from the same bf16/fp16
  inputs: GQA ratios 1, 4, 8, T = 1, 2, 4, 8 query tokens per row (R = T * G up to the 64-row tile),
  caches whose slot count and per-head counts are not multiples of the kernel's 64-slot block,
  ragged counts across heads with an empty head (count 0: o = 0 and lse = -inf, the reference's
  contract), a full head, positions with gaps and with holes (-1) inside the counted slots, slot
  positions beyond a query's position (speculative tokens), valid-looking garbage beyond each
  head's count (the kernel must stop at the count), explicit splits and a call past the 64-row
  tile that must be refused. Per case: the worst per-row error max|o - ref| / max|ref| over the
  rows that read a slot, the worst |lse - ref| / max(1, |ref|), the empty rows exact; PASS when
  both are below the tolerance (bf16 2e-2, fp16 5e-3). A failing case makes the exit status 1
  (after the JSON is written and the other parts have run).
* ``bench``: batch 8, 32 query heads / 8 KV heads, D 128, bf16, one query token per row; caches of
  N = 32768, 131072 and 4096 slots (in this order: 32k is the anchor) allocated at the full N;
  per-(row, head) counts ragged across heads, each drawn uniformly in [0.5, 1.5] x the budget
  (100%: all N), for budgets 100%, 50%, 25%, 10% and 0% (an empty cache: the fixed cost). Peers over
  the full uncompressed cache in the ``[B, N, K, D]`` layout: cuDNN
  (``jax.nn.dot_product_attention(..., implementation='cudnn')``) and XLA
  (``implementation='xla'``). Each timed sample runs ``--inner`` calls inside one jitted program
  (back to back, no host round trip; the time is divided by ``--inner``); the median of ``--reps``
  samples after ``--warmup``, each ended by ``block_until_ready``. Caches smaller than 512 MB get
  one copy per inner call so repeated calls do not read from L2. Bytes: K and V of the slots in
  use, 2 * sum(counts) * D * 2; TB/s = bytes / time. Each kernel row's output is also compared with
  the float32 reference (``verify_err``; a failure counts as a failed check). Summary per N: the
  full-cache kernel's bandwidth over cuDNN's (goal >= 1.2), the fit t(f) = c0 + c1 * f * t_full over
  the budgets f > 0 (f = mean count / N), and the check t(f) <= 1.2 * f * t_full + overhead with
  overhead = max(c0, 0) and with overhead = the empty-cache time.
* ``e2e`` (off by default): a random-init model of the ``--e2e-preset`` (``1b``: d 2048, 18
  layers, 16 heads of 128) with bf16 parameters, one row, a ``--e2e-prompt``-token prompt and
  ``--e2e-new`` greedy tokens, the decode loop that ``jaxeff.generate`` runs (``_generate``: the
  cache, ``KVCompression.prepare`` / ``after_prefill`` / ``observe``, ``model.extend`` per step,
  read through ``with_decode_kernel``), split so that the prefill and the decode phases are timed
  apart: without a policy and with SnapKV at ``--e2e-budget``, each decoded with the cache read by
  XLA (the library default) and by the kernel (``--e2e-variants``, most important first).
  Differences from ``generate``: the kernel reads the cache from the first decode step on
  (``generate(decode_impl=...)`` marks the cache before the prompt, so the prefill goes through the
  decode kernel as well, which ``mosaic_gpu`` refuses once prompt * G > 64 rows); the prompt is
  prefilled in chunks of ``--e2e-chunk`` tokens (the last chunk gives SnapKV its observation
  window; a whole 32k prompt in one ``extend`` builds a dense per-head mask of B*K*P*C bytes per
  layer), every chunk returns the window statistics (so both policies share one compiled chunk),
  and the capacity is rounded up to ``--e2e-align`` slots (the kernel pads a cache whose capacity
  is not a multiple of its split, copying it every call). A prefill that fails with the preset's
  attention (cuDNN with the chunk's dense mask) is run again with ``attention_impl='xla'``.
  Reported: prefill seconds and tokens/s,
  decode tokens/s, compile seconds, the process's peak memory after each phase
  (``memory_stats()['peak_bytes_in_use']``, monotone over the run) and the compiled programs'
  memory analysis.

``--deadline-s``: no new case starts after that many seconds since the start (the parts share it);
the JSON is rewritten after every case. ``--quick``: tiny shapes on a CPU in well under a minute
(the kernel in interpret mode for the checks, ``portable`` for the bench, the ``tiny`` preset read
through ``portable`` for e2e), every code path exercised.

Exit status: 1 if a check (or a bench row's reference comparison) failed, else 2 if a part
crashed, else 0. GPU run (checks + bench, about 200 s): ``python experiments/bench_decode.py
--deadline-s 150``; e2e alone (about 150 s): ``python experiments/bench_decode.py --parts e2e
--deadline-s 100``.
Plot: ``python experiments/plot_decode.py bench_decode.json --out bench_decode.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

T_START = time.perf_counter()  # the deadline counts from here (before jax's import and backend start)
PARTS = ("checks", "bench", "e2e")
TOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}
ANCHOR_H100_32K_US = {"cudnn": 589.0, "xla": 1434.0}  # B8 H32/K8 D128 bf16 N 32768, one token per row
DEFAULT_STAGES = 2  # pallas_kernels.decode_attention.mosaic_gpu.STAGES as shipped


def default_out() -> str:
    out = os.environ.get("OUT")
    if out:
        return os.path.join(out, "bench_decode.json")
    return os.path.join(ROOT, "experiments", "results", "bench_decode.json")


def short(e: BaseException, n: int = 600) -> str:
    return f"{type(e).__name__}: {str(e)[:n]}"


class Run:
    """The results, the deadline and the JSON written after every case."""

    def __init__(self, a, meta: dict, t0: float):
        self.a = a
        self.t0 = t0
        self.res = dict(meta, rows=[], summary={}, skipped=[], errors=[])

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def time_left(self, what: str) -> bool:
        if self.elapsed() > self.a.deadline_s:
            msg = f"deadline of {self.a.deadline_s:.0f} s reached at {self.elapsed():.0f} s: {what} skipped"
            print(msg, flush=True)
            self.res["skipped"].append(what)
            return False
        return True

    def add(self, row: dict) -> dict:
        row = dict(row, t_s=round(self.elapsed(), 2))
        self.res["rows"].append(row)
        self.save()
        return row

    def save(self) -> None:
        self.res["elapsed_s"] = round(self.elapsed(), 2)
        path = self.a.out
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_clean(self.res), f, indent=1)
        os.replace(tmp, path)


def _clean(x):
    """JSON without NaN/inf (as None) and with numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def on_cpu() -> bool:
    import jax
    return jax.default_backend() == "cpu"


def kernel_fn(impl: str, **kw):
    """``decode_attention`` through the api, jitted except for the Mosaic GPU kernel in interpret
    mode on a CPU (its interpreter can deadlock under an outer jit on a CPU with few cores)."""
    import jax

    from pallas_kernels.decode_attention.api import decode_attention

    def f(q, k, v, pos, qpos, counts):
        return decode_attention(q, k, v, pos, qpos, counts, impl=impl, **kw)
    return f if (on_cpu() and impl == "mosaic_gpu") else jax.jit(f)


# --------------------------------------------------------------------------------------- checks

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dtype: str
    b: int
    t: int
    h: int
    kh: int
    c: int
    d: int = 128
    n_splits: int | None = None
    full: bool = False  # every head's count = c (no ragged counts, no empty head)
    holes: bool = False  # some -1 positions inside the counted slots
    expect_error: str | None = None  # a call that must raise ValueError containing this

    @property
    def g(self) -> int:
        return self.h // self.kh


def check_cases(quick: bool) -> list[Case]:
    if quick:  # interpret mode: about a second per call
        return [Case("g4_t1", "bfloat16", 2, 1, 8, 2, 150, 64, n_splits=2),
                Case("g1_t1_holes", "float16", 1, 1, 2, 2, 100, 64, holes=True),
                Case("g4_t4_spec", "bfloat16", 1, 4, 8, 2, 130, 128),
                Case("g8_t8_R64", "float16", 1, 8, 16, 2, 70, 64),
                Case("rejects_R128", "bfloat16", 1, 16, 8, 1, 64, 64, expect_error="query rows")]
    shapes = [("g1_t1", dict(b=2, t=1, h=8, kh=8, c=1000)),
              ("g4_t1", dict(b=2, t=1, h=32, kh=8, c=4133)),
              ("g8_t1", dict(b=2, t=1, h=32, kh=4, c=2000)),
              ("g4_t4_spec", dict(b=2, t=4, h=32, kh=8, c=1500)),
              ("g4_t2_splits3", dict(b=2, t=2, h=16, kh=4, c=1000, n_splits=3)),
              ("g8_t8_R64", dict(b=1, t=8, h=64, kh=8, c=777)),
              ("g4_t1_holes", dict(b=2, t=1, h=16, kh=4, c=700, holes=True)),
              ("g4_t1_d64", dict(b=2, t=1, h=16, kh=4, c=300, d=64)),
              ("g4_t1_full32k", dict(b=1, t=1, h=32, kh=8, c=32768, full=True))]
    cases = [Case(f"{name}_{'bf16' if dt == 'bfloat16' else 'fp16'}", dt, **kw)
             for dt in ("bfloat16", "float16") for name, kw in shapes]
    cases.append(Case("rejects_R128", "bfloat16", 1, 16, 32, 4, 256, expect_error="query rows"))
    return cases


def check_inputs(case: Case, seed: int):
    """Random q, k, v in the case's dtype; a compacted cache: per-head counts (ragged, one head
    empty, one full), sorted positions with gaps in the counted slots, valid-looking positions
    beyond each count, queries at the top of the position range (some slots lie after a query)."""
    import jax.numpy as jnp
    rng = np.random.default_rng(seed)
    b, t, h, kh, c, d = case.b, case.t, case.h, case.kh, case.c, case.d
    dt = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dt)
    k = jnp.asarray(rng.normal(size=(b, kh, c, d)), dt)
    v = jnp.asarray(rng.normal(size=(b, kh, c, d)), dt)
    if case.full:
        counts = np.full((b, kh), c)
    else:
        counts = rng.integers(max(1, c // 3), c + 1, (b, kh))
        special = {}  # an empty head (its group's rows read nothing), a full one, one with a single slot
        for where, n in (((0, kh - 1), 0), ((b - 1, 0), c), ((b - 1, kh // 2), 1)):
            special.setdefault(where, n)
        for (i, j), n in list(special.items())[: b * kh - 1]:  # never every head empty
            counts[i, j] = n
    span = 2 * c
    pos = np.zeros((b, kh, c), np.int32)
    for i in range(b):
        for j in range(kh):
            n = int(counts[i, j])
            pos[i, j, :n] = np.sort(rng.choice(span, n, replace=False))
            pos[i, j, n:] = rng.integers(0, span // 2, c - n)  # garbage the kernel must not read
            if case.holes and n > 4:
                pos[i, j, rng.choice(n, max(1, n // 10), replace=False)] = -1
    q_pos = np.stack([span - t + np.arange(t) - 3 * i for i in range(b)]).astype(np.int32)
    return q, k, v, jnp.asarray(pos), jnp.asarray(q_pos), jnp.asarray(counts, jnp.int32)


def errors(o, lse, o_ref, lse_ref) -> dict:
    """Worst per-row output error relative to the row's largest |ref| (rows that read a slot),
    worst LSE error relative to max(1, |ref|), and whether the empty rows are exactly o = 0,
    lse = -inf."""
    o, o_ref = np.asarray(o, np.float64), np.asarray(o_ref, np.float64)
    lse, lse_ref = np.asarray(lse, np.float64), np.asarray(lse_ref, np.float64)
    seen = np.isfinite(lse_ref)
    empty = ~seen
    out = {"rows": int(seen.size), "empty_rows": int(empty.sum())}
    if seen.any():
        num = np.abs(o - o_ref).max(-1)[seen]
        den = np.maximum(np.abs(o_ref).max(-1)[seen], 1e-6)
        out["o_err"] = float(np.nan_to_num((num / den).max(), nan=np.inf))
        out["o_err_global"] = float(np.nan_to_num(num.max() / den.max(), nan=np.inf))
        lse_ok = np.isfinite(lse[seen])
        le = np.abs(lse[seen] - lse_ref[seen]) / np.maximum(1.0, np.abs(lse_ref[seen]))
        out["lse_err"] = float(np.where(lse_ok, np.nan_to_num(le, nan=np.inf), np.inf).max())
    else:
        out["o_err"] = out["lse_err"] = 0.0
    out["empty_exact"] = bool((not empty.any()) or ((o[empty] == 0).all() and np.isneginf(lse[empty]).all()))
    return out


def checks_part(a, run: Run) -> int:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.decode_attention.api import decode_attention

    ref = jax.jit(lambda q, k, v, p, qp, c: decode_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                            v.astype(jnp.float32), p, qp, c, impl="reference",
                                                            return_lse=True))
    failures = 0
    impls = [s for s in a.check_impls.split(",") if s]
    print(f"\n== checks: {impls} against impl='reference' in float32; tolerance {TOL['bfloat16']:g} (bf16), "
          f"{TOL['float16']:g} (fp16) on the per-row error and the LSE error", flush=True)
    for impl in impls:
        for i, case in enumerate(check_cases(a.quick)):
            if not run.time_left(f"checks {impl} {case.name}"):
                break  # recorded under 'skipped' (summary: complete = False), not counted as a failure
            base = dict(part="checks", impl=impl, **dataclasses.asdict(case), g=case.g, rows_per_group=case.t * case.g,
                        tol=TOL[case.dtype])
            t0 = time.perf_counter()
            try:
                q, k, v, pos, qpos, counts = check_inputs(case, a.seed + i)
                kw = {"n_splits": case.n_splits} if case.n_splits and impl != "reference" else {}
                fn = kernel_fn(impl, return_lse=True, **kw)
                if case.expect_error:
                    try:
                        jax.block_until_ready(fn(q, k, v, pos, qpos, counts))
                        row = dict(base, ok=False, error="no error raised for a call that must be refused")
                    except ValueError as e:
                        row = dict(base, ok=case.expect_error in str(e), refused=short(e, 300))
                else:
                    o, lse = jax.block_until_ready(fn(q, k, v, pos, qpos, counts))
                    o_r, lse_r = jax.block_until_ready(ref(q, k, v, pos, qpos, counts))
                    e = errors(o, lse, o_r, lse_r)
                    ok = e["o_err"] <= base["tol"] and e["lse_err"] <= base["tol"] and e["empty_exact"]
                    row = dict(base, ok=bool(ok), **e, counts_min=int(counts.min()), counts_max=int(counts.max()))
            except Exception as e:  # noqa: BLE001 - report, mark FAIL, go on
                row = dict(base, ok=False, error=short(e))
                traceback.print_exc(limit=3)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            run.add(row)
            failures += not row["ok"]
            if "error" in row:
                msg = f"ERROR {row['error']}"
            elif case.expect_error:
                msg = f"refused: {row.get('refused', '')[:90]}"
            else:
                msg = (f"o_err {row['o_err']:.2e}  lse_err {row['lse_err']:.2e}  empty rows {row['empty_rows']} "
                       f"exact={row['empty_exact']}")
            print(f"  {'PASS' if row['ok'] else 'FAIL'}  {impl:10s} {case.name:22s} B{case.b} T{case.t} "
                  f"H{case.h}/K{case.kh} "
                  f"C{case.c} D{case.d}  {msg}  ({row['seconds']:.1f} s)", flush=True)
    n = len([r for r in run.res["rows"] if r["part"] == "checks"])
    planned = len(impls) * len(check_cases(a.quick))
    run.res["summary"]["checks"] = dict(cases=n, planned=planned, complete=n == planned, failed=failures,
                                        passed=failures == 0, tolerance=dict(TOL))
    run.save()
    return failures


# ---------------------------------------------------------------------------------------- bench

def bench_counts(rng, b: int, kh: int, n: int, frac: float) -> np.ndarray:
    """Per-(row, head) slot counts: all n at 100%, else uniform in [0.5, 1.5] x frac * n, clipped."""
    if frac >= 1.0:
        return np.full((b, kh), n, np.int32)
    return np.clip(np.rint(rng.uniform(0.5, 1.5, (b, kh)) * frac * n), 0, n).astype(np.int32)


def timeit(fn, *args, reps: int, warmup: int, inner: int) -> dict:
    t0 = time.perf_counter()
    out = jax_block(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax_block(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax_block(fn(*args))
        ts.append((time.perf_counter() - t0) / inner)
    return dict(ms=1e3 * statistics.median(ts), ms_min=1e3 * min(ts), first_call_s=round(first, 3),
                samples=len(ts), inner=inner), out


def jax_block(x):
    import jax
    return jax.block_until_ready(x)


def inner_program(call, inner: int, jit: bool):
    """``inner`` calls, the i-th on query set i and cache copy i % copies, as one program."""
    import jax
    import jax.numpy as jnp

    def f(qs, ks, vs, *rest):
        return jnp.stack([call(qs[i], ks[i % len(ks)], vs[i % len(vs)], *rest) for i in range(inner)])
    return jax.jit(f) if jit else f


def bench_part(a, run: Run) -> int:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.decode_attention.api import decode_attention

    b, h, kh, d = a.batch, a.heads, a.kv_heads, a.head_dim
    dt = jnp.bfloat16
    ns = [int(x) for x in a.ns.split(",") if x]
    budgets = [float(x) for x in a.budgets.split(",") if x]
    impls = [s for s in a.bench_impls.split(",") if s]
    peers = [s for s in a.peers.split(",") if s]
    print(f"\n== bench: B{b} H{h}/K{kh} D{d} bf16, one query token per row; N {ns}; budgets {budgets}; kernel "
          f"{impls}; peers {peers}; {a.reps} reps x {a.inner} inner calls", flush=True)
    ref = jax.jit(lambda q, k, v, p, qp, c: decode_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                            v.astype(jnp.float32), p, qp, c, impl="reference"))
    failures = 0
    rng = np.random.default_rng(a.seed)
    for n in ns:
        if not run.time_left(f"bench N={n}"):
            break
        cache_bytes = 2 * b * kh * n * d * 2
        # one cache copy per inner call whenever they fit (a few tens of GB): with one shared copy
        # XLA may read K/V once for several calls of a program (its 32k peer row then exceeded the
        # HBM rate, 5.25 TB/s on an H200), and a small cache stays in L2
        copies = a.inner if a.inner * cache_bytes <= 40 * 2 ** 30 else 1
        try:
            keys = jax.random.split(jax.random.key(a.seed + n), 2 * copies + 1)
            ks = tuple(jax.random.normal(keys[2 * i], (b, kh, n, d), dt) for i in range(copies))
            vs = tuple(jax.random.normal(keys[2 * i + 1], (b, kh, n, d), dt) for i in range(copies))
            qs = jax.random.normal(keys[-1], (a.inner, b, 1, h, d), dt)
            qpos = jnp.full((b, 1), n + 7, jnp.int32)
            slots = jnp.arange(n, dtype=jnp.int32)
            jax_block((ks, vs, qs))
        except Exception as e:  # noqa: BLE001
            print(f"  N={n}: allocation failed: {short(e)}", flush=True)
            run.res["errors"].append(dict(part="bench", N=n, error=short(e)))
            continue
        base = dict(part="bench", B=b, H=h, K=kh, D=d, N=n, T=1, dtype="bfloat16", cache_copies=copies)
        # order: the full-cache kernel, then the peers, then the smaller budgets
        plan = [("kernel", impl, 1.0) for impl in impls if 1.0 in budgets]
        plan += [("peer", p, 1.0) for p in peers]
        plan += [("kernel", impl, f) for f in budgets if f != 1.0 for impl in impls]
        peer_arrays, programs = None, {}
        for kind, impl, frac in plan:
            what = f"bench N={n} {impl} budget={frac:g}"
            if not run.time_left(what):
                break
            row = dict(base, impl=impl, kind=kind, budget=frac)
            try:
                if kind == "kernel":
                    counts_np = bench_counts(rng, b, kh, n, frac)
                    counts = jnp.asarray(counts_np)
                    pos = jnp.broadcast_to(jnp.where(slots[None, None, :] < counts[:, :, None], slots, -1), (b, kh, n))
                    # 'mosaic_gpu@3': the Hopper kernel with a 3-slot K/V ring (its STAGES knob, read at trace time)
                    name, _, stages = impl.partition("@")
                    if name == "mosaic_gpu":
                        from pallas_kernels.decode_attention import mosaic_gpu as mg
                        mg.STAGES = int(stages) if stages else DEFAULT_STAGES
                    if impl not in programs:  # one program per (N, impl): counts and positions are arguments
                        jit = not (on_cpu() and name == "mosaic_gpu")
                        def call(q, k, v, p, qp, c, name=name):
                            return decode_attention(q, k, v, p, qp, c, impl=name)
                        programs[impl] = inner_program(call, a.inner, jit)
                    fn = programs[impl]
                    tm, out = timeit(fn, qs, ks, vs, pos, qpos, counts, reps=a.reps, warmup=a.warmup, inner=a.inner)
                    count_sum = int(counts_np.sum())
                    row.update(counts_mean=float(counts_np.mean()), counts_min=int(counts_np.min()),
                               counts_max=int(counts_np.max()), frac=count_sum / (b * kh * n))
                    if a.verify:
                        o_r = ref(qs[0], ks[0], vs[0], pos, qpos, counts)
                        e = errors(out[0], jnp.zeros(o_r.shape[:3]), o_r, jnp.zeros(o_r.shape[:3]))  # rows all read
                        if count_sum == 0:  # no row reads a slot: the output must be exactly 0
                            e = dict(o_err=float(np.abs(np.asarray(out[0], np.float32)).max()))
                        row.update(verify_err=e["o_err"], verify_ok=bool(e["o_err"] <= TOL["bfloat16"]))
                        failures += not row["verify_ok"]
                    if a.profile and n == ns[0] and frac in (max(budgets), min(budgets)) and hasattr(fn, "lower"):
                        from op_profile import print_profile, profile_ops
                        row["profile"] = profile_ops(fn, qs, ks, vs, pos, qpos, counts)  # one sample: --inner calls
                        print_profile(f"N={n} {impl} budget={frac:g} ({a.inner} calls)", row["profile"])
                else:
                    count_sum = b * kh * n
                    row.update(counts_mean=float(n), frac=1.0)
                    if peer_arrays is None:  # the uncompressed cache in attention's [B, N, K, D] layout
                        peer_arrays = (tuple(jnp.swapaxes(k, 1, 2) for k in ks),
                                       tuple(jnp.swapaxes(v, 1, 2) for v in vs))
                        jax_block(peer_arrays)
                    pk, pv = peer_arrays
                    t_q = 1
                    qq = qs
                    if impl == "cudnn_t2":  # cuDNN with two query tokens per row (if T = 1 is refused)
                        t_q, qq = 2, jnp.concatenate([qs, qs], axis=2)
                    name = "cudnn" if impl.startswith("cudnn") else "xla"
                    if name not in programs:
                        def call(q, k, v, name=name):
                            return jax.nn.dot_product_attention(q, k, v, implementation=name)
                        programs[name] = inner_program(call, a.inner, True)
                    fn = programs[name]
                    tm, _ = timeit(fn, qq, pk, pv, reps=a.reps, warmup=a.warmup, inner=a.inner)
                    row["T"] = t_q
                kv_bytes = 2 * count_sum * d * 2
                row.update(tm, kv_bytes=kv_bytes, tbps=kv_bytes / (tm["ms"] * 1e-3) / 1e12 if tm["ms"] > 0 else None)
            except Exception as e:  # noqa: BLE001 - a peer that refuses the shape is recorded
                row["error"] = short(e)
                print(f"  {what}: {short(e)}", flush=True)
            run.add(row)
            if "error" not in row:
                extra = f"  verify {row['verify_err']:.1e}" if "verify_err" in row else ""
                tb = row["tbps"] if row["tbps"] is not None else float("nan")
                print(f"  N={n:6d} {impl:10s} budget {frac:5.0%} (mean count {row['counts_mean']:8.0f})  "
                      f"{row['ms'] * 1e3:9.1f} us  {tb:6.2f} TB/s  first call {row['first_call_s']:.2f} s{extra}",
                      flush=True)
            if (kind, impl) == ("peer", "cudnn") and "error" in row and "cudnn_t2" not in peers:
                plan.append(("peer", "cudnn_t2", 1.0))  # noqa: B909 - one retry with T = 2
        del ks, vs, qs, peer_arrays, programs
        bench_summary(run, n)
    return failures


def bench_summary(run: Run, n: int) -> None:
    rows = [r for r in run.res["rows"] if r["part"] == "bench" and r["N"] == n and "error" not in r]
    s = {}
    for impl in {r["impl"] for r in rows if r["kind"] == "kernel"}:
        kr = sorted([r for r in rows if r["kind"] == "kernel" and r["impl"] == impl], key=lambda r: -r["frac"])
        full = next((r for r in kr if r["budget"] == 1.0), None)
        empty = next((r for r in kr if r["budget"] == 0.0), None)
        out = {"t_full_ms": full["ms"] if full else None, "tbps_full": full["tbps"] if full else None,
               "t_empty_ms": empty["ms"] if empty else None}
        for peer in ("cudnn", "cudnn_t2", "xla"):
            p = next((r for r in rows if r["kind"] == "peer" and r["impl"] == peer), None)
            if p and full and p["tbps"]:
                out[f"{peer}_ms"] = p["ms"]
                out[f"{peer}_tbps"] = p["tbps"]
                out[f"bw_ratio_vs_{peer}"] = full["tbps"] / p["tbps"]
        if "bw_ratio_vs_cudnn" in out or "bw_ratio_vs_cudnn_t2" in out:
            r = out.get("bw_ratio_vs_cudnn", out.get("bw_ratio_vs_cudnn_t2"))
            out["goal_1p2x_cudnn"] = bool(r >= 1.2)
        pts = [r for r in kr if r["frac"] > 0]
        if full and len(pts) >= 2:
            x = np.array([r["frac"] * full["ms"] for r in pts])
            y = np.array([r["ms"] for r in pts])
            c1, c0 = np.polyfit(x, y, 1)
            pred = c0 + c1 * x
            ss = float(((y - y.mean()) ** 2).sum())
            out.update(fit_c0_ms=float(c0), fit_c1=float(c1),
                       fit_r2=float(1 - ((y - pred) ** 2).sum() / ss) if ss > 0 else None)
            per = []
            for r in pts:
                lin = r["frac"] * full["ms"]
                item = dict(budget=r["budget"], frac=r["frac"], ms=r["ms"], linear_ms=lin,
                            ratio_to_linear=r["ms"] / lin,
                            le_1p2_linear_plus_c0=bool(r["ms"] <= 1.2 * lin + max(c0, 0.0)))
                if empty:
                    item["le_1p2_linear_plus_empty"] = bool(r["ms"] <= 1.2 * lin + empty["ms"])
                per.append(item)
            out["budgets"] = per
            out["scaling_check_c0"] = all(p["le_1p2_linear_plus_c0"] for p in per)
            if empty:
                out["scaling_check_empty"] = all(p["le_1p2_linear_plus_empty"] for p in per)
        s[impl] = out
    run.res["summary"].setdefault("bench", {})[str(n)] = s
    run.save()


# ------------------------------------------------------------------------------------------ e2e

def e2e_part(a, run: Run) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxeff import Transformer
    from jaxeff.config.presets import get_preset
    from jaxeff.generate import _extend_kw, kv_transform, sample_logits
    from jaxeff.kv import with_decode_kernel

    base_cfg = get_preset(a.e2e_preset).model
    prompt, new = a.e2e_prompt, a.e2e_new
    capacity = -(-(prompt + new) // a.e2e_align) * a.e2e_align
    over = dict(max_seq_len=capacity)
    if a.e2e_dtype:
        over.update(dtype=a.e2e_dtype, param_dtype=a.e2e_dtype)
    if a.e2e_layers:
        over["n_layers"] = a.e2e_layers
    if a.e2e_attn:
        over["attention_impl"] = a.e2e_attn
    cfg = dataclasses.replace(base_cfg, **over)
    variants = [tuple(v.split("/")) for v in a.e2e_variants.split(",") if v]
    bad = [v for v in variants if len(v) != 2]
    if bad:
        raise ValueError(f"--e2e-variants: each item must be POLICY/READ (e.g. snapkv/mosaic_gpu), got {bad}")
    policies = list(dict.fromkeys(None if p in ("full", "none") else p for p, _ in variants))
    variants = [("full" if p == "none" else p, r) for p, r in variants]
    print(f"\n== e2e: preset {a.e2e_preset} ({cfg.n_layers} layers, d {cfg.d_model}, {cfg.n_heads} heads / "
          f"{cfg.n_kv_heads} KV of {cfg.resolved_head_dim}, {cfg.dtype}), prompt {prompt}, {new} new tokens, "
          f"capacity {capacity}, prefill chunks of {a.e2e_chunk}; budget {a.e2e_budget:g}; variants "
          f"{['/'.join(v) for v in variants]}", flush=True)
    dev = jax.devices()[0]

    def mem() -> dict:
        try:
            st = dev.memory_stats() or {}
        except Exception:  # noqa: BLE001
            st = {}
        return {"bytes_in_use": st.get("bytes_in_use"), "peak_bytes_in_use": st.get("peak_bytes_in_use")}

    def analysis(compiled) -> dict:
        try:
            m = compiled.memory_analysis()
            return {k: getattr(m, k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                               "temp_size_in_bytes", "alias_size_in_bytes") if hasattr(m, k)}
        except Exception:  # noqa: BLE001
            return {}

    tokens_np = np.random.default_rng(a.seed).integers(0, cfg.vocab_size, (1, prompt))
    transforms = {p: (kv_transform(p, a.e2e_budget) if p else None) for p in policies}
    stats_rows = max([t.stats_rows for t in transforms.values() if t is not None] + [0])
    stats_sums = any(getattr(t, "stats_sums", False) for t in transforms.values() if t is not None)
    chunk = max(a.e2e_chunk, stats_rows) if a.e2e_chunk else prompt
    bounds = list(range(prompt % chunk, prompt + 1, chunk))
    bounds = ([0] if bounds[0] != 0 else []) + bounds  # the first chunk takes the remainder: the last one is full
    tokens = jnp.asarray(tokens_np, jnp.int32)
    pieces = [tokens[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    @functools.partial(jax.jit, static_argnames=("t",))
    def compress(cache, stats, t):
        return t.after_prefill(cache, None, stats)

    def build(cfg):
        """The model and its programs (fresh jit objects: they close over the graphdef)."""
        t0 = time.perf_counter()
        model = Transformer(cfg, rngs=nnx.Rngs(a.seed))
        graphdef, state = nnx.split(model)
        jax_block(state)
        n_params = sum(x.size for x in jax.tree.leaves(state))
        init_s = time.perf_counter() - t0
        print(f"  model: {n_params / 1e9:.3f} B parameters, attention {cfg.attention_impl}, init {init_s:.1f} s; "
              f"memory {mem()}", flush=True)

        @functools.partial(jax.jit, donate_argnums=(2,))
        def prefill_chunk(state, toks, cache):
            m = nnx.merge(graphdef, state)
            kw = {"stats_rows": stats_rows}
            if stats_sums:
                kw["stats_sums"] = True
            logits, cache, stats = m.extend(toks, cache, **kw)
            return logits[:, -1], cache, stats

        def fresh_cache(t):
            m = nnx.merge(graphdef, state)
            cache = m.init_cache(1, capacity)
            if t is not None and hasattr(t, "prepare"):
                cache = t.prepare(cache, m)
            return cache

        @functools.partial(jax.jit, static_argnames=("t", "n", "read"))
        def decode(state, first, cache, tstate, t, n, read):
            """``jaxeff.generate``'s decode loop (greedy): ``n`` steps of ``extend`` with the
            policy's ``observe`` (and its compression interval, if any), the cache read by ``read``."""
            m = nnx.merge(graphdef, state)
            if read != "xla":
                cache = with_decode_kernel(cache, read)
            every = t.interval() if t is not None else None

            def step(carry, i):
                tok, cache, tstate = carry
                logits, cache, stats = m.extend(tok[:, None], cache, **_extend_kw(t, False))
                if t is not None and hasattr(t, "observe"):
                    tstate = t.observe(cache, tstate, stats)
                if t is not None and every:
                    cache, tstate = jax.lax.cond(i % every == 0, lambda c, s: t(c, s, stats), lambda c, s: (c, s),
                                                 cache, tstate)
                nxt = sample_logits(logits[:, 0], jax.random.key(0), 0.0, None)
                return (nxt, cache, tstate), tok

            (_, cache, _), toks = jax.lax.scan(step, (first, cache, tstate), jnp.arange(1, n + 1, dtype=jnp.int32))
            return toks.T, cache.layers[0].counts

        return dict(cfg=cfg, state=state, prefill_chunk=prefill_chunk, fresh_cache=fresh_cache, decode=decode,
                    params=int(n_params), init_s=init_s, compiled_chunks={})

    if not run.time_left("e2e model init"):
        return 0
    mdl = build(cfg)
    run.res["summary"]["e2e"] = dict(preset=a.e2e_preset, params=mdl["params"], init_s=mdl["init_s"], prompt=prompt,
                                     new=new, capacity=capacity, chunk=chunk, budget=a.e2e_budget,
                                     model_cfg=dataclasses.asdict(cfg))

    def prefill(t, prow):
        state, fresh_cache, compiled = mdl["state"], mdl["fresh_cache"], mdl["compiled_chunks"]
        cache = fresh_cache(t)
        tc = time.perf_counter()
        for p in pieces:  # one compile per chunk shape (shared by the policies when the cache type is)
            key = (p.shape, jax.tree.structure(cache))
            if key not in compiled:
                compiled[key] = mdl["prefill_chunk"].lower(state, p, cache).compile()
        compile_s = time.perf_counter() - tc
        del cache

        def run_prefill():
            c = fresh_cache(t)
            last = stats = None
            for p in pieces:
                last, c, stats = compiled[(p.shape, jax.tree.structure(c))](state, p, c)
            jax_block((last, c))
            return last, c, stats

        tw = time.perf_counter()
        jax_block(run_prefill())  # warm (the first run of the compiled chunks)
        warm_s = time.perf_counter() - tw
        tp = time.perf_counter()
        last, cache, stats = run_prefill()
        prefill_s = time.perf_counter() - tp
        prow.update(attention_impl=mdl["cfg"].attention_impl, compile_s=compile_s, warm_run_s=warm_s,
                    prefill_s=prefill_s, prefill_tok_s=prompt / prefill_s, memory_after_prefill=mem(),
                    chunk_memory_analysis=analysis(next(iter(compiled.values()))))
        tstate = ()
        if t is not None:
            cc = compress.lower(cache, stats, t).compile()
            jax_block(cc(cache, stats))  # warm
            tq = time.perf_counter()
            cache, tstate = jax_block(cc(cache, stats))
            prow["compress_s"] = time.perf_counter() - tq
            prow["prefill_plus_compress_s"] = prefill_s + prow["compress_s"]
        del stats
        counts = np.asarray(cache.layers[0].counts)
        prow.update(kept_mean=float(counts.mean()), kept_frac=float(counts.mean() / prompt),
                    cache_alloc_bytes=int(cache.nbytes()), memory_after_compress=mem())
        return jnp.argmax(last, -1).astype(jnp.int32), cache, tstate

    prefilled: dict = {}  # policy label -> (t, first token, cache, tstate, prefill row)
    for pname in policies:  # phase 1: every policy's prompt, kept for its decode variants
        t = transforms[pname]
        label = pname or "full"
        if not run.time_left(f"e2e {label} prefill"):
            break
        prow = dict(part="e2e", phase="prefill", policy=label, budget=a.e2e_budget if t else 1.0, prompt=prompt,
                    capacity=capacity, chunks=len(pieces), chunk=chunk)
        try:
            try:
                first, cache, tstate = prefill(t, prow)
            except Exception as e:  # noqa: BLE001 - e.g. cuDNN refusing the chunk's dense mask: XLA attention
                if mdl["cfg"].attention_impl == "xla" or prefilled:
                    raise
                print(f"  prefill {label} with attention {mdl['cfg'].attention_impl!r} failed ({short(e, 300)}); "
                      f"again with attention_impl='xla'", flush=True)
                run.res["errors"].append(dict(part="e2e", phase="prefill", attention=mdl["cfg"].attention_impl,
                                              error=short(e)))
                del mdl
                mdl = build(dataclasses.replace(cfg, attention_impl="xla"))
                run.res["summary"]["e2e"]["attention_fallback"] = "xla"
                first, cache, tstate = prefill(t, prow)
            prefilled[label] = (t, first, cache, tstate, prow)
        except Exception as e:  # noqa: BLE001
            prow["error"] = short(e)
            traceback.print_exc(limit=4)
            run.add(prow)
            print(f"  prefill {label}: ERROR {prow['error']}", flush=True)
            continue
        run.add(prow)
        print(f"  prefill {label:8s} {prow['prefill_s']:7.3f} s ({prow['prefill_tok_s']:9.0f} tok/s; compile "
              f"{prow['compile_s']:.1f} s){'  + compress %.3f s' % prow['compress_s'] if 'compress_s' in prow else ''}"
              f"  kept {prow['kept_frac']:.1%}  peak {fmt_bytes(prow['memory_after_compress']['peak_bytes_in_use'])}",
              flush=True)

    tokens_by_variant: dict = {}
    for label, read in variants:  # phase 2: the decode variants, most important first
        if label not in prefilled:
            continue
        if not run.time_left(f"e2e {label}/{read} decode"):
            break
        t, first, cache, tstate, prow = prefilled[label]
        drow = dict(part="e2e", phase="decode", policy=label, read=read, budget=prow["budget"], prompt=prompt,
                    new=new, capacity=capacity, kept_frac=prow["kept_frac"], prefill_s=prow["prefill_s"],
                    prefill_tok_s=prow["prefill_tok_s"], compress_s=prow.get("compress_s"))
        try:
            tc = time.perf_counter()
            state = mdl["state"]
            dc = mdl["decode"].lower(state, first, cache, tstate, t=t, n=new, read=read).compile()
            drow["compile_s"] = time.perf_counter() - tc
            drow["memory_analysis"] = analysis(dc)
            jax_block(dc(state, first, cache, tstate))  # warm
            ts = []
            for _ in range(a.e2e_reps):
                td = time.perf_counter()
                toks, kept = jax_block(dc(state, first, cache, tstate))
                ts.append(time.perf_counter() - td)
            dt_s = statistics.median(ts)
            toks = np.asarray(toks)[0]
            tokens_by_variant[(label, read)] = toks
            drow.update(decode_s=dt_s, decode_tok_s=new / dt_s, ms_per_token=1e3 * dt_s / new,
                        kept_after_decode_mean=float(np.asarray(kept).mean()), memory=mem(),
                        first_tokens=toks[:8].tolist())
            other = next((v for (lb, rd), v in tokens_by_variant.items() if lb == label and rd != read), None)
            if other is not None:  # greedy tokens of the same cache read two ways (ties may differ in bf16)
                drow["tokens_agree_with_other_read"] = float((other == toks).mean())
        except Exception as e:  # noqa: BLE001
            drow["error"] = short(e)
            traceback.print_exc(limit=4)
        run.add(drow)
        if "error" in drow:
            print(f"  decode {label} {read}: ERROR {drow['error']}", flush=True)
        else:
            agree = drow.get("tokens_agree_with_other_read")
            print(f"  decode  {label:8s} read {read:10s} {drow['decode_tok_s']:8.1f} tok/s "
                  f"({drow['ms_per_token']:.2f} ms/token; compile {drow['compile_s']:.1f} s)  peak "
                  f"{fmt_bytes(drow['memory']['peak_bytes_in_use'])}"
                  f"{'' if agree is None else f'  tokens agree with the other read: {agree:.0%}'}", flush=True)
    del prefilled
    e2e_summary(run)
    return 0


def e2e_summary(run: Run) -> None:
    rows = [r for r in run.res["rows"] if r["part"] == "e2e" and r.get("phase") == "decode" and "error" not in r]
    s = run.res["summary"].setdefault("e2e", {})
    s["decode_tok_s"] = {f"{r['policy']}/{r['read']}": r["decode_tok_s"] for r in rows}
    base = next((r for r in rows if r["policy"] == "full" and r["read"] == "xla"), None)
    if base:
        s["speedup_vs_full_xla"] = {f"{r['policy']}/{r['read']}": r["decode_tok_s"] / base["decode_tok_s"]
                                    for r in rows}
    run.save()


def fmt_bytes(x) -> str:
    return "n/a" if x is None else f"{x / 2 ** 30:.2f} GiB"


# ----------------------------------------------------------------------------------------- table

def print_table(res: dict) -> None:
    rows = res["rows"]
    ch = [r for r in rows if r["part"] == "checks"]
    if ch:
        print(f"\nchecks: {sum(r['ok'] for r in ch)}/{len(ch)} passed")
        for r in ch:
            if not r["ok"]:
                print(f"  FAIL {r['impl']} {r['name']}: {r.get('error') or r}")
    be = [r for r in rows if r["part"] == "bench"]
    if be:
        print(f"\n{'N':>7s} {'impl':10s} {'budget':>6s} {'count':>8s} {'us':>9s} {'TB/s':>6s} {'verify':>8s}")
        for r in be:
            if "error" in r:
                print(f"{r['N']:7d} {r['impl']:10s} {r['budget']:6.0%} ERROR {r['error'][:80]}")
                continue
            tb = r["tbps"] if r["tbps"] is not None else float("nan")
            ve = f"{r['verify_err']:8.1e}" if "verify_err" in r else ""
            print(f"{r['N']:7d} {r['impl']:10s} {r['budget']:6.0%} {r['counts_mean']:8.0f} {r['ms'] * 1e3:9.1f} "
                  f"{tb:6.2f} {ve}")
        for n, per in res["summary"].get("bench", {}).items():
            for impl, s in per.items():
                parts = [f"N={n} {impl}:"]
                for peer in ("cudnn", "cudnn_t2", "xla"):
                    if f"bw_ratio_vs_{peer}" in s:
                        parts.append(f"bw/{peer} {s[f'bw_ratio_vs_{peer}']:.2f}x")
                if "goal_1p2x_cudnn" in s:
                    parts.append(f"goal>=1.2x cuDNN {'met' if s['goal_1p2x_cudnn'] else 'NOT met'}")
                if "fit_c0_ms" in s:
                    parts.append(f"fit c0 {s['fit_c0_ms'] * 1e3:.1f} us, c1 {s['fit_c1']:.2f}")
                    parts.append(f"t<=1.2 f t_full + c0: {s['scaling_check_c0']}")
                if s.get("t_empty_ms") is not None:
                    parts.append(f"empty {s['t_empty_ms'] * 1e3:.1f} us")
                if "scaling_check_empty" in s:
                    parts.append(f"t<=1.2 f t_full + empty: {s['scaling_check_empty']}")
                print("  " + ", ".join(parts))
    e2 = [r for r in rows if r["part"] == "e2e" and r.get("phase") == "decode"]
    if e2:
        print(f"\n{'policy':8s} {'read':10s} {'kept':>6s} {'prefill s':>9s} {'decode tok/s':>12s} {'ms/tok':>7s} "
              f"{'peak':>10s}")
        for r in e2:
            if "error" in r:
                print(f"{r['policy']:8s} {r['read']:10s} ERROR {r['error'][:80]}")
                continue
            print(f"{r['policy']:8s} {r['read']:10s} {r['kept_frac']:6.1%} {r['prefill_s']:9.3f} "
                  f"{r['decode_tok_s']:12.1f} {r['ms_per_token']:7.2f} "
                  f"{fmt_bytes(r['memory']['peak_bytes_in_use']):>10s}")


# ------------------------------------------------------------------------------------------ main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="checks,bench", help=f"comma-separated, of {PARTS}")
    p.add_argument("--quick", action="store_true", help="tiny shapes on a CPU (interpret mode), under a minute")
    p.add_argument("--profile", action="store_true",
                   help="trace the kernel's sample at the first cache size, largest and smallest budget: device ms "
                        "per op (the kernel, the combine and the XLA ops around it) in the JSON")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/bench_decode.json, else experiments/results/)")
    p.add_argument("--deadline-s", type=float, default=1e9, help="start no new case after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-impls", default="mosaic_gpu", help="implementations checked against the reference")
    p.add_argument("--bench-impls", default=None, help="kernel implementations timed (default mosaic_gpu; quick: "
                                                       "portable); 'mosaic_gpu@3': its K/V ring with 3 slots")
    p.add_argument("--peers", default="cudnn,xla", help="full-cache peers: cudnn, xla (cudnn_t2: cuDNN with T = 2)")
    p.add_argument("--ns", default=None, help="cache slots, in order (default 32768,131072,4096)")
    p.add_argument("--budgets", default=None, help="count / N fractions (default 1,0.5,0.25,0.1,0)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="timed samples (median; default 20, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 2, quick 0)")
    p.add_argument("--inner", type=int, default=None, help="calls per timed sample, one program (default 8, quick 1)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the bench rows' reference check")
    p.add_argument("--e2e-preset", default=None, help="jaxeff.config preset (default 1b, quick tiny)")
    p.add_argument("--e2e-layers", type=int, default=None, help="override the preset's layer count (0: keep; "
                                                                 "default 0, quick 2)")
    p.add_argument("--e2e-dtype", default=None, help="compute and parameter dtype (default bfloat16, quick: the "
                                                     "preset's)")
    p.add_argument("--e2e-prompt", type=int, default=None, help="prompt tokens (default 32768, quick 64)")
    p.add_argument("--e2e-new", type=int, default=None, help="new tokens (default 64, quick 4)")
    p.add_argument("--e2e-chunk", type=int, default=None, help="prefill chunk (default 4096, quick 32; 0: one extend)")
    p.add_argument("--e2e-align", type=int, default=512, help="round the cache capacity up to this many slots")
    p.add_argument("--e2e-attn", default="", help="the model's attention_impl (default: the preset's, 'auto'); a "
                                                  "prefill that fails with it is run again with 'xla'")
    p.add_argument("--e2e-budget", type=float, default=0.25, help="SnapKV's budget (ratio of the prompt)")
    p.add_argument("--e2e-variants", default=None,
                   help="POLICY/READ decode variants in order (policy: full or a jaxeff.kv policy at --e2e-budget; "
                        "read: xla or a decode kernel); default full/xla,snapkv/mosaic_gpu,full/mosaic_gpu,snapkv/xla "
                        "(quick: portable for mosaic_gpu)")
    p.add_argument("--e2e-reps", type=int, default=None, help="timed decode runs (median; default 2, quick 1)")
    a = p.parse_args(argv)
    q = a.quick
    def dflt(name, full, quick):  # an option left unset takes its full-run or quick default
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    dflt("out", default_out(), default_out())
    dflt("bench_impls", "mosaic_gpu", "portable")
    dflt("ns", "32768,131072,4096", "256,128")
    dflt("budgets", "1,0.5,0.25,0.1,0", "1,0.25,0")
    dflt("batch", 8, 2)
    dflt("heads", 32, 8)
    dflt("kv_heads", 8, 2)
    dflt("head_dim", 128, 64)
    dflt("reps", 20, 2)
    dflt("warmup", 2, 0)
    dflt("inner", 8, 1)
    dflt("e2e_preset", "1b", "tiny")
    dflt("e2e_layers", 0, 2)
    dflt("e2e_dtype", "bfloat16", "")
    dflt("e2e_prompt", 32768, 64)
    dflt("e2e_new", 64, 4)
    dflt("e2e_chunk", 4096, 32)
    dflt("e2e_variants", "full/xla,snapkv/mosaic_gpu,full/mosaic_gpu,snapkv/xla",
         "full/xla,snapkv/portable,full/portable,snapkv/xla")
    dflt("e2e_reps", 2, 1)
    if q and a.e2e_align == 512:
        a.e2e_align = 16
    a.parts = [s for s in a.parts.split(",") if s]
    bad = [s for s in a.parts if s not in PARTS]
    if bad:
        p.error(f"--parts: unknown {bad}; known {PARTS}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    import warnings
    warnings.filterwarnings("ignore", message=".*[Dd]onat.*")  # CPU: donated buffers are not reused
    import jax
    dev = jax.devices()[0]
    meta = dict(device=dev.device_kind, platform=dev.platform, compute_capability=str(getattr(dev, "compute_capability",
                                                                                              "")),
                n_devices=jax.device_count(), jax=jax.__version__, jaxlib=getattr(jax.lib, "__version__", None),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:] if argv is None else list(argv),
                quick=a.quick, parts=a.parts, deadline_s=a.deadline_s, anchor_h100_32k_us=ANCHOR_H100_32K_US,
                settings={k: v for k, v in vars(a).items() if k not in ("parts",)})
    try:
        import jaxlib
        meta["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    print(f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}; parts {a.parts}; out {a.out}", flush=True)
    run = Run(a, meta, T_START if argv is None else time.perf_counter())  # in-process callers: from the call
    run.save()
    failures, crashed = 0, []
    for part, fn in (("checks", checks_part), ("bench", bench_part), ("e2e", e2e_part)):
        if part not in a.parts:
            continue
        try:
            failures += fn(a, run)
        except Exception as e:  # noqa: BLE001 - the other parts still run
            traceback.print_exc()
            crashed.append(part)
            run.res["errors"].append(dict(part=part, error=short(e, 2000)))
        run.save()
    run.res["summary"]["failures"] = failures
    run.res["summary"]["crashed_parts"] = crashed
    run.save()
    print_table(run.res)
    print(f"\nwrote {a.out} ({run.elapsed():.1f} s); failed checks: {failures}; crashed parts: {crashed or 'none'}")
    return 1 if failures else (2 if crashed else 0)


if __name__ == "__main__":
    sys.exit(main())

"""MoE expert kernels on one GPU, in one run: the chunk-sparse FFN kernel (BlockFFN's union of
active experts per chunk, ``pallas_kernels.chunk_sparse_ffn``) against the dense FFN with the same
parameters, and top-k grouped matmuls (``jax.lax.ragged_dot``, tokamax's ``ragged_dot``, jaxeff's
path) against a dense matmul of the same FLOPs.

Three parts (``--parts checks,chunk,grouped``, that order; each case written to the JSON as soon
as it is done, so a run killed at its time limit keeps what it measured):

1. ``checks``: ``impl=--impl`` (``mosaic_gpu``) against ``impl='reference'`` computed in float32
   from the same (bf16 / fp16) inputs, on fresh random inputs: T not a multiple of the chunk
   length, chunk lengths 1 / 8 / 32 / 64, decoding (T = 1) and verification (T = 5) rows, chunks
   whose union is empty, chunks using every expert, all activations zero, E64 F128 at D 2048
   and 1024, the paper's small layer, a small D. Error = max|y - ref| / max|ref| (max|y| when
   ref is all zero); tolerances ``TOL`` (bf16 2e-2, fp16 5e-3: the kernel rounds h to the
   input dtype before the down projection and y at the end, about 2^-8 / 2^-11 of the largest
   |y|, so these leave ~5x headroom). A case the kernel does not apply to (its ``applies()``)
   is ``N/A``, not a failure. Any FAIL makes the exit code 1 (after the other parts ran).
2. ``chunk``: the BlockFFN sweep, 8192 tokens (B 4, T 2048), bf16: union ratios 5 .. 100% of the
   experts (each chunk's union has exactly round(ratio * E) experts, a random set per chunk;
   each token of the chunk activates a random subset of it, every union expert used by at least
   one token) x chunk lengths 64, 32, 8, 1 (in that order: the most informative first). Timed
   with the same weights and activations in the same run: the kernel (the public call, jitted:
   chunking, union lists and the kernel) and the dense FFN ``(silu(x @ W_up_all) * a_all) @
   W_down_all`` (``W_up_all [D, E*F]``, ``W_down_all [E*F, D]``; two bf16 matmuls with bf16
   outputs, which cuBLAS accumulates in float32, silu * a in float32). Goal per row: kernel_ms
   <= 1.25 * union_ratio * dense_ms (union_ratio: the achieved mean union / E). The summary
   fits a fixed overhead: max(kernel_ms - goal_ms) and kernel_ms ~ c0 + c1 * ratio * dense_ms.
3. ``grouped``: top-1 and top-8 of 64 experts for 8192 tokens, expert weights [64, 2048, 512]
   (the same active parameters per assignment), random routing (k distinct experts per token,
   uniform: balanced in expectation). The assignments sorted by expert once; timed on the same
   sorted input: ``jax.lax.ragged_dot``, ``tokamax.ragged_dot`` (its default chain and Mosaic
   forced, when tokamax imports), jaxeff's ``ragged_dot_impl('auto')``, and a dense matmul
   ``[N*k, 2048] @ [2048, 512]`` (same FLOPs); all bf16 in, ``preferred_element_type=float32``
   out. Plus jaxeff's whole ``ragged_experts`` (sort + up and down grouped matmuls + scatter-add,
   twice the FLOPs, counted as such). Goals: jaxeff >= 10x lax.ragged_dot, >= 60% of dense.

Timings (``experiments/bench_attention.py``'s style): a compile call, a timed warm call, a
warm-up when that is fast, then the median of up to ``--reps`` calls, each ended by
``block_until_ready`` (``--inner N``: N calls per sample, time per call); a slow case takes
fewer reps (``--case-budget-s``). ``--deadline-s``:
no new case starts after that many seconds from the start (the chunk sweep stops
``--grouped-reserve-s`` earlier so that the grouped part still runs). ``--quick``: tiny shapes
for a CPU smoke test (``mosaic_gpu`` in interpret mode for the checks, ``portable`` for the sweep).

``python experiments/bench_moe.py [--quick] [--parts ...] [--deadline-s S] [--out PATH]``;
``python experiments/plot_moe.py PATH --out moe.png`` draws the JSON.
"""

from __future__ import annotations

import argparse
import datetime
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

PARTS = ("checks", "chunk", "grouped")
TOL = {"bfloat16": 2e-2, "float16": 5e-3}
RATIOS = (0.05, 0.10, 0.125, 0.25, 0.50, 1.00)
CHUNK_ORDER = (64, 32, 8, 1)
GOAL_FACTOR = 1.25
GOAL_LAX_SPEEDUP = 10.0
GOAL_DENSE_FRACTION = 0.60


# ------------------------------------------------------------------------------------ cases

def check_cases(quick: bool):
    """(name, B, T, D, E, F, chunk_len, union, dtypes); union: 'mixed' (random union sizes per
    chunk in [0, E], the first chunk empty and the second (or last) using every expert), 'full'
    (every chunk uses every expert) or 'zero' (all a = 0)."""
    both, bf = ("bfloat16", "float16"), ("bfloat16",)
    if quick:
        return [("D128 E4 F64 T40 L16 (T % L != 0)", 1, 40, 128, 4, 64, 16, "mixed", both),
                ("D64 E4 F128 T6 L1", 2, 6, 64, 4, 128, 1, "mixed", bf),
                ("D128 E4 F64 T8 all a = 0", 1, 8, 128, 4, 64, 64, "zero", ("float16",)),
                ("D2048 E4 F64 T8 L8 (D beyond v1's 1024 limit)", 1, 8, 2048, 4, 64, 8, "mixed", bf)]
    # the cases a short GPU budget must reach first: the main D, the edge unions, decoding rows
    return [("D2048 E64 F128 T130 L64", 1, 130, 2048, 64, 128, 64, "mixed", both),
            ("D256 E16 F128 T128 L64 every chunk all experts", 1, 128, 256, 16, 128, 64, "full", both),
            ("D512 E32 F128 T64 all a = 0", 1, 64, 512, 32, 128, 64, "zero", bf),
            ("D256 E16 F64 T1 (decoding rows)", 4, 1, 256, 16, 64, 64, "mixed", both),
            ("D256 E16 F64 T5 (verification rows)", 2, 5, 256, 16, 64, 64, "mixed", bf),
            ("D768 E48 F64 T96 L32 (paper small)", 2, 96, 768, 48, 64, 32, "mixed", both),
            ("D256 E16 F64 T200 L64 (T % L != 0)", 2, 200, 256, 16, 64, 64, "mixed", both),
            ("D256 E16 F128 T100 L32 (T % L != 0)", 2, 100, 256, 16, 128, 32, "mixed", both),
            ("D256 E8 F64 T37 L8 (T % L != 0)", 2, 37, 256, 8, 64, 8, "mixed", both),
            ("D256 E8 F128 T24 L1", 2, 24, 256, 8, 128, 1, "mixed", both),
            ("D1024 E64 F128 T130 L64", 1, 130, 1024, 64, 128, 64, "mixed", both)]


def sweep_shapes(quick: bool):
    """The chunk sweep's layers. The paper's small shape (BlockFFN 0.1B, ../shared/papers/
    blockffn.md): d_h 768, 48 experts of width 64. D 2048 is the brief's main shape (v1 of the
    mosaic_gpu kernel took D <= 1024 only, so D 1024 with the same experts was timed too)."""
    if quick:
        return [dict(name="quick D128 E8 F64", b=2, t=64, d=128, e=8, f=64)]
    return [dict(name="D2048 E64 F128", b=4, t=2048, d=2048, e=64, f=128),
            dict(name="paper small D768 E48 F64", b=4, t=2048, d=768, e=48, f=64),
            dict(name="D1024 E64 F128", b=4, t=2048, d=1024, e=64, f=128)]


# ------------------------------------------------------------------------------- activations

def make_activations(rng: np.random.Generator, b: int, t: int, e: int, chunk_len: int, union_sizes,
                     p_token: float = 0.5) -> np.ndarray:
    """``a [B, T, E]`` float32: chunk c of row r (the api's chunking: a whole row when T <=
    chunk_len) has a union of exactly ``union_sizes[r, c]`` experts (a random set), each token
    activates each union expert with probability ``p_token`` (values in [0.1, 1)), and every
    union expert is activated by at least one token of the chunk."""
    from pallas_kernels.chunk_sparse_ffn.common import chunk_shape

    n, length = chunk_shape(t, chunk_len)
    lens = np.full(n, length)
    lens[-1] = t - (n - 1) * length
    c = b * n
    sizes = np.broadcast_to(np.asarray(union_sizes), (b, n)).reshape(c)
    lens_c = np.tile(lens, b)
    perm = rng.random((c, e)).argsort(axis=1)
    pos = np.empty_like(perm)
    pos[np.arange(c)[:, None], perm] = np.arange(e)[None, :]
    in_union = pos < sizes[:, None]  # [C, E]
    valid = np.arange(length)[None, :] < lens_c[:, None]  # [C, L]
    m = (rng.random((c, length, e)) < p_token) & in_union[:, None, :] & valid[:, :, None]
    uncovered = in_union & ~m.any(axis=1)
    tok = np.minimum((rng.random((c, e)) * lens_c[:, None]).astype(np.int64), lens_c[:, None] - 1)
    ci, ei = np.nonzero(uncovered)
    m[ci, tok[ci, ei], ei] = True
    vals = rng.uniform(0.1, 1.0, (c, length, e)).astype(np.float32)
    a = np.where(m, vals, np.float32(0)).reshape(b, n * length, e)[:, :t]
    return np.ascontiguousarray(a)


def union_stats(a: np.ndarray, chunk_len: int) -> dict:
    """Achieved mean union ratio (union size / E over chunks), min / max union size, token density."""
    from pallas_kernels.chunk_sparse_ffn.common import chunk_shape

    b, t, e = a.shape
    n, length = chunk_shape(t, chunk_len)
    pad = n * length - t
    ap = np.pad(a != 0, ((0, 0), (0, pad), (0, 0))).reshape(b * n, length, e)
    u = ap.any(axis=1).sum(axis=-1)
    return dict(union_ratio=float(u.mean() / e), union_min=int(u.min()), union_max=int(u.max()),
                token_density=float((a != 0).mean()))


# ----------------------------------------------------------------------------------- timing

def timeit(fn, *args, reps: int, budget_s: float, inner: int = 1):
    """(median seconds per call, reps used, first-call seconds incl. compile). Each sample times
    ``inner`` calls dispatched back to back and one wait (more than 1 hides the host's launch and
    wait, ~0.15 ms per call on an H200, behind the device's work)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warm = time.perf_counter() - t0
    if warm < 0.05:
        jax.block_until_ready(fn(*args))
    n = max(1, min(reps, int(budget_s / max(warm * inner, 1e-6))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(inner)])
        ts.append((time.perf_counter() - t0) / inner)
    if n < 3:
        ts.append(warm)
    return statistics.median(ts), n, first


def _err(e: BaseException, limit: int = 600) -> str:
    return f"{type(e).__name__}: {str(e)[:limit]}"


def rel_err(y, ref) -> float:
    y = np.asarray(y, np.float32)
    ref = np.asarray(ref, np.float32)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(y - ref))) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


# ---------------------------------------------------------------------------------- context

class Run:
    """The rows, the clock and the JSON written after every case."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.tokamax = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def past(self, limit: float) -> bool:
        return self.elapsed() > limit

    def add(self, row: dict) -> None:
        row["t_s"] = round(self.elapsed(), 2)
        self.rows.append(row)
        self.write()

    def write(self, status: str = "running") -> None:
        doc = dict(self.meta, status=status, elapsed_s=round(self.elapsed(), 2), skipped=self.skipped,
                   errors=self.errors, summary=summarize(self.rows), rows=self.rows)
        path = self.args.out
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=_json_default)
        os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    return str(o)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _finite(v) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


# ---------------------------------------------------------------------------------- checks

def checks_part(run: Run) -> None:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.chunk_sparse_ffn import api
    from pallas_kernels.chunk_sparse_ffn.common import chunk_shape

    args = run.args
    impl = args.impl
    limit = min(args.deadline_s, args.checks_budget_s)
    print(f"\n== checks: impl={impl!r} against impl='reference' in float32; tolerances {TOL} ==", flush=True)
    ref_fn = {}
    for i, (name, b, t, d, e, f, chunk_len, union, dtypes) in enumerate(check_cases(args.quick)):
        for dt in dtypes:
            base = dict(part="checks", case=name, dtype=dt, B=b, T=t, D=d, E=e, F=f, chunk_len=chunk_len,
                        union=union, impl=impl, tol=TOL[dt])
            if run.past(limit):
                run.add(dict(base, status="SKIPPED", error=f"deadline / checks budget ({limit:.0f} s) reached"))
                print(f"  SKIPPED {name} {dt}: deadline / checks budget ({limit:.0f} s) reached", flush=True)
                continue
            rng = np.random.default_rng(1000 + 17 * i + (dt == "float16"))
            n, _ = chunk_shape(t, chunk_len)
            if union == "zero":
                sizes = np.zeros((b, n), np.int64)
            elif union == "full":
                sizes = np.full((b, n), e, np.int64)
            else:
                sizes = rng.integers(0, e + 1, (b, n))
                flat = sizes.reshape(-1)  # a view: chunk 0 of row 0 empty, the next chunk every expert
                flat[0] = 0
                if flat.size > 1:
                    flat[1] = e
            a_np = make_activations(rng, b, t, e, chunk_len, sizes)
            stats = union_stats(a_np, chunk_len)
            base.update(union_min=stats["union_min"], union_max=stats["union_max"],
                        union_ratio=stats["union_ratio"])
            dtype = jnp.dtype(dt)
            x = jnp.asarray(rng.standard_normal((b, t, d), np.float32)).astype(dtype)
            w_up = jnp.asarray(rng.standard_normal((e, d, f), np.float32) / np.sqrt(d)).astype(dtype)
            w_down = jnp.asarray(rng.standard_normal((e, f, d), np.float32) / np.sqrt(f)).astype(dtype)
            a = jnp.asarray(a_np)
            _, length = chunk_shape(t, chunk_len)
            ok, why = api.applies(impl, jax.ShapeDtypeStruct((1, length, d), dtype), w_up, w_down)
            if not ok:
                run.add(dict(base, status="N/A", error=f"not applicable: {why}"))
                print(f"  N/A     {name:52s} {dt:8s}: {why}", flush=True)
                continue
            t_case = time.perf_counter()
            try:
                if chunk_len not in ref_fn:
                    ref_fn[chunk_len] = jax.jit(functools.partial(api.chunk_sparse_ffn, chunk_len=chunk_len,
                                                                  impl="reference"))
                f32 = jnp.float32
                ref = np.asarray(ref_fn[chunk_len](x.astype(f32), a, w_up.astype(f32), w_down.astype(f32)))
                fn = jax.jit(functools.partial(api.chunk_sparse_ffn, chunk_len=chunk_len, impl=impl))
                y = fn(x, a, w_up, w_down)
                y = np.asarray(jax.block_until_ready(y).astype(f32))
                err = rel_err(y, ref)
                finite = bool(np.isfinite(y).all())
                passed = finite and err <= TOL[dt]
                run.add(dict(base, status="PASS" if passed else "FAIL", rel_err=_finite(err), finite=finite,
                             max_abs_ref=float(np.max(np.abs(ref))) if ref.size else 0.0,
                             seconds=round(time.perf_counter() - t_case, 2)))
                print(f"  {'PASS' if passed else 'FAIL':7s} {name:52s} {dt:8s} rel err {err:.2e} "
                      f"(tol {TOL[dt]:.0e}, union {stats['union_min']}..{stats['union_max']} of {e}, "
                      f"{time.perf_counter() - t_case:.1f} s)", flush=True)
            except Exception as ex:  # noqa: BLE001 - one failing case must not stop the others
                run.add(dict(base, status="FAIL", error=_err(ex), seconds=round(time.perf_counter() - t_case, 2)))
                print(f"  FAIL    {name:52s} {dt:8s} {_err(ex)}", flush=True)


# ------------------------------------------------------------------------------ chunk sweep

def chunk_part(run: Run) -> None:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.chunk_sparse_ffn import api
    from pallas_kernels.chunk_sparse_ffn.common import chunk_shape

    args = run.args
    impls = [v for v in args.sweep_impl.split(",") if v]
    limit = args.deadline_s - (args.grouped_reserve_s if "grouped" in args.parts else 0.0)
    shapes = sweep_shapes(args.quick)
    chunk_lens = (64, 8, 1) if args.quick else CHUNK_ORDER
    ratios = (0.25, 1.0) if args.quick else RATIOS
    if args.chunk_lens:
        chunk_lens = tuple(int(v) for v in args.chunk_lens.split(","))
    if args.ratios:
        ratios = tuple(float(v) for v in args.ratios.split(","))
    dtype = jnp.bfloat16
    print(f"\n== chunk sweep: impl(s) {impls} vs dense FFN, bf16; chunk lengths {chunk_lens}, union ratios {ratios} ==",
          flush=True)
    state: dict = {}

    def layer(sh):
        if sh["name"] not in state:
            rng = np.random.default_rng(7)
            b, t, d, e, f = sh["b"], sh["t"], sh["d"], sh["e"], sh["f"]
            x = jnp.asarray(rng.standard_normal((b, t, d), np.float32)).astype(dtype)
            w_up = jnp.asarray(rng.standard_normal((e, d, f), np.float32) / np.sqrt(d)).astype(dtype)
            w_down = jnp.asarray(rng.standard_normal((e, f, d), np.float32) / np.sqrt(f)).astype(dtype)
            w_up_all = jnp.transpose(w_up, (1, 0, 2)).reshape(d, e * f)  # [D, E*F]
            w_down_all = w_down.reshape(e * f, d)  # [E*F, D]
            state[sh["name"]] = dict(x=x, w_up=w_up, w_down=w_down, w_up_all=w_up_all, w_down_all=w_down_all)
        return state[sh["name"]]

    @jax.jit
    def dense(x, a, w_up_all, w_down_all):
        b, t, d = x.shape
        f = w_up_all.shape[1] // a.shape[-1]
        h = jnp.dot(x.reshape(b * t, d), w_up_all)  # bf16 x bf16 -> bf16, float32 accumulation
        a_all = jnp.repeat(a.reshape(b * t, -1), f, axis=-1)  # [N, E*F]: expert e's a on its F columns
        h = (jax.nn.silu(h.astype(jnp.float32)) * a_all).astype(x.dtype)
        return jnp.dot(h, w_down_all).reshape(b, t, d)

    from pallas_kernels.chunk_sparse_ffn import mosaic_gpu as csf_mgpu
    for variant in impls:
        # 'mosaic_gpu@8': the Hopper kernel with UP_GROUPS = 8 (its up kernel's CTAs per chunk; read at trace time)
        impl, _, groups = variant.partition("@")
        csf_mgpu.UP_GROUPS = int(groups) if groups else None
        for chunk_len in chunk_lens:
            for sh in shapes:
                b, t, d, e, f = sh["b"], sh["t"], sh["d"], sh["e"], sh["f"]
                _, length = chunk_shape(t, chunk_len)
                base = dict(part="chunk", shape=sh["name"], B=b, T=t, D=d, E=e, F=f, dtype="bfloat16",
                            chunk_len=chunk_len, impl=variant)
                if run.past(limit):
                    run.skipped.append(f"chunk: {sh['name']} L{chunk_len} (deadline)")
                    print(f"  deadline ({limit:.0f} s) reached: {sh['name']} L{chunk_len} skipped", flush=True)
                    run.write()
                    continue
                lay = layer(sh)
                w_sds = jax.ShapeDtypeStruct((1, length, d), dtype)
                ok, why = api.applies(impl, w_sds, lay["w_up"], lay["w_down"])
                group_error = None if ok else f"not applicable: {why}"
                fn = jax.jit(functools.partial(api.chunk_sparse_ffn, chunk_len=chunk_len, impl=impl))
                dense_ms = None
                for ratio in ratios:
                    if run.past(limit):
                        run.skipped.append(f"chunk: {sh['name']} L{chunk_len} ratio {ratio} (deadline)")
                        run.write()
                        continue
                    k_union = max(1, int(round(ratio * e)))
                    rng = np.random.default_rng(int(1e6 * ratio) + 31 * chunk_len + d)
                    n, _ = chunk_shape(t, chunk_len)
                    a_np = make_activations(rng, b, t, e, chunk_len, np.full((b, n), k_union))
                    stats = union_stats(a_np, chunk_len)
                    a = jnp.asarray(a_np)
                    row = dict(base, union_ratio_target=ratio, union_experts=k_union, **stats)
                    try:
                        if dense_ms is None:  # once per (chunk length, shape): the dense time does not depend on a
                            t_d, n_d, _ = timeit(dense, lay["x"], a, lay["w_up_all"], lay["w_down_all"], reps=args.reps,
                                                 inner=args.inner, budget_s=args.case_budget_s)
                            dense_ms = 1e3 * t_d
                        row.update(dense_ms=dense_ms,
                                   dense_tflops=4.0 * b * t * d * e * f / (dense_ms / 1e3) / 1e12,
                                   goal_ms=GOAL_FACTOR * stats["union_ratio"] * dense_ms)
                    except Exception as ex:  # noqa: BLE001
                        row.update(dense_error=_err(ex))
                    if group_error is not None:
                        row.update(kernel_ms=None, error=group_error)
                        run.add(row)
                        print(f"  {sh['name']:26s} L{chunk_len:<3d} ratio {ratio:6.3f}: kernel {group_error}; "
                              f"dense {dense_ms if dense_ms is None else round(dense_ms, 3)} ms", flush=True)
                        continue
                    try:
                        t_k, n_k, first = timeit(fn, lay["x"], a, lay["w_up"], lay["w_down"], reps=args.reps,
                                                 inner=args.inner, budget_s=args.case_budget_s)
                        kernel_ms = 1e3 * t_k
                        row.update(kernel_ms=kernel_ms, reps=n_k, first_call_s=round(first, 3),
                                   kernel_eff_tflops=stats["union_ratio"] * 4.0 * b * t * d * e * f / t_k / 1e12)
                        if "dense_ms" in row:
                            row.update(kernel_over_dense=kernel_ms / dense_ms, meets_goal=kernel_ms <= row["goal_ms"],
                                       excess_ms=kernel_ms - row["goal_ms"])
                        try:  # the kernel's output against the dense FFN's (both bf16)
                            yk = fn(lay["x"], a, lay["w_up"], lay["w_down"])
                            yd = dense(lay["x"], a, lay["w_up_all"], lay["w_down_all"])
                            row["rel_err_vs_dense"] = _finite(rel_err(yk.astype(jnp.float32), yd.astype(jnp.float32)))
                        except Exception as ex:  # noqa: BLE001
                            row["rel_err_vs_dense"] = None
                            row["compare_error"] = _err(ex, 200)
                        if args.profile and chunk_len == 64 and ratio in (min(ratios), 0.125) and sh is shapes[0]:
                            from op_profile import print_profile, profile_ops
                            row["profile"] = profile_ops(fn, lay["x"], a, lay["w_up"], lay["w_down"])
                            print_profile(f"{sh['name']} L{chunk_len} ratio {ratio}", row["profile"])
                        run.add(row)
                        print(f"  {sh['name']:26s} L{chunk_len:<3d} ratio {ratio:6.3f} (got {stats['union_ratio']:.3f}): "
                              f"kernel {kernel_ms:9.3f} ms  dense {row.get('dense_ms', math.nan):8.3f} ms  "
                              f"k/d {row.get('kernel_over_dense', math.nan):6.3f}  goal {row.get('goal_ms', math.nan):8.3f}"
                              f"  err vs dense {_fmt(row['rel_err_vs_dense'], '.1e')}"
                              f"  ({n_k} reps, first {first:.2f} s)", flush=True)
                    except Exception as ex:  # noqa: BLE001 - a failure repeats for every ratio of the group
                        group_error = f"failed: {_err(ex)}"
                        row.update(kernel_ms=None, error=group_error)
                        run.add(row)
                        print(f"  {sh['name']:26s} L{chunk_len:<3d} ratio {ratio:6.3f}: kernel {group_error}", flush=True)
                    del a
    csf_mgpu.UP_GROUPS = None


def fit_chunk(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("part") == "chunk" and r.get("kernel_ms") is not None and r.get("dense_ms")]
    if not ok:
        return {}

    def lsq(rs):
        xs = np.array([r["union_ratio"] * r["dense_ms"] for r in rs])
        ys = np.array([r["kernel_ms"] for r in rs])
        out = dict(n=len(rs), overhead_ms=float(max(r["kernel_ms"] - GOAL_FACTOR * r["union_ratio"] * r["dense_ms"]
                                                     for r in rs)),
                   meets_goal=int(sum(r["kernel_ms"] <= GOAL_FACTOR * r["union_ratio"] * r["dense_ms"] for r in rs)))
        if len(rs) >= 2 and np.ptp(xs) > 0:
            (c0, c1), *_ = np.linalg.lstsq(np.stack([np.ones_like(xs), xs], 1), ys, rcond=None)
            res = ys - (c0 + c1 * xs)
            out.update(c0_ms=float(c0), c1=float(c1), rms_residual_ms=float(np.sqrt(np.mean(res ** 2))))
        else:
            out.update(c0_ms=None, c1=None)
        return out

    per_len, per_shape_len = {}, {}
    variants = list(dict.fromkeys(r["impl"] for r in ok))
    for v in variants:
        tag = f"{v} | " if len(variants) > 1 else ""  # one impl: keys as before ("64", "shape | L64")
        for length in sorted({r["chunk_len"] for r in ok if r["impl"] == v}, reverse=True):
            rs_len = [r for r in ok if r["chunk_len"] == length and r["impl"] == v]
            per_len[f"{tag}{length}"] = lsq(rs_len)
            for shape in dict.fromkeys(r["shape"] for r in rs_len):
                per_shape_len[f"{tag}{shape} | L{length}"] = lsq([r for r in rs_len if r["shape"] == shape])
    goal = {id(r): GOAL_FACTOR * r["union_ratio"] * r["dense_ms"] for r in ok}
    return dict(overhead_ms=float(max(r["kernel_ms"] - goal[id(r)] for r in ok)),
                rows_meeting_goal=int(sum(r["kernel_ms"] <= goal[id(r)] for r in ok)),
                rows_timed=len(ok),
                model="kernel_ms ~ c0_ms + c1 * union_ratio * dense_ms (least squares); overhead_ms = "
                      "max(kernel_ms - 1.25 * union_ratio * dense_ms)",
                fit_per_chunk_len=per_len, fit_per_shape_chunk_len=per_shape_len)


# --------------------------------------------------------------------------- grouped matmul

def grouped_part(run: Run) -> None:
    import jax
    import jax.numpy as jnp

    from jaxeff.moe import experts as jx_experts

    args = run.args
    if args.quick:
        n, d, f, e, ks = 256, 128, 64, 8, (1, 2)
    else:
        n, d, f, e, ks = 8192, 2048, 512, 64, (1, 8)
    out_t = jnp.float32
    print(f"\n== grouped: N={n} tokens, [E={e}, {d}, {f}] experts, top-{ks}, bf16 in, {jnp.dtype(out_t).name} out ==",
          flush=True)
    tokamax = run.tokamax
    jaxeff_dot = jx_experts.ragged_dot_impl("auto")
    resolves = "tokamax.ragged_dot" if jaxeff_dot is not jax.lax.ragged_dot else "jax.lax.ragged_dot"
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((n, d), np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((e, d, f), np.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    w_down = jnp.asarray(rng.standard_normal((e, f, d), np.float32) / np.sqrt(f)).astype(jnp.bfloat16)
    for k in ks:
        if run.past(args.deadline_s):
            run.skipped.append(f"grouped: top-{k} (deadline)")
            run.write()
            print(f"  deadline reached: top-{k} skipped", flush=True)
            continue
        experts_nk = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int32)  # k distinct, uniform
        gates = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
        flat = experts_nk.reshape(-1)
        order = np.argsort(flat, kind="stable")
        token = order // k
        sizes_np = np.bincount(flat, minlength=e).astype(np.int32)
        lhs = x[jnp.asarray(token)]  # [N*k, D] sorted by expert
        sizes = jnp.asarray(sizes_np)
        w0 = w[0]
        m = n * k
        flops = 2.0 * m * d * f
        # reference rows: 32 sorted rows, each against its expert's weights, float32
        sample = np.linspace(0, m - 1, min(32, m)).astype(np.int64)
        sample_e = flat[order][sample]
        ref_rows = np.asarray(jnp.einsum("md,mdf->mf", lhs[jnp.asarray(sample)].astype(jnp.float32),
                                         w[jnp.asarray(sample_e)].astype(jnp.float32),
                                         precision=jax.lax.Precision.HIGHEST))
        base = dict(part="grouped", N=n, k=k, M=m, D=d, F=f, E=e, dtype="bfloat16", out_dtype=jnp.dtype(out_t).name,
                    group_min=int(sizes_np.min()), group_max=int(sizes_np.max()))
        cands = [("dense matmul (same FLOPs)", jax.jit(lambda l, w0: jnp.dot(l, w0, preferred_element_type=out_t)),
                  (lhs, w0), 1, None),
                 (f"jaxeff ragged_dot_impl('auto') -> {resolves}",
                  jax.jit(lambda l, w, s: jaxeff_dot(l, w, s, preferred_element_type=out_t)),
                  (lhs, w, sizes), 1, "rows")]
        if tokamax is not None:
            cands.append(("tokamax.ragged_dot (default chain)",
                          jax.jit(lambda l, w, s: tokamax.ragged_dot(l, w, s, preferred_element_type=out_t)),
                          (lhs, w, sizes), 1, "rows"))
            cands.append(("tokamax.ragged_dot (implementation='mosaic')",
                          jax.jit(lambda l, w, s: tokamax.ragged_dot(l, w, s, preferred_element_type=out_t,
                                                                     implementation="mosaic")),
                          (lhs, w, sizes), 1, "rows"))
        else:
            run.add(dict(base, impl="tokamax.ragged_dot", ms=None,
                         error=run.meta.get("tokamax_error", "not importable")))
        cands.append(("jaxeff ragged_experts (sort+2 matmuls+scatter)",
                      jax.jit(lambda x, g, ex, wu, wd: jx_experts.ragged_experts(x, g, ex, wu, wd, None, impl="auto")),
                      (x, jnp.asarray(gates), jnp.asarray(experts_nk), w, w_down), 2, "tokens"))
        cands.append(("jax.lax.ragged_dot",
                      jax.jit(lambda l, w, s: jax.lax.ragged_dot(l, w, s, preferred_element_type=out_t)),
                      (lhs, w, sizes), 1, "rows"))
        for name, fn, fargs, mult, check in cands:
            if run.past(args.deadline_s):
                run.skipped.append(f"grouped: top-{k} {name} (deadline)")
                run.write()
                continue
            row = dict(base, impl=name, flops=mult * flops)
            try:
                t_s, reps, first = timeit(fn, *fargs, reps=args.reps, inner=args.inner, budget_s=args.case_budget_s)
                row.update(ms=1e3 * t_s, tflops=mult * flops / t_s / 1e12, reps=reps, first_call_s=round(first, 3))
                try:
                    if check == "rows":
                        out = fn(*fargs)
                        row["rel_err"] = _finite(rel_err(np.asarray(out[jnp.asarray(sample)]), ref_rows))
                    elif check == "tokens":
                        row["rel_err"] = _finite(_check_ragged_experts(fn(*fargs), x, gates, experts_nk, w, w_down))
                except Exception as ex:  # noqa: BLE001
                    row["compare_error"] = _err(ex, 200)
                run.add(row)
                print(f"  top-{k} {name:48s} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s  "
                      f"err {_fmt(row.get('rel_err'), '.1e')}  ({reps} reps, first {first:.2f} s)", flush=True)
            except Exception as ex:  # noqa: BLE001 - a peer that fails is reported, not fatal
                row.update(ms=None, error=_err(ex))
                run.add(row)
                print(f"  top-{k} {name:48s} ERROR {_err(ex, 300)}", flush=True)
        del lhs


def _check_ragged_experts(y, x, gates, experts_nk, w_up, w_down, n_tokens: int = 4) -> float:
    """rel err of ``ragged_experts``' y on a few tokens against a float32 loop over their experts."""
    import jax
    import jax.numpy as jnp

    n, k = experts_nk.shape
    toks = np.linspace(0, n - 1, n_tokens).astype(np.int64)
    f32, hi = jnp.float32, jax.lax.Precision.HIGHEST
    refs = []
    for tok in toks:
        acc = jnp.zeros((x.shape[1],), f32)
        for j in range(k):
            ex = int(experts_nk[tok, j])
            h = jax.nn.silu(jnp.dot(x[tok].astype(f32), w_up[ex].astype(f32), precision=hi)) * float(gates[tok, j])
            acc = acc + jnp.dot(h.astype(w_down.dtype).astype(f32), w_down[ex].astype(f32), precision=hi)
        refs.append(acc)
    return rel_err(np.asarray(y[jnp.asarray(toks)]), np.asarray(jnp.stack(refs)))


def grouped_summary(rows: list[dict]) -> dict:
    out = {}
    for k in sorted({r["k"] for r in rows if r.get("part") == "grouped"}):
        rs = {r["impl"]: r for r in rows if r.get("part") == "grouped" and r["k"] == k and r.get("ms")}
        jx = next((r for name, r in rs.items() if name.startswith("jaxeff ragged_dot_impl")), None)
        lax_r, dense_r = rs.get("jax.lax.ragged_dot"), rs.get("dense matmul (same FLOPs)")
        s = dict(jaxeff_impl=jx["impl"] if jx else None, jaxeff_ms=jx["ms"] if jx else None,
                 lax_ms=lax_r["ms"] if lax_r else None, dense_ms=dense_r["ms"] if dense_r else None,
                 tflops={name: r["tflops"] for name, r in rs.items()})
        if jx and lax_r:
            s["jaxeff_speedup_vs_lax"] = lax_r["ms"] / jx["ms"]
            s["meets_lax_goal"] = s["jaxeff_speedup_vs_lax"] >= GOAL_LAX_SPEEDUP
        if jx and dense_r:
            s["jaxeff_fraction_of_dense"] = dense_r["ms"] / jx["ms"]
            s["meets_dense_goal"] = s["jaxeff_fraction_of_dense"] >= GOAL_DENSE_FRACTION
        tk = rs.get("tokamax.ragged_dot (default chain)")
        if tk and lax_r:
            s["tokamax_speedup_vs_lax"] = lax_r["ms"] / tk["ms"]
        if tk and dense_r:
            s["tokamax_fraction_of_dense"] = dense_r["ms"] / tk["ms"]
        out[f"top{k}"] = s
    return out


# ---------------------------------------------------------------------------------- summary

def summarize(rows: list[dict]) -> dict:
    checks = [r for r in rows if r.get("part") == "checks"]
    s = {}
    if checks:
        s["checks"] = dict(passed=sum(r["status"] == "PASS" for r in checks),
                           failed=sum(r["status"] == "FAIL" for r in checks),
                           not_applicable=sum(r["status"] == "N/A" for r in checks),
                           skipped=sum(r["status"] == "SKIPPED" for r in checks),
                           failures=[f"{r['case']} {r['dtype']}" for r in checks if r["status"] == "FAIL"],
                           not_applicable_cases=[f"{r['case']} {r['dtype']}: {r.get('error', '')}" for r in checks
                                                 if r["status"] == "N/A"],
                           worst_rel_err={dt: max((r["rel_err"] for r in checks if r["dtype"] == dt
                                                   and r.get("rel_err") is not None), default=None) for dt in TOL},
                           tolerance=TOL)
        s["checks"]["ok"] = s["checks"]["failed"] == 0
    chunk = fit_chunk(rows)
    if chunk:
        s["chunk"] = chunk
    grouped = grouped_summary(rows)
    if grouped:
        s["grouped"] = grouped
    return s


def print_tables(run: Run) -> None:
    rows = run.rows
    checks = [r for r in rows if r["part"] == "checks"]
    if checks:
        print("\n-- checks --")
        print(f"{'case':56s} {'dtype':9s} {'status':7s} {'rel err':>9s} {'tol':>7s}")
        for r in checks:
            err = r.get("rel_err")
            print(f"{r['case']:56s} {r['dtype']:9s} {r['status']:7s} {'' if err is None else f'{err:9.2e}':>9s} "
                  f"{r['tol']:7.0e}  {r.get('error', '')[:70]}")
    chunk = [r for r in rows if r["part"] == "chunk"]
    if chunk:
        print("\n-- chunk sweep (ms; goal = 1.25 * union ratio * dense) --")
        print(f"{'shape':26s} {'L':>3s} {'ratio':>6s} {'got':>6s} {'kernel':>9s} {'dense':>8s} {'k/d':>6s} "
              f"{'goal':>8s} {'ok':>3s} {'eff TF/s':>8s}")
        for r in chunk:
            km = r.get("kernel_ms")
            print(f"{r['shape']:26s} {r['chunk_len']:3d} {r['union_ratio_target']:6.3f} {r['union_ratio']:6.3f} "
                  f"{'' if km is None else f'{km:9.3f}':>9s} {r.get('dense_ms', math.nan):8.3f} "
                  f"{r.get('kernel_over_dense', math.nan):6.3f} {r.get('goal_ms', math.nan):8.3f} "
                  f"{('yes' if r.get('meets_goal') else 'no') if km is not None else '-':>3s} "
                  f"{r.get('kernel_eff_tflops', math.nan):8.1f}  {r.get('error', '')[:60]}")
        fit = fit_chunk(rows)
        if fit:
            print(f"overhead_ms (max kernel - goal) = {fit['overhead_ms']:.3f}; rows meeting the goal: "
                  f"{fit['rows_meeting_goal']}/{fit['rows_timed']}")
            for length, v in fit["fit_per_chunk_len"].items():
                c0 = "-" if v.get("c0_ms") is None else f"{v['c0_ms']:.3f} ms"
                c1 = "-" if v.get("c1") is None else f"{v['c1']:.3f}"
                name = f"L{length}" if "|" not in length else length.replace("| ", "| L")
                print(f"  {name}: kernel ~ {c0} + {c1} * ratio * dense  (n={v['n']}, overhead "
                      f"{v['overhead_ms']:.3f} ms)")
    grouped = [r for r in rows if r["part"] == "grouped"]
    if grouped:
        print("\n-- grouped matmul --")
        print(f"{'k':>2s} {'impl':52s} {'ms':>9s} {'TFLOP/s':>8s} {'rel err':>9s}")
        for r in grouped:
            ms, err = r.get("ms"), r.get("rel_err")
            print(f"{r['k']:2d} {r['impl']:52s} {'' if ms is None else f'{ms:9.3f}':>9s} "
                  f"{r.get('tflops', math.nan):8.1f} {'' if err is None else f'{err:9.2e}':>9s}  "
                  f"{r.get('error', '')[:60]}")
        for k, s in grouped_summary(rows).items():
            print(f"  {k}: {s.get('jaxeff_impl')}: speedup vs lax.ragged_dot "
                  f"{_fmt(s.get('jaxeff_speedup_vs_lax'), '.2f')}x (goal >= {GOAL_LAX_SPEEDUP:g}x), "
                  f"fraction of dense {_fmt(s.get('jaxeff_fraction_of_dense'), '.2f')} "
                  f"(goal >= {GOAL_DENSE_FRACTION:g})" + (f"; tokamax (default chain) vs lax "
                                                          f"{s['tokamax_speedup_vs_lax']:.2f}x"
                                                          if "tokamax_speedup_vs_lax" in s else ""))
    if run.skipped:
        print(f"\nskipped (deadline): {len(run.skipped)}: " + "; ".join(run.skipped[:8])
              + (" ..." if len(run.skipped) > 8 else ""))


# -------------------------------------------------------------------------------------- main

def default_out() -> str:
    out = os.environ.get("OUT")
    if out:
        return os.path.join(out, "bench_moe.json")
    return os.path.join(ROOT, "experiments", "results", "bench_moe.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of checks,chunk,grouped (run in that order)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a CPU smoke test of every code path")
    p.add_argument("--profile", action="store_true",
                   help="trace the kernel call of the first sweep shape at chunk 64, the smallest union and 12.5%%: "
                        "device ms per op (the kernels and the XLA ops around them) in the JSON")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/bench_moe.json, else experiments/results/)")
    p.add_argument("--impl", default="mosaic_gpu", help="chunk_sparse_ffn implementation under test (checks, sweep)")
    p.add_argument("--sweep-impl", default=None,
                   help="the sweep's implementation(s), comma-separated (default --impl; 'portable' with --quick on CPU); "
                        "'mosaic_gpu@8': the Hopper kernel with 8 up-kernel CTAs per chunk (UP_GROUPS)")
    p.add_argument("--reps", type=int, default=10, help="timed samples per case (median)")
    p.add_argument("--inner", type=int, default=1, help="calls per timed sample (time per call)")
    p.add_argument("--case-budget-s", type=float, default=2.0, help="a slow case takes fewer reps to fit this")
    p.add_argument("--deadline-s", type=float, default=1e9, help="start no new case after this many seconds")
    p.add_argument("--checks-budget-s", type=float, default=1e9, help="start no new check after this many seconds")
    p.add_argument("--grouped-reserve-s", type=float, default=45.0,
                   help="the chunk sweep stops this many seconds before --deadline-s (when grouped runs)")
    p.add_argument("--chunk-lens", default=None, help="override the sweep's chunk lengths, e.g. 64,32")
    p.add_argument("--ratios", default=None, help="override the sweep's union ratios, e.g. 0.125,1")
    a = p.parse_args(argv)
    a.parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    bad = set(a.parts) - set(PARTS)
    if bad:
        p.error(f"unknown parts {sorted(bad)}; known: {PARTS}")
    a.out = a.out or default_out()
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args)
    import jax

    if args.sweep_impl is None:
        args.sweep_impl = "portable" if (args.quick and jax.default_backend() == "cpu") else args.impl
    dev = jax.devices()[0]
    meta = dict(benchmark="bench_moe", date=datetime.datetime.now().isoformat(timespec="seconds"),
                device=dev.device_kind, platform=dev.platform, backend=jax.default_backend(),
                compute_capability=str(getattr(dev, "compute_capability", "")), jax=jax.__version__,
                jaxlib=getattr(__import__("jaxlib"), "__version__", None), quick=args.quick,
                args={k: v for k, v in vars(args).items()}, tolerances=TOL, goal_factor=GOAL_FACTOR,
                goals=dict(grouped_speedup_vs_lax=GOAL_LAX_SPEEDUP, grouped_fraction_of_dense=GOAL_DENSE_FRACTION),
                notes=dict(checks="impl vs impl='reference' in float32 on the same inputs; "
                                  "rel err = max|y-ref| / max|ref|",
                           chunk="kernel: the public chunk_sparse_ffn call under jax.jit (chunking, union lists, "
                                 "kernel); dense: two bf16 matmuls with bf16 outputs (float32 accumulation), "
                                 "silu * a in float32; goal_ms = 1.25 * achieved union ratio * dense_ms",
                           grouped="bf16 inputs, preferred_element_type=float32 for every impl; TFLOP/s = "
                                   "2*N*k*D*F / t (twice that for ragged_experts: up and down)"))
    try:
        import tokamax

        try:
            from importlib.metadata import version

            meta["tokamax"] = version("tokamax")
        except Exception:  # noqa: BLE001
            meta["tokamax"] = getattr(tokamax, "__version__", "unknown")
    except Exception as ex:  # noqa: BLE001 - optional peer
        tokamax = None
        meta["tokamax"] = None
        meta["tokamax_error"] = _err(ex, 300)
    run.meta = meta
    print(f"bench_moe: {dev.device_kind} ({dev.platform}, cc {meta['compute_capability']}), jax {jax.__version__}, "
          f"tokamax {meta['tokamax'] or 'not importable: ' + meta.get('tokamax_error', '')}; parts {args.parts}; "
          f"out {args.out}", flush=True)
    run.tokamax = tokamax
    parts = dict(checks=checks_part, chunk=chunk_part, grouped=grouped_part)
    crashed = []
    for name in PARTS:
        if name not in args.parts:
            continue
        try:
            parts[name](run)
        except Exception as ex:  # noqa: BLE001 - keep what the other parts measure
            traceback.print_exc()
            crashed.append(name)
            run.errors.append(f"part {name} crashed: {_err(ex)}")
            run.write()
    run.write(status="done")
    print_tables(run)
    summ = summarize(run.rows)
    failed = summ.get("checks", {}).get("failed", 0) + ("checks" in crashed)
    for msg in run.errors:
        print(f"ERROR {msg[:300]}")
    print(f"\nwrote {args.out} ({run.elapsed():.1f} s); checks: "
          + (f"{summ['checks']['passed']} PASS, {failed} FAIL, {summ['checks']['not_applicable']} N/A, "
             f"{summ['checks']['skipped']} skipped" if "checks" in summ else "not run"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

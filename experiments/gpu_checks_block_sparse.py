"""GPU check and benchmark of the Hopper block-sparse attention kernel
(``pallas_kernels/block_sparse_attention/mosaic_gpu.py``).

1. Correctness: forward output, LSE and dq/dk/dv against a float32 dense reference (highest
   matmul precision, same bf16/fp16 inputs upcast) over masks dense, causal, local window,
   documents (4 per row), random 25% / 10% block density (with and without a dense element mask),
   an empty row, soft-capping score_mod, GQA 1/2/4, lengths that are not block multiples, bf16
   and fp16. Prints the worst relative error ||x - ref|| / ||ref|| per case; exit 1 if any case
   is over tolerance (or fails).
2. Timing at B2 H16 S16384 D128 bf16 (masks dense, causal, local 2048, random 10%): forward and
   forward+backward, warm-up then the median of repeated runs, next to cuDNN
   (``jax.nn.dot_product_attention(implementation="cudnn")``) dense and causal. Effective
   TFLOP/s counts only computed blocks: 4 B H S^2 D density forward, 2.5x that backward.

Run on the GPU machine: ``PYTHONPATH=. python3 experiments/gpu_checks_block_sparse.py [--skip-bench]
[--only-bench] [--check-variant NAME] [--variants v1,fuse*,... (name* = dense and random10 only)]
[--no-cudnn]``; JSON goes to $OUT (or experiments/results). ``--interpret-smoke`` runs shrunken
checks on CPU in interpret mode (a test of this script).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import mosaic_gpu as mg
from pallas_kernels.block_sparse_attention import mosaic_gpu_fwd  # TUNING is read there, by both passes
from pallas_kernels.block_sparse_attention.common import ElementMask, SparseLayout

BLOCK = 128


# ----------------------------------------------------------------------------------------------
# Layouts from block states (0 skipped, 1 partial, 2 full), numpy.


def lists_from_state(state):
    out = {}
    nb = state.shape[-1]
    for kind, val in (("part", 1), ("full", 2)):
        sel = state == val
        num = sel.sum(-1).astype(np.int32)
        # ascending indices of selected blocks first, then repeat the last one (0 if none)
        order = np.argsort(~sel, axis=-1, kind="stable").astype(np.int32)
        pos = np.arange(nb)
        last = np.take_along_axis(order, np.maximum(num - 1, 0)[..., None], -1)
        last = np.where(num[..., None] > 0, last, 0)
        idx = np.where(pos < num[..., None], order, last).astype(np.int32)
        out[kind] = (num, idx)
    return out


def layout_from_state(state, t, s):
    kv = lists_from_state(state)
    qs = lists_from_state(np.swapaxes(state, 2, 3))
    j = jnp.asarray
    return SparseLayout(kv_num_blocks=j(kv["part"][0]), kv_indices=j(kv["part"][1]),
                        full_kv_num_blocks=j(kv["full"][0]), full_kv_indices=j(kv["full"][1]),
                        q_num_blocks=j(qs["part"][0]), q_indices=j(qs["part"][1]),
                        full_q_num_blocks=j(qs["full"][0]), full_q_indices=j(qs["full"][1]),
                        block_q=BLOCK, block_kv=BLOCK, q_len=t, kv_len=s)


def state_from_dense(allowed):
    """allowed [Bm, Hm, t, s] bool (real elements only) -> block states; a block holding padding
    is never full (as jaxeff.sparse.BlockMask)."""
    bm, hm, t, s = allowed.shape
    nq, nk = -(-t // BLOCK), -(-s // BLOCK)
    pad = np.zeros((bm, hm, nq * BLOCK, nk * BLOCK), bool)
    pad[:, :, :t, :s] = allowed
    blk = pad.reshape(bm, hm, nq, BLOCK, nk, BLOCK)
    anyb = blk.any(axis=(3, 5))
    allb = blk.all(axis=(3, 5))
    return np.where(allb, 2, np.where(anyb, 1, 0)).astype(np.int32)


def dense_of(em: ElementMask, bm, hm, t, s):
    b = jnp.arange(bm)[:, None, None, None]
    h = jnp.arange(hm)[None, :, None, None]
    return np.asarray(em.evaluate(b, h, jnp.arange(t)[None, None, :, None], jnp.arange(s)[None, None, None, :], s))


# ----------------------------------------------------------------------------------------------
# Reference (float32, highest precision).


def reference(q, k, v, mask, scale, score_mod=None):
    b, t, h, d = q.shape
    g = h // k.shape[2]
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    kf, vf = jnp.repeat(kf, g, axis=2), jnp.repeat(vf, g, axis=2)
    with jax.default_matmul_precision("highest"):
        s_ = jnp.einsum("bthd,bshd->bhts", qf, kf) * scale
        if score_mod is not None:
            bi = jnp.arange(b)[:, None, None, None]
            hi = jnp.arange(h)[None, :, None, None]
            s_ = score_mod(s_, bi, hi, jnp.arange(t)[None, None, :, None], jnp.arange(k.shape[1])[None, None, None, :])
        s_ = jnp.where(mask, s_, -jnp.inf)
        m = jax.lax.stop_gradient(s_.max(-1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.where(mask, jnp.exp(s_ - m), 0.0)
        l = p.sum(-1, keepdims=True)
        o = jnp.einsum("bhts,bshd->bthd", p / jnp.where(l > 0, l, 1.0), vf)
    lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)) + m[..., 0], -jnp.inf)
    return o, lse


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------------------------
# Correctness cases.

SOFTCAP = lambda s, b, h, qi, ki: 20.0 * jnp.tanh(s / 20.0)  # noqa: E731


def make_case(name, seed, b, t, s, h, kh, d, dtype, kind, **kw):
    rng = np.random.default_rng(seed)
    em, bm, hm = ElementMask(), 1, 1
    state = None
    if kind == "dense":
        allowed = np.ones((1, 1, t, s), bool)
    elif kind == "causal":
        em = ElementMask(index_fn=lambda b_, h_, qi, ki: qi >= ki)
    elif kind == "local":
        w = kw["window"]
        em = ElementMask(index_fn=lambda b_, h_, qi, ki: (qi >= ki) & (qi - ki < w))
    elif kind == "docs":  # 4 documents per row, random boundaries, plus causal
        bm = b
        seg = np.zeros((b, t), np.int32)
        kvseg = np.zeros((b, s), np.int32)
        for r in range(b):
            cuts = np.sort(rng.choice(np.arange(1, min(t, s)), 3, replace=False))
            seg[r] = np.searchsorted(cuts, np.arange(t), side="right")
            kvseg[r] = np.searchsorted(cuts, np.arange(s), side="right")
        em = ElementMask(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(kvseg),
                         index_fn=lambda b_, h_, qi, ki: qi >= ki,
                         dense=jnp.asarray(rng.random((b, 1, t, s)) < 0.8) if kw.get("dense_too") else None)
    elif kind == "random":  # random blocks; with element=True a random dense element mask in them
        hm = h if kw.get("per_head") else 1
        nq, nk = -(-t // BLOCK), -(-s // BLOCK)
        blocks = rng.random((1, hm, nq, nk)) < kw["density"]
        blocks[..., 0, 0] = True
        el = np.repeat(np.repeat(blocks, BLOCK, 2), BLOCK, 3)[:, :, :t, :s]
        if kw.get("element"):
            el = el & (rng.random((1, hm, t, s)) < 0.7)
            em = ElementMask(dense=jnp.asarray(el))
        else:
            state = np.where(blocks, 2, 0).astype(np.int32)
            if s % BLOCK:  # the last key block holds padding: partial
                state[..., -1] = np.where(state[..., -1] == 2, 1, 0)
            allowed = el
    elif kind == "empty":  # causal, and query rows [t//2, t//2 + 100) see no key at all
        bm = b
        qseg = np.zeros((b, t), np.int32)
        qseg[:, t // 2:t // 2 + 100] = 9
        em = ElementMask(q_segment_ids=jnp.asarray(qseg), kv_segment_ids=jnp.zeros((b, s), jnp.int32),
                         index_fn=lambda b_, h_, qi, ki: qi >= ki)
    if kind not in ("dense",) and not (kind == "random" and not kw.get("element")):
        allowed = dense_of(em, bm, hm, t, s)
    if state is None:
        state = state_from_dense(allowed)
    if kind == "random" and not kw.get("element"):  # no element mask: partial blocks only pad
        em = ElementMask()
    layout = layout_from_state(state, t, s)
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kh, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kh, d), dtype)
    do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
    dl = jax.random.normal(ks[4], (b, h, t), jnp.float32) if kw.get("dlse") else None
    mask = jnp.broadcast_to(jnp.asarray(allowed), (b, h, t, s))
    return dict(name=name, q=q, k=k, v=v, do=do, dl=dl, layout=layout, em=em, mask=mask,
                score_mod=kw.get("score_mod"), dtype=dtype)


CASES = [
    # name, seed, B, T, S, H, K, D, dtype, kind, kwargs
    ("dense_gqa1_bf16", 1, 1, 1000, 1000, 4, 4, 128, jnp.bfloat16, "dense", {}),
    ("causal_gqa2_bf16", 2, 2, 1100, 1100, 8, 4, 128, jnp.bfloat16, "causal", {}),
    ("local_gqa4_bf16_d64", 3, 1, 1500, 1500, 8, 2, 64, jnp.bfloat16, "local", dict(window=256)),
    ("docs4_gqa2_bf16", 4, 2, 1000, 1000, 4, 2, 128, jnp.bfloat16, "docs", {}),
    ("random25_dense_el_fp16", 5, 1, 900, 1300, 4, 4, 128, jnp.float16, "random",
     dict(density=0.25, element=True, per_head=True)),
    ("random10_blocks_gqa2_bf16", 6, 2, 1500, 1500, 4, 2, 128, jnp.bfloat16, "random", dict(density=0.10)),
    ("empty_rows_bf16", 7, 1, 700, 700, 4, 2, 64, jnp.bfloat16, "empty", {}),
    ("causal_softcap_bf16", 8, 1, 800, 800, 4, 4, 128, jnp.bfloat16, "causal", dict(score_mod=SOFTCAP)),
    ("causal_gqa4_fp16_d64", 9, 1, 1000, 1000, 8, 2, 64, jnp.float16, "causal", {}),
    ("causal_T700_S1300_dlse_bf16", 10, 1, 700, 1300, 4, 1, 128, jnp.bfloat16, "causal", dict(dlse=True)),
    ("docs4_and_dense_el_gqa2_bf16", 11, 2, 600, 600, 4, 2, 128, jnp.bfloat16, "docs", dict(dense_too=True)),
]
TOL = {jnp.dtype(jnp.bfloat16): 1.5e-2, jnp.dtype(jnp.float16): 4e-3}


INTERPRET = "--interpret-smoke" in sys.argv  # CPU smoke test of this script: small cases, interpret mode


def check_case(c):
    q, k, v, do, dl, lay, em, mask, sm = (c[x] for x in ("q", "k", "v", "do", "dl", "layout", "em", "mask",
                                                         "score_mod"))
    d = q.shape[-1]
    scale = 1 / math.sqrt(d)

    def loss_k(q, k, v):
        o, lse = mg.block_sparse_attention(q, k, v, lay, em, score_mod=sm, return_lse=True, interpret=INTERPRET)
        out = jnp.sum(o.astype(jnp.float32) * do)
        if dl is not None:
            out = out + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dl)
        return out, (o, lse)

    def loss_r(q, k, v):
        o, lse = reference(q, k, v, mask, scale, sm)
        out = jnp.sum(o * do)
        if dl is not None:
            out = out + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dl)
        return out, (o, lse)

    vg = jax.value_and_grad(loss_k, argnums=(0, 1, 2), has_aux=True)
    (_, (o, lse)), g = (vg if INTERPRET else jax.jit(vg))(q, k, v)  # the interpreter can deadlock under jit
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    (_, (ro, rl)), gr = jax.jit(jax.value_and_grad(loss_r, argnums=(0, 1, 2), has_aux=True))(f32(q), f32(k), f32(v))
    fin = np.isfinite(np.asarray(rl))
    lse_np = np.asarray(lse)
    res = dict(o=rel(f32(o), ro),
               lse=float(np.abs(np.where(fin, lse_np - np.asarray(rl), 0)).max()),
               lse_inf_pattern_ok=bool((np.isfinite(lse_np) == fin).all()),
               dq=rel(f32(g[0]), gr[0]), dk=rel(f32(g[1]), gr[1]), dv=rel(f32(g[2]), gr[2]),
               nan=bool(any(np.isnan(np.asarray(f32(x))).any() for x in (o, *g))),
               empty_rows=int((~fin).sum()))
    if res["empty_rows"]:
        res["empty_o_max"] = float(np.abs(np.asarray(f32(o)).transpose(0, 2, 1, 3)[~fin]).max())
    return res


def run_checks():
    results, failed = [], False
    print(f"{'case':34s} {'o':>8s} {'lse':>8s} {'dq':>8s} {'dk':>8s} {'dv':>8s}  worst   ok")
    only = [c for c in arg("--cases", "").split(",") if c]
    for name, seed, b, t, s, h, kh, d, dt, kind, kw in CASES:
        if only and name not in only:
            continue
        if INTERPRET:  # shrink: ~3 blocks a side, batch 1, 2 query heads (GQA 2 where the case has GQA)
            t, s, b = min(t, 300), min(s, 330), 1
            h, kh = (2, 1) if h > kh else (2, 2)
            kw = {**kw, "window": 100} if "window" in kw else kw
        t0 = time.time()
        try:
            c = make_case(name, seed, b, t, s, h, kh, d, dt, kind, **kw)
            r = check_case(c)
        except Exception as e:  # report and continue: one failing kernel must not hide the rest
            traceback.print_exc(limit=4)
            print(f"{name:34s} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)
            results.append(dict(name=name, error=f"{type(e).__name__}: {str(e)[:2000]}"))
            failed = True
            continue
        worst = max(r["o"], r["dq"], r["dk"], r["dv"])
        ok = (worst <= TOL[jnp.dtype(dt)] and r["lse"] < 2e-2 and r["lse_inf_pattern_ok"] and not r["nan"]
              and r.get("empty_o_max", 0.0) == 0.0)
        failed |= not ok
        print(f"{name:34s} {r['o']:8.2e} {r['lse']:8.1e} {r['dq']:8.2e} {r['dk']:8.2e} {r['dv']:8.2e} "
              f"{worst:8.2e} {'ok' if ok else 'OVER'}  ({time.time() - t0:.0f}s)", flush=True)
        results.append(dict(name=name, worst=worst, ok=ok, tol=TOL[jnp.dtype(dt)], **r))
    return results, failed


# ----------------------------------------------------------------------------------------------
# Timing.


def bench_layout(kind, s, rng):
    n = s // BLOCK
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    if kind == "dense":
        state = np.full((n, n), 2)
        em = ElementMask()
    elif kind == "causal":
        state = np.where(j < i, 2, np.where(j == i, 1, 0))
        em = ElementMask(index_fn=lambda b, h, qi, ki: qi >= ki)
    elif kind == "local2048":
        w = 2048
        dmin, dmax = (i - j) * BLOCK - (BLOCK - 1), (i - j) * BLOCK + (BLOCK - 1)
        full = (dmin >= 0) & (dmax < w)
        part = ~full & (dmax >= 0) & (dmin < w)
        state = np.where(full, 2, np.where(part, 1, 0))
        em = ElementMask(index_fn=lambda b, h, qi, ki: (qi >= ki) & (qi - ki < w))
    elif kind == "random10":
        state = np.where(rng.random((n, n)) < 0.10, 2, 0)
        em = ElementMask()
    state = state[None, None].astype(np.int32)
    return layout_from_state(state, s, s), em, float((state > 0).mean())


# Kernel tunings compared by the benchmark (``--variants a,b``); ``--check-variant`` runs the checks
# under one of them.
VARIANTS = {
    "v1": mg.Tuning(),
    "fuse": mg.Tuning(bwd_fuse=True),
    "fuse_s3": mg.Tuning(fwd_stages=3, dkv_stages=3, bwd_fuse=True),
}


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def timeit(fn, *args, warmup=3, reps=20):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3), float(np.min(ts) * 1e3), float(np.max(ts) * 1e3)


def run_bench(kinds=("dense", "causal", "local2048", "random10"), variants=("v1",), cudnn=True,
              b=2, h=16, s=16384, d=128):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, h, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, h, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, s, h, d), jnp.bfloat16)
    flops_dense = 4 * b * h * s * s * d
    rows = []
    rng = np.random.default_rng(0)

    first_out = {}  # mask -> (o, dq, dk, dv) of the first variant: later variants must match it

    def record(impl, mask, dens, fwd_fn, fb_fn, variant=""):
        try:
            f = timeit(fwd_fn, q, k, v)
            fb = timeit(fb_fn, q, k, v)
            diff = None
            if impl == "mosaic_gpu":
                outs = (fwd_fn(q, k, v), *fb_fn(q, k, v))
                if mask in first_out:
                    drel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32))  # noqa: E731
                                              / jnp.linalg.norm(b.astype(jnp.float32)))
                    diff = max(drel(a, b) for a, b in zip(outs, first_out[mask]))
                else:
                    first_out[mask] = outs
        except Exception as e:
            traceback.print_exc(limit=4)
            rows.append(dict(impl=impl, variant=variant, mask=mask, error=f"{type(e).__name__}: {str(e)[:1000]}"))
            print(f"{impl:10s} {mask:10s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            return
        fl = flops_dense * dens
        r = dict(impl=impl, variant=variant, mask=mask, density=dens, fwd_ms=f[0], fwd_ms_min=f[1], fwd_ms_max=f[2],
                 fwdbwd_ms=fb[0], fwdbwd_ms_min=fb[1], fwd_tflops=fl / f[0] / 1e9,
                 fwdbwd_tflops=3.5 * fl / fb[0] / 1e9, bwd_ms=fb[0] - f[0],
                 bwd_tflops=2.5 * fl / max(fb[0] - f[0], 1e-6) / 1e9)
        if diff is not None:
            r["max_rel_diff_vs_first_variant"] = diff
        rows.append(r)
        print(f"{impl + ' ' + variant:18s} {mask:10s} dens {dens:.3f}  "
              f"fwd {f[0]:7.2f} ms {r['fwd_tflops']:6.0f} TF/s   "
              f"fwd+bwd {fb[0]:7.2f} ms {r['fwdbwd_tflops']:6.0f} TF/s   bwd~ {r['bwd_ms']:7.2f} ms "
              f"{r['bwd_tflops']:6.0f} TF/s" + ("" if diff is None else f"  diff vs first {diff:.1e}"), flush=True)

    for kind in kinds:
        lay, em, dens = bench_layout(kind, s, rng)
        for variant in variants:
            if variant.endswith("*"):  # "name*": only for dense and random10
                if kind not in ("dense", "random10"):
                    continue
                variant = variant[:-1]
            mosaic_gpu_fwd.TUNING = VARIANTS[variant]  # read when the kernels are traced
            fwd = jax.jit(lambda q, k, v, lay=lay, em=em: mg.block_sparse_attention(q, k, v, lay, em)[0])

            def loss(q, k, v, lay=lay, em=em):
                return jnp.sum(mg.block_sparse_attention(q, k, v, lay, em)[0].astype(jnp.float32) * do)
            fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            record("mosaic_gpu", kind, dens, fwd, fb, variant)
    mosaic_gpu_fwd.TUNING = VARIANTS["v1"]
    for causal in (False, True) if cudnn else ():
        fwd = jax.jit(lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                                               implementation="cudnn"))

        def loss(q, k, v, c=causal):
            o = jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn")
            return jnp.sum(o.astype(jnp.float32) * do)
        record("cudnn", "causal" if causal else "dense", 0.5 if causal else 1.0, fwd,
               jax.jit(jax.grad(loss, argnums=(0, 1, 2))))
    return rows


def main() -> int:
    dev = jax.devices()[0]
    print(dev, getattr(dev, "device_kind", ""), jax.__version__, flush=True)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    report = dict(device=str(getattr(dev, "device_kind", dev)), jax=jax.__version__)
    failed = False
    out_path = os.path.join(out_dir, "block_sparse_gpu.json")
    if "--skip-bench" not in sys.argv:
        report["bench"] = run_bench(variants=tuple(arg("--variants", "v1").split(",")),
                                    cudnn="--no-cudnn" not in sys.argv)
        with open(out_path, "w") as f:  # written now too, in case the checks run out of time
            json.dump(report, f, indent=1)
    if "--only-bench" not in sys.argv:
        mosaic_gpu_fwd.TUNING = VARIANTS[arg("--check-variant", "v1")]
        print("checks under", mosaic_gpu_fwd.TUNING, flush=True)
        report["check_variant"] = arg("--check-variant", "v1")
        report["checks"], failed = run_checks()
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print("checks", "FAILED" if failed else "passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

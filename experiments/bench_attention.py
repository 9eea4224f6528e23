"""Block-sparse attention on one GPU: jaxeff's Hopper kernel against cuDNN, PyTorch FlexAttention
and tokamax's Mosaic GPU attention, on the same inputs and masks, in one run.

Two processes share the work (jax and torch each want the GPU's memory): ``--part jax`` times
jaxeff (``impl='mosaic_gpu'``), cuDNN and tokamax and writes the masks' block tables to
``--tables``; ``--part torch`` reads them and times FlexAttention over the same blocks;
``--part merge`` joins both into one JSON and prints the table. ``bash
experiments/bench_attention.sh`` runs the three.

Effective TFLOP/s counts the FLOPs of the allowed (query, key) pairs only:
4 * B * H * S^2 * D * density forward, 2.5x that for the backward (so fwd+bwd is 3.5x).
Masks (128 x 128 blocks): dense, causal, local 2048 (causal sliding window), document (4
documents per row, causal inside), random 25% and 10% of blocks (per head), and a dynamic mask:
the top 10% of key blocks per query block by a mean-pooled q.k score (plus the diagonal).
Timings: warm-up, then the median of ``--reps`` samples. The jax side times a sample by host wall
clock around ``--inner`` calls and one device sync; the torch side by CUDA events around
``--inner`` calls. With ``--inner 1`` (the default, as every run until 2026-12-02) the jax time
also holds the host's launch and wait, 0.27-0.43 ms per call on an H200 by the profile; more
calls per sample hide it behind the kernels (the time is per call).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

BLOCK = 128
MASKS = ("dense", "causal", "local2048", "document", "random25", "random10", "dynamic10")


def shapes(quick: bool, main_only: bool = False):
    """(name, B, H, K, S, D, masks) cases."""
    if main_only:
        return [("B2 H16 S16384", 2, 16, 16, 16384, 128,
                 ("dense", "causal", "random10", "local2048", "document", "random25", "dynamic10"))]
    if quick:
        return [("B1 H2 S512", 1, 2, 2, 512, 128, MASKS)]
    main = [("B2 H16 S16384", 2, 16, 16, 16384, 128, MASKS),
            ("B2 H16/K4 S16384 (GQA)", 2, 16, 4, 16384, 128, ("causal", "local2048", "random10")),
            ("B2 H16 S4096", 2, 16, 16, 4096, 128, ("dense", "causal", "local2048", "random10")),
            ("B2 H16 S32768", 2, 16, 16, 32768, 128, ("dense", "causal", "local2048", "random10"))]
    return main


def block_table(mask: str, b: int, h: int, s: int, rng: np.random.Generator, q=None, k=None) -> np.ndarray:
    """[B, H, nQ, nK] bool: the blocks a block-table mask computes (random and dynamic masks)."""
    n = s // BLOCK
    if mask.startswith("random"):
        frac = int(mask[len("random"):]) / 100
        return rng.random((b, h, n, n)) < frac
    raise ValueError(mask)


def documents(b: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """[B, S] int32 ids of 4 documents per row, boundaries at random positions."""
    out = np.zeros((b, s), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s), 3, replace=False))
        out[r] = np.searchsorted(cuts, np.arange(s), side="right") + 1
    return out


def flops(b, h, s, d, density):
    return 4.0 * b * h * s * s * d * density


# ------------------------------------------------------------------------------------ jax side

def jax_part(a) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxeff.sparse as sp
    if a.profile:
        from op_profile import print_profile, profile_ops

    dev = jax.devices()[0]
    print(f"[jax] {dev.device_kind}, jax {jax.__version__}", flush=True)

    def timeit(fn, *args, reps=a.reps, warmup=2, inner=a.inner):
        out = fn(*args)
        jax.block_until_ready(out)
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            outs = [fn(*args) for _ in range(inner)]
            jax.block_until_ready(outs)
            ts.append((time.perf_counter() - t0) / inner)
        return statistics.median(ts)

    try:
        import tokamax
    except Exception as e:  # noqa: BLE001 - a peer that is not installed is reported, not fatal
        tokamax = None
        print(f"[jax] tokamax not available: {type(e).__name__}: {e}", flush=True)

    rows, tables = [], {}
    t_start = time.perf_counter()
    for case, b, h, kh, s, d, masks in shapes(a.quick, a.main_only):
        rng = np.random.default_rng(s + h + kh)
        key = jax.random.key(s)
        kq, kk, kv, kg = jax.random.split(key, 4)
        q = jax.random.normal(kq, (b, s, h, d), jnp.bfloat16)
        k = jax.random.normal(kk, (b, s, kh, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, s, kh, d), jnp.bfloat16)
        g = jax.random.normal(kg, (b, s, h, d), jnp.bfloat16)  # output cotangent
        n = s // BLOCK
        docs = documents(b, s, rng)
        for mask in masks:
            if time.perf_counter() - t_start > a.deadline_s:
                print(f"[jax] deadline of {a.deadline_s} s reached: {case} {mask} and later cases skipped", flush=True)
                break
            if mask == "dense":
                fn, bh = sp.local(None, None), (None, None)  # every key
            elif mask == "causal":
                fn, bh = sp.causal(), (None, None)
            elif mask == "local2048":
                fn, bh = sp.local(2048, 0), (None, None)
            elif mask == "document":
                fn, bh = sp.and_masks(sp.document(jnp.asarray(docs)), sp.causal()), (b, None)
            elif mask == "dynamic10":
                # mean-pooled q.k per block pair, top 10% of key blocks per query block, + diagonal
                qp = q.reshape(b, n, BLOCK, kh, h // kh, d).astype(jnp.float32).mean(2)
                kp = k.reshape(b, n, BLOCK, kh, d).astype(jnp.float32).mean(2)
                score = jnp.einsum("bikgd,bjkd->bkgij", qp, kp).reshape(b, h, n, n)
                top = max(1, n // 10)
                thr = jax.lax.top_k(score, top)[0][..., -1:]
                table = np.asarray((score >= thr) | jnp.eye(n, dtype=bool))
                fn, bh = sp.from_blocks(table, BLOCK), (b, h)
                tables[f"{case}|{mask}"] = table
            else:
                table = block_table(mask, b, h, s, rng)
                fn, bh = sp.from_blocks(table, BLOCK), (b, h)
                tables[f"{case}|{mask}"] = table
            bm = sp.create_block_mask(fn, bh[0], bh[1], s, s, block_q=BLOCK, block_kv=BLOCK)
            bm = jax.block_until_ready(bm)
            density = _element_density(bm, mask, docs, s)
            blocks = float(bm.block_density())
            base = dict(case=case, B=b, H=h, K=kh, S=s, D=d, mask=mask, density=density, block_density=blocks)
            f_fwd = flops(b, h, s, d, density)

            def record(impl, fwd_s, bwd_s=None, **extra):
                r = dict(base, impl=impl, fwd_ms=1e3 * fwd_s, fwd_tflops=f_fwd / fwd_s / 1e12, **extra)
                if bwd_s is not None:
                    r.update(fwdbwd_ms=1e3 * bwd_s, fwdbwd_tflops=3.5 * f_fwd / bwd_s / 1e12)
                rows.append(r)
                print(json.dumps(r), flush=True)

            # jaxeff
            try:
                fwd = jax.jit(lambda q, k, v, bm: sp.block_sparse_attention(q, k, v, bm, impl=a.impl))
                fb = jax.jit(lambda q, k, v, g, bm: jax.vjp(
                    lambda q, k, v: sp.block_sparse_attention(q, k, v, bm, impl=a.impl), q, k, v)[1](g))
                t_f = timeit(fwd, q, k, v, bm)
                t_b = timeit(fb, q, k, v, g, bm)
                extra = {}
                if mask in ("local2048", "document") and s == 16384 and h == kh:
                    # the same, with the BlockMask built inside the jitted step each call
                    seg = jnp.asarray(docs)

                    def traced(q, k, v, seg):
                        m = sp.local(2048, 0) if mask == "local2048" else sp.and_masks(sp.document(seg), sp.causal())
                        bm_t = sp.create_block_mask(m, bh[0], None, s, s, block_q=BLOCK, block_kv=BLOCK)
                        return sp.block_sparse_attention(q, k, v, bm_t, impl=a.impl)
                    extra["traced_mask_fwd_ms"] = 1e3 * timeit(jax.jit(traced), q, k, v, seg)
                    if a.profile:
                        extra["profile_traced_fwd"] = profile_ops(jax.jit(traced), q, k, v, seg)
                        print_profile(f"{case} {mask} traced-mask forward", extra["profile_traced_fwd"])
                if a.profile and mask in ("dense", "random10", "document") and case == shapes(False, True)[0][0]:
                    extra["profile_fwd"] = profile_ops(fwd, q, k, v, bm)
                    print_profile(f"{case} {mask} forward", extra["profile_fwd"])
                record(f"jaxeff {a.impl}", t_f, t_b, **extra)
            except Exception as e:  # noqa: BLE001 - report and go on to the peers
                print(f"[jax] jaxeff {case} {mask}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                rows.append(dict(base, impl=f"jaxeff {a.impl}", error=f"{type(e).__name__}: {str(e)[:400]}"))

            # cuDNN: dense and causal only
            if mask in ("dense", "causal") and dev.platform == "gpu":
                causal = mask == "causal"
                cf = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                          implementation="cudnn"))
                cb = jax.jit(lambda q, k, v, g: jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=causal, implementation="cudnn"), q, k, v)[1](g))
                record("cudnn", timeit(cf, q, k, v), timeit(cb, q, k, v, g))

            # tokamax Mosaic GPU: dense, causal, local
            if tokamax is not None and mask in ("dense", "causal", "local2048"):
                kw = dict(is_causal=mask != "dense", implementation="mosaic")
                if mask == "local2048":
                    kw["local_window_size"] = (2048, 0)
                try:
                    tf = jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, **kw))
                    tb = jax.jit(lambda q, k, v, g: jax.vjp(lambda q, k, v: tokamax.dot_product_attention(
                        q, k, v, **kw), q, k, v)[1](g))
                    record("tokamax mosaic", timeit(tf, q, k, v), timeit(tb, q, k, v, g))
                except Exception as e:  # noqa: BLE001
                    print(f"[jax] tokamax {case} {mask}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        del q, k, v, g
    np.savez_compressed(a.tables, **{k.replace("|", "__").replace(" ", "_").replace("/", "-"): v
                                     for k, v in tables.items()})
    return {"device": dev.device_kind, "jax": jax.__version__, "rows": rows}


def _element_density(bm, mask, docs, s) -> float:
    """Fraction of (query, key) pairs allowed, averaged over batch rows and heads."""
    if mask == "dense":
        return 1.0
    if mask == "causal":
        return (s + 1) / (2 * s)
    if mask == "local2048":
        w = 2048
        return (w * (w + 1) / 2 + (s - w) * (w + 1)) / (s * s) if s > w else (s + 1) / (2 * s)
    if mask == "document":
        per_row = [sum(n * (n + 1) / 2 for n in np.bincount(row)[1:]) / (s * s) for row in docs]
        return float(np.mean(per_row))
    return float(bm.block_density())  # block-level masks: whole blocks


# ---------------------------------------------------------------------------------- torch side

def torch_part(a) -> dict:
    import torch
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    dev = torch.cuda.get_device_name()
    print(f"[torch] {dev}, torch {torch.__version__}", flush=True)
    # the jax side's block tables; without them (a torch-only re-run) the random tables are drawn
    # again from the same seeds and the dynamic mask is built by the same rule from torch's inputs
    tables = dict(np.load(a.tables)) if os.path.exists(a.tables) else {}
    measured = {(r["case"], r["mask"]) for r in json.load(open(a.jax_json))["rows"]}  # compare like with like
    # every shape and mask_mod is a recompile; past dynamo's default limit (8) flex_attention falls
    # back to eager, which materialises the scores (25 ms at S4096, out of memory at S32768)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)

    def timeit(fn, reps=a.reps, warmup=2, inner=a.inner):
        fn()
        torch.cuda.synchronize()
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end) / 1e3 / inner)
        return statistics.median(ts)

    def table_mask(tab):
        """A BlockMask of whole blocks from a [B, H, nQ, nK] bool table, without a mask_mod: every
        listed block is a full block, so one compiled kernel serves every such table of a shape."""
        tab = tab.to(torch.int8)
        n_full = tab.sum(-1, dtype=torch.int32)
        idx = torch.argsort(1 - tab, dim=-1, stable=True).to(torch.int32)  # listed blocks first, in order
        return BlockMask.from_kv_blocks(torch.zeros_like(n_full), torch.zeros_like(idx), n_full, idx,
                                        BLOCK_SIZE=BLOCK)

    rows = []
    t_start = time.perf_counter()
    for case, b, h, kh, s, d, masks in shapes(a.quick, a.main_only):
        rng = np.random.default_rng(s + h + kh)
        q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, kh, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, kh, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
        docs = torch.as_tensor(documents(b, s, rng), device="cuda")
        n = s // BLOCK
        tabs = {}
        for mask in masks:  # the random tables in the jax side's rng order
            name = f"{case}|{mask}".replace("|", "__").replace(" ", "_").replace("/", "-")
            if mask.startswith("random"):
                drawn = block_table(mask, b, h, s, rng)  # keep the rng stream in step with the jax side
                tabs[mask] = torch.as_tensor(tables.get(name, drawn), device="cuda")
            elif mask == "dynamic10":
                tabs[mask] = (torch.as_tensor(tables[name], device="cuda") if name in tables
                              else _dynamic_table_torch(q, k, n))
        # whole-block masks first (dense included, as an all-ones table): they share one compile
        order = sorted(masks, key=lambda m: (m not in tabs and m != "dense", masks.index(m)))
        for mask in order:
            if time.perf_counter() - t_start > a.deadline_s:
                print(f"[torch] deadline of {a.deadline_s} s reached: {case} {mask} and later cases skipped", flush=True)
                break
            if (case, mask) not in measured:
                continue
            t0 = time.perf_counter()
            try:
                if mask == "dense":
                    bm = table_mask(torch.ones(b, h, n, n, dtype=torch.bool, device="cuda"))
                elif mask in tabs:
                    bm = table_mask(tabs[mask])
                else:
                    if mask == "causal":
                        mod, bh = (lambda b_, h_, q_, k_: q_ >= k_), (None, None)
                    elif mask == "local2048":
                        mod, bh = (lambda b_, h_, q_, k_: (q_ >= k_) & (q_ - k_ <= 2048)), (None, None)
                    elif mask == "document":
                        mod, bh = (lambda b_, h_, q_, k_: (docs[b_, q_] == docs[b_, k_]) & (q_ >= k_)), (b, None)
                    else:
                        raise ValueError(f"no block table for {mask}")
                    bm = create_block_mask(mod, bh[0], bh[1], s, s, device="cuda", BLOCK_SIZE=BLOCK)
                gqa = h != kh
                fwd = lambda: flex(q, k, v, block_mask=bm, enable_gqa=gqa)
                def fb():
                    out = flex(q, k, v, block_mask=bm, enable_gqa=gqa)
                    torch.autograd.grad(out, (q, k, v), g)
                t_f, t_b = timeit(fwd), timeit(fb)
                rows.append(dict(case=case, S=s, mask=mask, impl="torch flex_attention", fwd_ms=1e3 * t_f,
                                 fwdbwd_ms=1e3 * t_b, setup_s=time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(case=case, S=s, mask=mask, impl="torch flex_attention",
                                 error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(json.dumps(rows[-1]), flush=True)
        del q, k, v, g
        torch.cuda.empty_cache()
    return {"device": dev, "torch": torch.__version__, "rows": rows}


def _dynamic_table_torch(q, k, n):
    """The dynamic10 rule of the jax side on torch inputs [B, H, S, D]: mean-pooled q.k per block
    pair, the top 10% of key blocks per query block, plus the diagonal."""
    import torch
    b, h, s, d = q.shape
    kh = k.shape[1]
    with torch.no_grad():
        qp = q.float().reshape(b, h, n, BLOCK, d).mean(3)
        kp = k.float().reshape(b, kh, n, BLOCK, d).mean(3).repeat_interleave(h // kh, dim=1)
        score = qp @ kp.transpose(-1, -2)
        thr = score.topk(max(1, n // 10), dim=-1).values[..., -1:]
        return (score >= thr) | torch.eye(n, dtype=torch.bool, device=q.device)


# ---------------------------------------------------------------------------------------- merge

def merge(a) -> dict:
    jx, th = json.load(open(a.jax_json)), json.load(open(a.torch_json))
    rows = list(jx["rows"])
    density = {(r["case"], r["mask"]): r for r in rows if "density" in r}
    for r in th["rows"]:
        base = density.get((r["case"], r["mask"]))
        if base is None:
            continue
        m = dict({k: base[k] for k in ("case", "B", "H", "K", "S", "D", "mask", "density", "block_density")}, **r)
        if "fwd_ms" in r:
            f = flops(base["B"], base["H"], base["S"], base["D"], base["density"])
            m["fwd_tflops"] = f / (r["fwd_ms"] / 1e3) / 1e12
            m["fwdbwd_tflops"] = 3.5 * f / (r["fwdbwd_ms"] / 1e3) / 1e12
        rows.append(m)
    out = {"device": jx["device"], "jax": jx["jax"], "torch": th.get("torch"), "block": BLOCK,
           "date": time.strftime("%Y-%m-%d"), "timing": {"reps": a.reps, "inner": a.inner}, "rows": rows}
    print(f"{'case':24s} {'mask':10s} {'dens':>5s} {'impl':20s} {'fwd ms':>8s} {'fwd TF/s':>8s} "
          f"{'f+b ms':>8s} {'f+b TF/s':>8s}")
    for r in sorted(rows, key=lambda r: (r["case"], MASKS.index(r["mask"]), r["impl"])):
        if "error" in r:
            print(f"{r['case']:24s} {r['mask']:10s} {'':5s} {r['impl']:20s} ERROR {r['error'][:60]}")
            continue
        print(f"{r['case']:24s} {r['mask']:10s} {r['density']:5.3f} {r['impl']:20s} {r['fwd_ms']:8.3f} "
              f"{r['fwd_tflops']:8.1f} {r.get('fwdbwd_ms', math.nan):8.3f} {r.get('fwdbwd_tflops', math.nan):8.1f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("jax", "torch", "merge"), required=True)
    p.add_argument("--quick", action="store_true", help="one small case (a smoke test)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--inner", type=int, default=1, help="calls per timed sample (time per call; see Timings)")
    p.add_argument("--impl", default="mosaic_gpu", help="jaxeff's implementation (pallas: a CPU smoke test)")
    p.add_argument("--main-only", action="store_true", help="only the main shape, B2 H16 S16384 D128")
    p.add_argument("--profile", action="store_true",
                   help="trace jaxeff's forward at the main shape (dense, random 10%%, document, traced masks): "
                        "device ms per op in the JSON")
    p.add_argument("--deadline-s", type=float, default=1e9, help="start no new case after this many seconds")
    p.add_argument("--tables", default="/tmp/bench_attention_tables.npz")
    p.add_argument("--jax-json", default="/tmp/bench_attention_jax.json")
    p.add_argument("--torch-json", default="/tmp/bench_attention_torch.json")
    p.add_argument("--out", default="bench_attention.json")
    a = p.parse_args()
    if a.part == "jax":
        res = jax_part(a)
        json.dump(res, open(a.jax_json, "w"), indent=1)
    elif a.part == "torch":
        res = torch_part(a)
        json.dump(res, open(a.torch_json, "w"), indent=1)
    else:
        res = merge(a)
        json.dump(res, open(a.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Correctness of the GPU fast paths against the plain-jnp reference, on fresh random inputs.

Prints the relative error ||out - ref|| / ||ref|| of forward outputs and input gradients for
cuDNN attention (causal, causal + packed-document segments, GQA) against ``attention_reference``
computed in float32 from the same bf16 inputs.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.ops import AttentionMask, attention, attention_reference
from jaxeff.ops.attention_cudnn import PACKED_SEGMENT_TIERS, packed_tier


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> int:
    print(jax.devices(), jax.__version__)
    worst = 0.0
    # segs: None (no segment ids), or the number of documents in every row (one more run in the
    # last row, padding, from 3 up). 1, 2, 3, 10 and 40 reach each branch of the packed path:
    # tiers 1, 2, 4, 16, then the boolean-mask fallback (the printed branch index says which).
    cases = [(2, 512, 8, 8, 64, None), (2, 1024, 12, 4, 64, 1), (2, 1024, 12, 4, 64, 2), (1, 2048, 16, 2, 128, 3),
             (3, 384, 6, 3, 128, None), (2, 512, 4, 2, 64, 10), (2, 512, 4, 2, 64, 40)]
    for seed, (b, t, h, kh, d, segs) in enumerate(cases):
        ks = jax.random.split(jax.random.key(seed + 100), 4)
        q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, t, kh, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, kh, d), jnp.bfloat16)
        seg = None
        if segs:  # segs - 1 random document boundaries per row; padding ends the last row
            rng = np.random.default_rng(seed)
            seg_np = np.ones((b, t), np.int32)
            for r in range(b):
                cuts = rng.choice(np.arange(1, t - t // 8), segs - 1, replace=False)
                seg_np[r] = np.cumsum(np.isin(np.arange(t), cuts)) + 1
            if segs > 2:
                seg_np[-1, -t // 8:] = 0  # trailing padding: one more run in that row
            seg = jnp.asarray(seg_np)

        def loss(fn, q, k, v):
            return (fn(q, k, v).astype(jnp.float32) ** 2).sum()

        mask = AttentionMask.training(seg)
        fast = lambda q, k, v: attention(q, k, v, impl="cudnn", mask=mask)
        ref = lambda q, k, v: attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                  v.astype(jnp.float32), mask=mask)
        out_f, out_r = jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v)
        g_f = jax.jit(jax.grad(lambda *a: loss(fast, *a), argnums=(0, 1, 2)))(q, k, v)
        g_r = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2)))(q, k, v)
        errs = [rel(out_f, out_r)] + [rel(a, b_) for a, b_ in zip(g_f, g_r)]
        worst = max(worst, *errs)
        branch = "-" if seg is None else int(packed_tier(seg, PACKED_SEGMENT_TIERS))
        print(f"cudnn attention B{b} T{t} H{h} K{kh} D{d} segments={segs} branch={branch}: fwd {errs[0]:.2e} "
              f"dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}")
    if len(jax.devices()) > 1:  # the same call sharded over the batch must give the same result
        from jax.sharding import NamedSharding, PartitionSpec as P
        n = len(jax.devices())
        mesh = jax.make_mesh((n,), ("data",))
        q = jax.random.normal(jax.random.key(7), (2 * n, 1024, 8, 64), jnp.bfloat16)
        seg = (jnp.cumsum(jax.random.uniform(jax.random.key(8), q.shape[:2]) < 3 / 1024, axis=1) + 1).astype(jnp.int32)
        seg = seg.at[-1, -100:].set(0)
        f = jax.jit(lambda q, s: attention(q, q, q, impl="cudnn", mask=AttentionMask.training(s)))
        one = f(q, seg)
        sh = NamedSharding(mesh, P("data"))
        with jax.set_mesh(mesh):  # as in training: attention sees the mesh and runs cuDNN per device
            many = jax.jit(lambda q, s: attention(q, q, q, impl="cudnn", mask=AttentionMask.training(s)))(
                jax.device_put(q, sh), jax.device_put(seg, sh))
        e = rel(many, one)
        worst = max(worst, e)
        print(f"cudnn packed attention sharded over {n} devices vs one device: {e:.2e}")
    ok = worst < 2e-2
    print(f"worst relative error {worst:.2e}: {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

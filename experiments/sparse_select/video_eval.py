"""The video half of the evaluation: every method and setting with its sparse attention in every
layer of the trained video model (``layer_metrics`` per layer against dense attention on the same
inputs; the reconstruction loss at the end), SVG2's cost of mapping clusters onto fixed blocks,
and the reuse of masks across denoising steps (AdaSpa's refresh schedule, SVG2's warm start)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics, video_model
from .layers import Layers, dense_attention
from jaxeff.sparse.select import init_state, select
from jaxeff.sparse.select.paro import ORDER_NAMES, paro_calibrate
from jaxeff.sparse.select.common import permute, unpermute
from jaxeff.sparse.select.svg2 import cluster_densities, cluster_mask, permutation, svg2_clusters
from pallas_kernels.block_sparse_attention.reference import attention as masked_attention


def selector(method: str, knobs: dict, options: dict):
    """A jitted ``(q, k, state) -> (BlockMask, perm, state)`` for one setting."""
    if method == "local_window":
        raise ValueError("local_window is a baseline, not a selector")
    return jax.jit(lambda q, k, state: select(q, k, method=method, state=state, **knobs, **options))


def _calibrate_paro(model, calib, knobs, options, layers):
    """PARO's offline pass: each layer's order and static mask from a calibration batch."""
    _, seen = video_model.forward(model, calib, lambda i, q, k, v: dense_attention(q, k, v, causal=False)[0],
                                  layers, capture=True)
    cal = jax.jit(functools.partial(paro_calibrate, **knobs, **options))
    return [cal(q, k) for q, k, _, _ in seen]


def run_setting(model, batch, calib, method: str, knobs: dict, options: dict, layers: Layers, block: int) -> dict:
    """One (method, setting): per-layer metrics, reconstruction loss, selection / attention time."""
    t = batch["noisy"].shape[1]
    if method == "local_window":
        bm_fixed, w = metrics.local_window(t, block, knobs["density"], causal=False)
        sel, layer_states, extra = None, None, {"half_width_blocks": w}
    else:
        sel, extra = selector(method, knobs, options), {}
        if method == "paro":
            layer_states = _calibrate_paro(model, calib, knobs, options, layers)
            extra["orders"] = [[ORDER_NAMES[int(o)] for o in st.order] for st in layer_states]
        else:
            layer_states = [None] * len(layers)
    rows, masks, first = [], [], {}

    def attend_fn(i, q, k, v):
        o_dense, lse = dense_attention(q, k, v, causal=False)
        if sel is None:
            bm, perm = bm_fixed, None
        else:
            bm, perm, _ = sel(q, k, layer_states[i])
        m, o = metrics.layer_metrics(q, k, v, o_dense, lse, bm, perm, causal=False)
        rows.append(m)
        masks.append(np.asarray(bm.block_states())[0, 0].astype(np.int8).tolist())
        if i == 0:
            first.update(q=q, k=k, v=v, bm=bm, perm=perm)
        return o

    pred = video_model.forward(model, batch, attend_fn, layers)
    out = {"method": method, "knobs": knobs, **extra, "per_layer": rows,
           **{key: metrics.mean_of(rows, key) for key in ("rel_error", "density", "recall")},
           **video_model.reconstruction_loss(pred, batch), "mask_layer1_head0": masks[min(1, len(masks) - 1)]}
    q, k, v = first["q"], first["k"], first["v"]
    if sel is not None:
        _, out["select_seconds"] = metrics.timed(sel, q, k, layer_states[0])
    else:
        out["select_seconds"] = 0.0
    _, out["attention_seconds"] = metrics.timed(metrics.attend_jit, q, k, v, first["bm"], first["perm"])
    return out


def svg2_block_mapping(model, batch, layers, settings: list[dict], options: dict, block: int) -> list[dict]:
    """What SVG2's clusters cost on fixed blocks (``svg2.cluster_densities``), per setting and
    layer, and the error of the paper's exact variable-block mask next to our block cover."""
    _, seen = video_model.forward(model, batch, lambda i, q, k, v: dense_attention(q, k, v, causal=False)[0],
                                  layers, capture=True)
    out = []
    opts = {k: v for k, v in options.items() if k != "block"}
    for knobs in settings:
        clusters_fn = jax.jit(functools.partial(svg2_clusters, **knobs, **opts))
        per_layer = []
        for q, k, v, o_dense in seen:
            cl = clusters_fn(q, k)
            dens = {name: float(x) for name, x in cluster_densities(cl, block, block).items()}
            # the variable-block mask, evaluated element by element in the permuted order
            perm = permutation(cl)
            qp, kp, vp = permute(q, k, v, perm)
            o_var, _ = masked_attention(qp, kp, vp, cluster_mask(cl))
            dens["variable_rel_error"] = metrics.rel_error(unpermute(o_var, perm), o_dense)
            per_layer.append(dens)
        out.append({"knobs": knobs, "per_layer": per_layer,
                    **{key: metrics.mean_of(per_layer, key) for key in per_layer[0]}})
    return out


def reuse_across_steps(model, clean_batch, layers, *, sigmas: tuple[float, ...], density: float, block: int,
                       svg2_options: dict, seed: int = 123) -> dict:
    """Consecutive denoising steps (the same videos at decreasing noise levels, one noise draw;
    the layers see the dense trajectory, so the numbers are the masks' errors alone): AdaSpa
    searching every step, every 2 steps or only at step 0; SVG2 from cold centroids every step,
    or cold at step 0 and then warm-started with 2 iterations."""
    rng = np.random.default_rng(seed)
    clean = clean_batch["clean"]
    eps = jnp.asarray(rng.normal(size=clean.shape), jnp.float32)
    b = clean.shape[0]
    ada = dict(density=density, block=block)
    configs = {  # name: (method, options at step 0, options after, carry the state)
        "adaspa_every_step": ("adaspa", dict(ada, refresh_every=1), None, True),
        "adaspa_every_2": ("adaspa", dict(ada, refresh_every=2), None, True),
        "adaspa_step0_only": ("adaspa", dict(ada, refresh_steps=()), None, True),
        "svg2_cold": ("svg2", svg2_options, None, False),
        "svg2_warm_2iters": ("svg2", svg2_options, dict(svg2_options, iters=2), True),
    }
    out = {}
    for name, (method, first, later, carry) in configs.items():
        fns = [jax.jit(lambda q, k, state, o=o: select(q, k, method=method, state=state, **o))
               for o in (first, later or first)]
        states = [init_state(method, *_qk_shapes(model, clean), **first) for _ in range(len(layers))]
        per_step = []
        for step, sigma in enumerate(sigmas):
            batch = {"clean": clean, "noisy": clean + sigma * eps, "hidden": jnp.zeros(clean.shape[:2]),
                     "sigma": jnp.full((b,), sigma, jnp.float32)}
            rows, new_states = [], list(states)
            fn = fns[0 if step == 0 else 1]

            def attend_fn(i, q, k, v):
                o_dense, lse = dense_attention(q, k, v, causal=False)
                bm, perm, new_states[i] = fn(q, k, states[i])
                m, _ = metrics.layer_metrics(q, k, v, o_dense, lse, bm, perm, causal=False)
                rows.append(m)
                return o_dense

            video_model.forward(model, batch, attend_fn, layers)
            if carry:
                states = new_states
            per_step.append({"sigma": sigma, "rel_error": metrics.mean_of(rows, "rel_error"),
                             "density": metrics.mean_of(rows, "density"), "recall": metrics.mean_of(rows, "recall")})
        out[name] = per_step
    return out


def _qk_shapes(model, clean_BxTxP):
    b, t = clean_BxTxP.shape[:2]
    c = model.cfg
    return (jnp.zeros((b, t, c.n_heads, c.resolved_head_dim)), jnp.zeros((b, t, c.n_kv_heads, c.resolved_head_dim)))

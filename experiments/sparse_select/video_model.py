"""A small bidirectional video transformer, trained here on the procedural videos
(``video_data``) to denoise every patch and fill in hidden frames, so that its attention has the
spatial and temporal structure the video sparse-attention papers exploit.

Tokens: a patch's pixels and a hidden-frame flag, projected to d_model, plus the noise level.
Positions: 3D RoPE (head dims split in three, rotated by the frame, row and column index; the
rotation Block's own 1D RoPE would do is off, positions 0), as video DiTs use, so attention can
be local along any axis. Layers: ``jaxeff.nn.Block`` (pre-norm, GQA attention, SwiGLU) with
non-causal attention; the head predicts the clean pixels. Loss: mean squared error on every
token.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import video_data
from .layers import Layers
from jaxeff.config import ModelConfig
from jaxeff.nn import Block, RMSNorm


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 128


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0


def rope3d(x_BxTxHxD: jax.Array, grid: tuple[int, int, int], base: float = 100.0) -> jax.Array:
    """Rotary embedding over a (frames, height, width) grid: the head's D / 2 rotation pairs are
    split between the three axes (frames get the remainder's share last), each rotated by its
    axis index with frequencies base^(-i / n)."""
    d = x_BxTxHxD.shape[-1]
    pairs = d // 2
    n_h = n_w = pairs // 3 + (pairs % 3 > 0)
    n_f = pairs - n_h - n_w
    f, h, w = np.unravel_index(np.arange(int(np.prod(grid))), grid)
    angles = []
    for pos, n in ((f, n_f), (h, n_h), (w, n_w)):
        inv = base ** (-np.arange(n) / max(n, 1))
        angles.append(pos[:, None] * inv[None, :])
    ang = jnp.asarray(np.concatenate(angles, -1), jnp.float32)[None, :, None, :]  # [1, T, 1, D/2]
    x1, x2 = x_BxTxHxD[..., :pairs], x_BxTxHxD[..., pairs:]
    c, s_ = jnp.cos(ang), jnp.sin(ang)
    return jnp.concatenate([x1 * c - x2 * s_, x1 * s_ + x2 * c], -1).astype(x_BxTxHxD.dtype)


def gqa_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD):
    """Dense non-causal softmax attention, GQA without repeating K/V (training path; on a GPU
    cuDNN's fused attention in bf16, so long videos fit in memory)."""
    if jax.default_backend() == "gpu":
        bf = jnp.bfloat16
        args = (q_BxTxHxD.astype(bf), k_BxSxKxD.astype(bf), v_BxSxKxD.astype(bf))
        try:
            o = jax.nn.dot_product_attention(*args, implementation="cudnn")
        except Exception:  # noqa: BLE001 - no cuDNN fused attention for these shapes: XLA's, in bf16
            o = jax.nn.dot_product_attention(*args)
        return o.astype(q_BxTxHxD.dtype)
    b, t, h, d = q_BxTxHxD.shape
    kh = k_BxSxKxD.shape[2]
    q = q_BxTxHxD.reshape(b, t, kh, h // kh, d)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxD) * d ** -0.5
    p = jax.nn.softmax(s.astype(jnp.float32), axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", p, v_BxSxKxD).reshape(b, t, h, d)


class VideoModel(nnx.Module):
    def __init__(self, video: video_data.VideoSpec, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.video, self.spec = video, spec
        d = spec.d_model
        self.cfg = ModelConfig(vocab_size=1, d_model=d, n_layers=spec.n_layers, n_heads=spec.n_heads,
                               n_kv_heads=spec.n_kv_heads, d_ff=spec.d_ff, max_seq_len=video.tokens)
        self.inp = nnx.Linear(video.token_dim + 1, d, rngs=rngs)
        self.noise = nnx.Linear(1, d, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.pos_f = nnx.Param(init(rngs.params(), (video.frames, d)))
        self.pos_h = nnx.Param(init(rngs.params(), (video.grid, d)))
        self.pos_w = nnx.Param(init(rngs.params(), (video.grid, d)))
        self.blocks = nnx.List([Block(self.cfg, i, rngs=rngs) for i in range(spec.n_layers)])
        self.norm = RMSNorm(d, eps=1e-5, param_dtype="float32", rngs=rngs)
        self.head = nnx.Linear(d, video.token_dim, rngs=rngs)

    def embed(self, noisy_BxTxP, hidden_BxT, sigma_B):
        f, g = self.video.frames, self.video.grid
        pos = (self.pos_f[...][:, None, None] + self.pos_h[...][None, :, None] + self.pos_w[...][None, None, :])
        x = self.inp(jnp.concatenate([noisy_BxTxP, hidden_BxT[..., None]], -1))
        return x + pos.reshape(f * g * g, -1)[None] + self.noise(sigma_B[:, None, None])

    def output(self, x_BxTxD):
        return self.head(self.norm(x_BxTxD))

    def __call__(self, noisy_BxTxP, hidden_BxT, sigma_B):
        x = self.embed(noisy_BxTxP, hidden_BxT, sigma_B)
        positions = jnp.zeros(x.shape[:2], jnp.int32)
        grid = self.video.token_grid
        for blk in self.blocks:
            x, _, _ = blk(x, positions, lambda q, k, v: (gqa_attention(rope3d(q, grid), rope3d(k, grid), v), None))
        return self.output(x)


def mse(pred, clean) -> jax.Array:
    return jnp.mean((pred - clean) ** 2)


def train(video: video_data.VideoSpec, spec: ModelSpec, tspec: TrainSpec, *, log=print) -> tuple[VideoModel, dict]:
    """Trains on fresh videos every step; returns the model and a summary (losses, time)."""
    model = VideoModel(video, spec, rngs=nnx.Rngs(tspec.seed))
    graphdef, params = nnx.split(model)
    sched = optax.warmup_cosine_decay_schedule(0.0, tspec.lr, tspec.warmup, max(tspec.steps, tspec.warmup + 1),
                                               tspec.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = tx.init(params)

    def loss_fn(params, batch):
        m = nnx.merge(graphdef, params)
        return mse(m(batch["noisy"], batch["hidden"], batch["sigma"]), batch["clean"])

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0, curve = time.perf_counter(), []
    seeds = (tspec.seed * 1_000_003 + i for i in range(tspec.steps))
    for i, batch in enumerate(prefetch(lambda seed: make_batch(video, tspec.batch_size, seed=seed), seeds)):
        params, opt_state, loss = step(params, opt_state, batch)
        if i % max(1, tspec.steps // 10) == 0 or i == tspec.steps - 1:
            curve.append((i, float(loss)))
            log(f"  video model step {i:4d} loss {float(loss):.4f}")
    model = nnx.merge(graphdef, params)
    return model, {"train_curve": curve, "train_seconds": time.perf_counter() - t0, "steps": tspec.steps,
                   "batch_size": tspec.batch_size}


def prefetch(make, keys, ahead: int = 4, workers: int = 2):
    """``make(key)`` for each key, in order, computed ``ahead`` keys early by ``workers`` threads
    (the procedural videos are drawn in numpy on the host while the device trains)."""
    keys = iter(keys)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        queue = collections.deque(pool.submit(make, k) for k in itertools.islice(keys, ahead))
        while queue:
            item = queue.popleft().result()
            for k in itertools.islice(keys, 1):
                queue.append(pool.submit(make, k))
            yield item


def make_batch(video: video_data.VideoSpec, size: int, seed: int) -> dict[str, jax.Array]:
    clean = video_data.batch(video, size, seed)
    inputs = video_data.corrupt(clean, video, seed + 7)
    return {"clean": jnp.asarray(clean), **{k: jnp.asarray(v) for k, v in inputs.items()}}


def forward(model: VideoModel, batch: dict, attend, layers: Layers | None = None, capture: bool = False):
    """The model with ``attend(layer, q, k, v) -> o`` in every layer (layer by layer, for the
    sparse evaluation). Returns predictions (and captured per-layer q, k, v, o)."""
    layers = layers or Layers(list(model.blocks))
    x = model.embed(batch["noisy"], batch["hidden"], batch["sigma"])
    positions = jnp.zeros(x.shape[:2], jnp.int32)
    rope = _rope_jit(model.video.token_grid)
    out = layers.run(x, positions, attend, capture=capture, rotate=rope)
    x, seen = out if capture else (out, None)
    pred = model.output(x)
    return (pred, seen) if capture else pred


@functools.lru_cache(maxsize=None)
def _rope_jit(grid):
    return jax.jit(functools.partial(rope3d, grid=grid))


def reconstruction_loss(pred, batch) -> dict[str, float]:
    """MSE over all tokens and over the hidden frames' tokens alone."""
    err = np.asarray((pred - batch["clean"]) ** 2).mean(-1)
    hidden = np.asarray(batch["hidden"]) > 0
    return {"mse": float(err.mean()), "mse_hidden_frames": float(err[hidden].mean()) if hidden.any() else None}

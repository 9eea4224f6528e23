"""Procedural videos for the video-attention experiments: moving, rotating shapes on a grid.

Each video has ``frames`` frames of ``grid x grid`` patches of ``patch x patch`` grey pixels. It
holds 2-3 shapes (discs, squares, triangles, crosses) of random size and brightness, each moving
at a constant velocity and bouncing off the borders, the angular ones rotating. Reconstructing
a frame needs the same place in neighbouring frames (temporal attention) and the neighbourhood
in the same frame (spatial attention), the structure the video sparse-attention papers exploit.

Tokens are the patches in frame-row-column (F-H-W) raster order: ``[B, F * grid * grid,
patch * patch]``, pixel values in [0, 1]. Deterministic in the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("disc", "square", "triangle", "cross")


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    frames: int = 8
    grid: int = 8  # patches per side
    patch: int = 4  # pixels per patch side
    max_objects: int = 3

    @property
    def size(self) -> int:
        return self.grid * self.patch

    @property
    def tokens(self) -> int:
        return self.frames * self.grid * self.grid

    @property
    def token_dim(self) -> int:
        return self.patch * self.patch

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return (self.frames, self.grid, self.grid)


def _bounce(x0: np.ndarray, v: np.ndarray, t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Positions x0 + v t reflected into [lo, hi] (a triangle wave)."""
    span = np.maximum(hi - lo, 1e-6)
    y = np.mod(x0 - lo + v * t, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float, angle: np.ndarray) -> np.ndarray:
    """Inside-test of a shape of radius ``r`` at offsets (dx, dy), rotated by ``angle`` [F, 1, 1]."""
    c, s = np.cos(angle), np.sin(angle)
    u, w = c * dx + s * dy, -s * dx + c * dy
    if kind == "disc":
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(w) <= 0.8 * r)
    if kind == "cross":
        return ((np.abs(u) <= r) & (np.abs(w) <= 0.3 * r)) | ((np.abs(w) <= r) & (np.abs(u) <= 0.3 * r))
    # triangle: three half-planes at 120 degrees
    inside = np.ones(np.broadcast_shapes(u.shape, w.shape), bool)
    for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        inside &= np.cos(a) * u + np.sin(a) * w <= 0.5 * r
    return inside


def render(spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    """One video [F, size, size] float32 in [0, 1]."""
    n = spec.size
    t = np.arange(spec.frames, dtype=np.float64)[:, None, None]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    video = np.zeros((spec.frames, n, n))
    for _ in range(rng.integers(2, spec.max_objects + 1)):
        kind = SHAPES[rng.integers(len(SHAPES))]
        r = rng.uniform(0.12, 0.22) * n
        lo, hi = np.array([r, r]), np.array([n - 1 - r, n - 1 - r])
        p0 = rng.uniform(lo, hi)
        v = rng.uniform(-0.09, 0.09, size=2) * n * rng.choice([1.0, 0.5])
        omega = rng.uniform(-0.4, 0.4) if kind != "disc" else 0.0
        cx = _bounce(p0[0], v[0], t, lo[0], hi[0])
        cy = _bounce(p0[1], v[1], t, lo[1], hi[1])
        mask = _shape_mask(kind, xx - cx, yy - cy, r, rng.uniform(0, np.pi) + omega * t)
        video = np.maximum(video, mask * rng.uniform(0.45, 1.0))
    return video.astype(np.float32)


def patchify(video_FxNxN: np.ndarray, spec: VideoSpec) -> np.ndarray:
    """[F, size, size] -> [F * grid * grid, patch * patch] tokens in F-H-W order."""
    g, p = spec.grid, spec.patch
    x = video_FxNxN.reshape(spec.frames, g, p, g, p).transpose(0, 1, 3, 2, 4)
    return x.reshape(spec.frames * g * g, p * p)


def unpatchify(tokens: np.ndarray, spec: VideoSpec) -> np.ndarray:
    g, p = spec.grid, spec.patch
    x = np.asarray(tokens).reshape(spec.frames, g, g, p, p).transpose(0, 1, 3, 2, 4)
    return x.reshape(spec.frames, g * p, g * p)


def batch(spec: VideoSpec, size: int, seed: int) -> np.ndarray:
    """[size, T, token_dim] float32 clean videos."""
    rng = np.random.default_rng(seed)
    return np.stack([patchify(render(spec, rng), spec) for _ in range(size)])


def corrupt(clean_BxTxP: np.ndarray, spec: VideoSpec, seed: int, *, max_sigma: float = 0.8,
            masked_frames: int = 2) -> dict[str, np.ndarray]:
    """The task's inputs: Gaussian noise of a random level sigma ~ U(0, max_sigma) on every token,
    and ``masked_frames`` whole frames hidden (set to 0, flagged) in every video: the model
    denoises (which needs each patch's neighbourhood) and fills the hidden frames in (which needs
    the same place in other frames). Returns ``noisy`` [B, T, P], ``hidden`` [B, T]
    (1.0 on hidden tokens) and ``sigma`` [B]."""
    rng = np.random.default_rng(seed)
    b, t, _ = clean_BxTxP.shape
    per = spec.grid * spec.grid
    sigma = rng.uniform(0.0, max_sigma, size=b).astype(np.float32)
    noisy = clean_BxTxP + sigma[:, None, None] * rng.normal(size=clean_BxTxP.shape).astype(np.float32)
    hidden = np.zeros((b, t), np.float32)
    for i in range(b):
        for f in rng.choice(spec.frames, size=masked_frames, replace=False):
            hidden[i, f * per:(f + 1) * per] = 1.0
    noisy = np.where(hidden[..., None] > 0, 0.0, noisy).astype(np.float32)
    return {"noisy": noisy, "hidden": hidden, "sigma": sigma}

"""Routing maths for Mixture-of-Recursions (Bae et al., 2025, arXiv 2507.10524, Sections 2.2-2.3).

MoR reuses one stack of shared layers up to N_r times and lets a router decide, per token, how many
recursions it gets. Two routers are in the paper, and their pure maths lives here:

  * Expert-choice (Sec. 2.2.1): before recursion r a router scores the tokens still active and the
    top-k by logit continue, with capacity c_r = k_r / N = (N_r - r + 1) / N_r ({1, 2/3, 1/3} for
    N_r = 3) and hierarchical filtering (only tokens picked at r may be picked at r + 1). The chosen
    indices are sorted so the compacted subsequence keeps causal order; the block output is gated by
    ``alpha * sigmoid(logit)`` and scattered back residually. Top-k over the sequence sees the future,
    so an auxiliary BCE loss trains each logit to predict its own selection; decoding then keeps a
    token iff its logit >= 0 (``threshold_decision``), which the paper measures with sampling accuracy
    (~99%) and dead tokens (~0.1%).
  * Token-choice (Sec. 2.2.2): one router picks each token's depth in 1..N_r up front (top-1 of a
    softmax over N_r), balanced with a Switch-style auxiliary loss or a loss-free bias (Wang et al.,
    2024), optionally with a z-loss (ST-MoE, Zoph et al., 2022).

Everything is a pure, jit-compatible function. Arguments that fix shapes (``k``, ``n_depths``) and
capacities are static Python values; statistics are computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "default_capacities", "validate_capacities", "tokens_for_capacity", "warmup_capacity",
    "router_gate", "threshold_decision", "expert_choice_topk", "gather_rows", "scatter_add_rows",
    "topk_bce_loss", "sampling_accuracy", "dead_token_ratio",
    "token_choice_route", "balancing_loss", "depth_load", "loss_free_bias_update", "router_z_loss",
    "max_violation", "assignment_entropy",
]

_GATE_FUNCS = ("sigmoid", "tanh", "softmax")


# --- Capacities -----------------------------------------------------------------------------------

def default_capacities(n_recursions: int) -> tuple[float, ...]:
    """The paper's capacity schedule c_r = (N_r - r + 1) / N_r for r = 1..N_r (Sec. 2.2.1)."""
    if n_recursions < 1:
        raise ValueError(f"n_recursions must be >= 1, got {n_recursions}")
    return tuple((n_recursions - r + 1) / n_recursions for r in range(1, n_recursions + 1))


def validate_capacities(capacities: Sequence[float], n_recursions: int, *, name: str = "capacities"
                        ) -> tuple[float, ...]:
    """Checks a per-recursion capacity list and returns it as a tuple of floats.

    Hierarchical filtering only ever drops tokens, so capacities must be non-increasing; each is a
    fraction of the sequence in (0, 1]. Error messages start with ``name`` (e.g. a config field).
    """
    try:
        caps = tuple(float(c) for c in capacities)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers, got {capacities!r}") from e
    if len(caps) != n_recursions:
        raise ValueError(f"{name} must have one entry per recursion: expected {n_recursions}, got {len(caps)} "
                         f"({caps})")
    bad = [c for c in caps if not 0.0 < c <= 1.0]  # also catches NaN
    if bad:
        raise ValueError(f"{name} must lie in (0, 1], got {bad} in {caps}")
    if any(b > a for a, b in zip(caps, caps[1:])):
        raise ValueError(f"{name} must be descending (non-increasing): a token dropped at one recursion "
                         f"cannot return at the next, got {caps}")
    return caps


def tokens_for_capacity(capacity: float, n: int) -> int:
    """k = max(1, int(capacity * n)), the number of tokens kept out of n (Sec. 2.2.1), with the
    official code's truncation exactly: a product that floats round just below an integer gives
    the integer below (0.7 * 90 = 62.99999999999999 -> 62). The default capacities (N_r - r) / N_r
    give exact products for every length, so they are not affected."""
    return max(1, int(capacity * n))


def warmup_capacity(capacity: float, step, warmup_steps: int):
    """Cosine warm-up of a capacity from 1.0 at step 0 down to ``capacity`` at ``warmup_steps``.

    c = capacity + (1 - capacity) * (1 + cos(pi * min(1, step / warmup_steps))) / 2. A Python step
    gives a Python float (so ``tokens_for_capacity`` stays static); a traced step gives a float32
    array. ``warmup_steps == 0`` returns ``capacity``.
    """
    if warmup_steps == 0:
        return capacity
    if isinstance(step, (int, float)):
        frac = min(1.0, max(0.0, step / warmup_steps))
        return capacity + (1.0 - capacity) * 0.5 * (1.0 + math.cos(math.pi * frac))
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
    return capacity + (1.0 - capacity) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


# --- Expert-choice routing ------------------------------------------------------------------------

def router_gate(logits: jax.Array, func: str, alpha: float, *, axis: int = -1) -> jax.Array:
    """The gate g that scales a recursion's output (Sec. 2.2.1, g = alpha * G(theta^T H)), float32.

    ``sigmoid``: alpha * sigmoid(logit), the paper's default (alpha = 0.1). ``tanh``: alpha * tanh.
    ``softmax``: alpha * N * softmax(logits, axis) with N = logits.shape[axis], i.e. normalised across
    the candidate tokens and rescaled so the mean gate is alpha. That is non-causal (every token's gate
    depends on later tokens), so at decoding the keep/drop decision uses ``threshold_decision``
    (logit >= 0), not the gate.
    """
    x = logits.astype(jnp.float32)
    if func == "sigmoid":
        return alpha * jax.nn.sigmoid(x)
    if func == "tanh":
        return alpha * jnp.tanh(x)
    if func == "softmax":
        return alpha * x.shape[axis] * jax.nn.softmax(x, axis=axis)
    raise ValueError(f"router func must be one of {_GATE_FUNCS}, got {func!r}")


def threshold_decision(logits: jax.Array, func: str) -> jax.Array:
    """The causal inference rule (Sec. 2.2.1, "auxiliary loss"): keep a token iff logit >= 0.

    For sigmoid that is sigmoid >= 0.5, for tanh it is tanh >= 0; for softmax the BCE auxiliary loss
    trains the raw logits, so the same sign test applies.
    """
    if func not in _GATE_FUNCS:
        raise ValueError(f"router func must be one of {_GATE_FUNCS}, got {func!r}")
    return logits >= 0


def expert_choice_topk(logits_BxN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k tokens per row by logit, indices sorted ascending (Sec. 2.2.1).

    Sorting keeps the compacted subsequence in causal order, so causal attention over it stays valid.
    Returns (local_idx_Bxk int32, selected_mask_BxN bool). Ties follow ``jax.lax.top_k``.
    """
    b, n = logits_BxN.shape
    if not 1 <= k <= n:
        raise ValueError(f"expert_choice_topk: k must satisfy 1 <= k <= N={n}, got k={k}")
    _, idx_Bxk = jax.lax.top_k(logits_BxN.astype(jnp.float32), k)
    idx_Bxk = jnp.sort(idx_Bxk, axis=1).astype(jnp.int32)
    mask_BxN = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], idx_Bxk].set(True)
    return idx_Bxk, mask_BxN


def gather_rows(x_BxN: jax.Array, idx_Bxk: jax.Array) -> jax.Array:
    """x[b, idx[b, j], ...] for every row b: compacts hidden states [B,N,D], positions or segment ids
    [B,N] (any rank >= 2) to the chosen tokens."""
    idx = idx_Bxk.reshape(idx_Bxk.shape + (1,) * (x_BxN.ndim - 2))
    idx = jnp.broadcast_to(idx, idx_Bxk.shape + x_BxN.shape[2:])
    return jnp.take_along_axis(x_BxN, idx, axis=1)


def scatter_add_rows(h_BxTxD: jax.Array, idx_Bxk: jax.Array, update_BxkxD: jax.Array) -> jax.Array:
    """h[b, idx[b, j]] += update[b, j]: the residual write-back of a recursion's output to the chosen
    tokens (indices distinct within a row). Keeps h's dtype."""
    rows = jnp.arange(h_BxTxD.shape[0])[:, None]
    return h_BxTxD.at[rows, idx_Bxk].add(update_BxkxD.astype(h_BxTxD.dtype))


def _masked_mean(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Mean of x over valid entries, float32; 0 when none is valid."""
    x = x.astype(jnp.float32)
    if valid is None:
        return jnp.mean(x)
    # where, not multiply: an invalid position may hold garbage (even NaN) that must not leak.
    return jnp.where(valid, x, 0.0).sum() / jnp.maximum(valid.sum().astype(jnp.float32), 1.0)


def topk_bce_loss(logits_BxN: jax.Array, selected_mask_BxN: jax.Array, valid_BxN: jax.Array | None = None
                  ) -> jax.Array:
    """Mean binary cross-entropy of router logits against their top-k selection (Sec. 2.2.1).

    The auxiliary loss (coefficient 1e-3 in the paper) that teaches each logit to predict, from the
    prefix alone, whether top-k would pick it, which is what makes ``threshold_decision`` causal.
    Uses softplus(x) - x * y, stable for large |x|. Averaged over valid positions; 0 if none.
    """
    x = logits_BxN.astype(jnp.float32)
    if valid_BxN is not None:
        # zero invalid logits first as well: a NaN there would otherwise give a NaN gradient.
        x = jnp.where(valid_BxN, x, 0.0)
    bce_BxN = jax.nn.softplus(x) - x * selected_mask_BxN.astype(jnp.float32)
    return _masked_mean(bce_BxN, valid_BxN)


def sampling_accuracy(logits_BxN: jax.Array, selected_mask_BxN: jax.Array, func: str,
                      valid_BxN: jax.Array | None = None) -> jax.Array:
    """Fraction of valid positions where the causal threshold rule agrees with top-k (float32); the
    paper reports ~99% with the BCE loss."""
    agree_BxN = threshold_decision(logits_BxN, func) == selected_mask_BxN.astype(bool)
    return _masked_mean(agree_BxN, valid_BxN)


def dead_token_ratio(selected_mask_BxT: jax.Array, valid_BxT: jax.Array | None = None) -> jax.Array:
    """Fraction of sequence positions that no row of the batch selects (the paper's "dead tokens").

    Definition: over positions t that are valid in at least one row, the share with
    selected[b, t] & valid[b, t] false for every b. Applied to the last recursion's mask it measures
    positions the deepest recursion never trains on; the paper reports ~0.1%.
    """
    selected = selected_mask_BxT.astype(bool)
    if valid_BxT is None:
        valid = jnp.ones_like(selected)
    else:
        valid = valid_BxT.astype(bool)
    live_T = jnp.any(selected & valid, axis=0)
    present_T = jnp.any(valid, axis=0)
    dead = (present_T & ~live_T).sum().astype(jnp.float32)
    return dead / jnp.maximum(present_T.sum().astype(jnp.float32), 1.0)


# --- Token-choice routing -------------------------------------------------------------------------

def token_choice_route(logits_BxTxR: jax.Array, bias_R: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-1 depth per token from one router over N_r depths (Sec. 2.2.2).

    Returns (depth_BxT int32 in 1..R, gate_BxT float32 = probability of the chosen depth,
    probs_BxTxR float32). ``bias_R`` shifts only the choice, not the gate or probabilities: the
    loss-free balancing rule of Wang et al. (2024) as used in DeepSeek-V3.
    """
    logits = logits_BxTxR.astype(jnp.float32)
    probs_BxTxR = jax.nn.softmax(logits, axis=-1)
    scores = logits if bias_R is None else logits + bias_R.astype(jnp.float32)
    choice_BxT = jnp.argmax(scores, axis=-1)
    gate_BxT = jnp.take_along_axis(probs_BxTxR, choice_BxT[..., None], axis=-1)[..., 0]
    return (choice_BxT + 1).astype(jnp.int32), gate_BxT, probs_BxTxR


def depth_load(depth_BxT: jax.Array, n_depths: int, valid_BxT: jax.Array | None = None) -> jax.Array:
    """Fraction of valid tokens assigned to each depth 1..n_depths, float32 [n_depths] (zeros if none
    is valid)."""
    onehot_BxTxR = jax.nn.one_hot(depth_BxT - 1, n_depths, dtype=jnp.float32)
    if valid_BxT is None:
        valid_BxT = jnp.ones(depth_BxT.shape, bool)
    counts_R = jnp.where(valid_BxT[..., None], onehot_BxTxR, 0.0).sum(axis=tuple(range(depth_BxT.ndim)))
    return counts_R / jnp.maximum(valid_BxT.sum().astype(jnp.float32), 1.0)


def balancing_loss(probs_BxTxR: jax.Array, depth_BxT: jax.Array, valid_BxT: jax.Array | None = None
                   ) -> jax.Array:
    """Switch-Transformer load-balancing loss R * sum_i f_i * P_i (Fedus et al., 2021, eq. 4).

    f_i is the fraction of valid tokens routed to depth i, P_i the mean router probability of depth i
    over valid tokens. The factor R makes a uniform router score 1. The MoR model multiplies this by
    its coefficient alpha (0.1 in the paper, Sec. 2.2.2); gradients flow through P only.
    """
    r = probs_BxTxR.shape[-1]
    f_R = depth_load(depth_BxT, r, valid_BxT)
    probs = probs_BxTxR.astype(jnp.float32)
    if valid_BxT is None:
        valid_BxT = jnp.ones(depth_BxT.shape, bool)
    p_R = jnp.where(valid_BxT[..., None], probs, 0.0).sum(axis=tuple(range(depth_BxT.ndim)))
    p_R = p_R / jnp.maximum(valid_BxT.sum().astype(jnp.float32), 1.0)
    return r * jnp.sum(f_R * p_R)


def loss_free_bias_update(bias_R: jax.Array, load_R: jax.Array, rate: float) -> jax.Array:
    """The loss-free balancing step (Wang et al., 2024, Alg. 1): delta = rate * sign(mean(load) - load).

    Returns the DELTA (caller does bias += delta), in bias_R's dtype: underloaded depths are pushed up,
    overloaded ones down, without touching the gradient.
    """
    load = load_R.astype(jnp.float32)
    return (rate * jnp.sign(jnp.mean(load) - load)).astype(bias_R.dtype)


def router_z_loss(logits: jax.Array, axis: int | None = None) -> jax.Array:
    """Router z-loss (ST-MoE, Zoph et al., 2022, eq. 5): mean of logsumexp(logits, axis)^2, float32.

    With ``axis=None`` (the default) each logit is its own 1-way router, as for expert-choice logits
    [B, N], so the loss is mean(logits^2). Token-choice logits [B, T, R] must pass ``axis=-1``.
    """
    x = logits.astype(jnp.float32)
    if axis is None:
        return jnp.mean(jnp.square(x))
    return jnp.mean(jnp.square(jax.nn.logsumexp(x, axis=axis)))


def max_violation(load_R: jax.Array) -> jax.Array:
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al., 2024, eq. 7); 0 means perfectly
    balanced. An all-zero load (no valid tokens) gives 0."""
    load = load_R.astype(jnp.float32)
    mean = jnp.mean(load)
    return jnp.where(mean > 0, (jnp.max(load) - mean) / jnp.where(mean > 0, mean, 1.0), 0.0)


def assignment_entropy(load_R: jax.Array) -> jax.Array:
    """Entropy -sum_i p_i log p_i of the depth distribution, in nats (0 log 0 = 0), float32.

    Raw, not normalised: divide by log(R) for a value in [0, 1]. ``load_R`` should sum to 1 (as
    ``depth_load`` does whenever any token is valid).
    """
    return jnp.sum(jax.scipy.special.entr(load_R.astype(jnp.float32)))

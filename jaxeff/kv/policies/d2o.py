"""D2O, dynamic discriminative operations (Wan et al., 2024, "D2O: Dynamic Discriminative
Operations for Efficient Generative Inference of Large Language Models", arXiv 2406.13035,
sections 3.2-3.3; the reference code AIoT-MLSys-Lab/D2O, ``D2O_LayerKVCache``).

Layer budgets (from the prompt): per layer and query head the variance (unbiased, over the
prompt's slots) of the attention column sums; min-max normalised over the heads and averaged,
that is the layer's sigma_l. Layer l keeps ``clip(softmax(-sigma)_l * L * rho, 0.01, 1)`` of
the tokens (rho: the budget's fraction of the tokens), so concentrated layers keep less; layers
0, 1 and L-1 are not compressed.

Eviction: H2O inside each layer (accumulated attention per head, the first ``sinks`` tokens with
infinite score), a recent window of ``recent`` (a fraction of the layer budget) and the rest
heavy hitters.

Merge: each evicted key e finds its most similar kept key ``c = argmax cos(k_e, k_c)``,
``s_e = max cos``; an EMA threshold ``tau = alpha tau_prev + beta mean(s)`` (tau = mean(s) the
first time; alpha = beta = 0.5) decides which merge: the reference averages ``s`` of the j-th
evicted slot of every head (``max_values.mean(1)``) and merges it in all heads when that mean
reaches tau. A kept slot c receiving n_c evicted slots becomes
``(k_c + sum_e s_e k_e) / (1 + n_c)``, its value ``(v_c + sum_e s_e v_e) / (1 + n_c)``
(``scatter_reduce(..., 'mean', include_self=True)`` of the weighted evicted keys).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxeff.kv.observe import group_mean
from jaxeff.kv.policies.base import ScoringPolicy, check_float, check_int
from jaxeff.kv.policies.h2o import check_recent, recent_count
from jaxeff.kv.select import keep_top, merge_mean, recent_mask, sink_mask


def layer_sigma(sums_BxHxC, valid_BxC):
    """D2O's per-layer attention-density statistic sigma_l, one per row [B]."""
    n = valid_BxC.sum(-1, keepdims=True)[:, None].astype(jnp.float32)
    v = valid_BxC[:, None, :]
    mean = jnp.where(v, sums_BxHxC, 0).sum(-1, keepdims=True) / n
    var_BxH = (jnp.where(v, (sums_BxHxC - mean) ** 2, 0).sum(-1, keepdims=True) / jnp.maximum(n - 1, 1))[..., 0]
    lo, hi = var_BxH.min(-1, keepdims=True), var_BxH.max(-1, keepdims=True)
    return ((var_BxH - lo) / (hi - lo + 1e-6)).mean(-1)


def d2o_layer_ratios(sigmas, rho_B, full_layers):
    """Per-layer kept fractions: clip(softmax(-sigma) * L * rho, 0.01, 1), 1 in ``full_layers``."""
    sig_BxL = jnp.stack(sigmas, axis=-1)
    n = sig_BxL.shape[-1]
    r = jnp.clip(jax.nn.softmax(-sig_BxL, axis=-1) * n * rho_B[:, None], 0.01, 1.0)
    full = jnp.zeros(n, bool).at[jnp.asarray([i % n for i in full_layers], jnp.int32)].set(True)
    return jnp.where(full[None, :], 1.0, r)


def merge_targets(layer, keep, valid):
    """For each evicted slot: its most similar kept key (cosine) and that similarity."""
    k = jnp.swapaxes(layer.keys_values(jnp.float32)[0], 1, 2)  # [B, K, C, D]
    unit = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    cos = jnp.einsum("bkcd,bksd->bkcs", unit, unit)
    cos = jnp.where(keep[:, :, None, :], cos, -jnp.inf)
    return jnp.argmax(cos, -1).astype(jnp.int32), jnp.max(cos, -1)


@dataclasses.dataclass(frozen=True)
class D2O(ScoringPolicy):
    name: ClassVar[str] = "d2o"
    kind: ClassVar[str] = "merge"
    slot_state: ClassVar[tuple[str, ...]] = ("acc",)
    recent: float | int = 0.5
    sinks: int = 4
    alpha: float = 0.5
    beta: float = 0.5
    full_layers: tuple[int, ...] = (0, 1, -1)
    merge: bool = True

    def __post_init__(self):
        check_recent(self.name, self.recent)
        check_int(self.name, "sinks", self.sinks)
        check_float(self.name, "alpha", self.alpha, 0.0, 1.0)
        check_float(self.name, "beta", self.beta, 0.0, 1.0)
        object.__setattr__(self, "full_layers", tuple(int(i) for i in self.full_layers))

    @property
    def needs_sums(self) -> bool:
        return True

    def protected_slots(self, budget: int) -> int:
        return recent_count(self.recent, budget)

    def max_kept(self, budget: int, length: int, n_layers: int) -> int:
        return length  # the uncompressed layers keep everything

    def init(self, cache, obs=None):
        out = []
        for i, layer in enumerate(cache.layers):
            sigma = layer_sigma(obs.sums[i], layer.valid[:, 0])
            out.append({"acc": jnp.zeros(layer.positions.shape, jnp.float32), "sigma": sigma,
                        "tau": jnp.zeros(sigma.shape, jnp.float32), "tau_set": jnp.zeros(sigma.shape, bool)})
        return tuple(out)

    def observe(self, cache, state, obs):
        return tuple({**st, "acc": st["acc"] + group_mean(obs.sums[i], layer.n_kv_heads)}
                     for i, (layer, st) in enumerate(zip(cache.layers, state)))

    def layer_budgets(self, cache, state, obs):
        lengths = cache.lengths.astype(jnp.float32)
        rho = obs.budget.astype(jnp.float32) / jnp.maximum(lengths, 1.0)
        ratios = d2o_layer_ratios([st["sigma"] for st in state], rho, self.full_layers)
        return tuple(jnp.maximum(jnp.floor(ratios[:, i] * lengths), 1).astype(jnp.int32) for i in range(len(state)))

    def score(self, index, layer, state, obs, lengths_B):
        return jnp.where(sink_mask(layer, self.sinks), jnp.inf, state["acc"])

    def protect(self, index, layer, state, obs, lengths_B, budget_B):
        return recent_mask(layer, lengths_B, recent_count(self.recent, budget_B))

    def evict(self, index, layer, state, obs, lengths_B, budget_B):
        valid = layer.valid
        keep = keep_top(self.score(index, layer, state, obs, lengths_B), valid,
                        self.protect(index, layer, state, obs, lengths_B, budget_B), budget_B,
                        headwise=obs.headwise, safeguard=obs.safeguard)
        if not self.merge:
            return self.apply_keep(index, layer, state, keep, obs)
        evicted = valid & ~keep
        dest, sim = merge_targets(layer, keep, valid)
        sim = jnp.where(evicted, sim, 0.0)
        n_ev_B = evicted.sum((1, 2))
        any_B = n_ev_B > 0
        mean_B = sim.sum((1, 2)) / jnp.maximum(n_ev_B, 1)
        tau = jnp.where(state["tau_set"], self.alpha * state["tau"] + self.beta * mean_B, mean_B)
        tau = jnp.where(any_B, tau, state["tau"])
        # the j-th evicted slot of every head is judged together (the reference's mean over heads)
        rank = jnp.cumsum(evicted, -1) - 1
        b, kh, c = evicted.shape
        rows, heads = jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None]
        slot_rank = jnp.where(evicted, rank, c)
        by_rank = jnp.zeros((b, kh, c), jnp.float32).at[rows, heads, slot_rank].set(sim, mode="drop")
        has_rank = jnp.zeros((b, kh, c), jnp.float32).at[rows, heads, slot_rank].set(1.0, mode="drop")
        mean_by_rank = by_rank.sum(1) / jnp.maximum(has_rank.sum(1), 1.0)  # [B, C]
        merge = evicted & (jnp.take_along_axis(mean_by_rank[:, None, :].repeat(kh, 1), jnp.clip(rank, 0, c - 1), -1)
                           >= tau[:, None, None])
        layer = merge_mean(layer, jnp.where(merge, dest, c), sim)
        state = {**state, "tau": tau, "tau_set": state["tau_set"] | any_B}
        return self.apply_keep(index, layer, state, keep, obs)

"""Quest, query-aware sparsity (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference", arXiv 2406.10774, section 3, Algorithm 1).

Nothing is evicted: the cache is cut into pages of ``page`` consecutive slots; per page and
channel the maximum M and minimum m of its keys bound any query's product, so a page's
criticality for query q is ``sum_d max(q_d M_d, q_d m_d)`` (an upper bound of its largest score).
At each decode step (one query per row) every head reads only its ``ceil(budget / page)``
highest pages (a ratio budget applies to the tokens seen at that step), the scores summed over
the GQA group's query heads (one selection per key/value head, so K/V are read once per group).
The page holding the newest token is always read. The prompt is processed densely, and the first
``skip_layers`` layers (2 in the paper) always read everything. The page bounds are recomputed from the keys at each read here (the reference's
speed comes from keeping them; the selection is the same).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxeff.kv.cache import LayerKV
from jaxeff.kv.policies.base import Policy, check_int
from jaxeff.kv.select import descending_rank


def page_scores(q_BxHxD, k_BxKxCxD, valid_BxKxC, page: int):
    """[B, K, P]: Quest's bound per page, summed over each group's query heads; pages with no
    valid slot get -inf."""
    b, kh, c, d = k_BxKxCxD.shape
    n_pages = -(-c // page)
    pad = n_pages * page - c
    k = jnp.pad(k_BxKxCxD.astype(jnp.float32), ((0, 0), (0, 0), (0, pad), (0, 0)))
    valid = jnp.pad(valid_BxKxC, ((0, 0), (0, 0), (0, pad)))
    kp = k.reshape(b, kh, n_pages, page, d)
    vp = valid.reshape(b, kh, n_pages, page)[..., None]
    hi = jnp.where(vp, kp, -jnp.inf).max(3)
    lo = jnp.where(vp, kp, jnp.inf).min(3)
    any_valid = vp[..., 0].any(-1)
    hi = jnp.where(any_valid[..., None], hi, 0.0)
    lo = jnp.where(any_valid[..., None], lo, 0.0)
    q = q_BxHxD.reshape(b, kh, -1, d).astype(jnp.float32)  # [B, K, G, D]
    s = jnp.maximum(q[:, :, :, None, :] * hi[:, :, None], q[:, :, :, None, :] * lo[:, :, None]).sum(-1).sum(2)
    return jnp.where(any_valid, s, -jnp.inf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuestLayerKV(LayerKV):
    """A layer that reads, at each single-query step, only the pages Quest selects."""

    budget: jax.Array | None = None  # [B] slots per head to read
    ratio: jax.Array | None = None  # [B] or, where >= 0, that fraction of the tokens seen (at read time)
    page: int = dataclasses.field(default=16, metadata=dict(static=True))

    def read_budget(self, q_position_B):
        """Slots per head this step reads: the ratio of the tokens seen by the query, or the count."""
        if self.ratio is None:
            return self.budget
        by_ratio = jnp.maximum(jnp.floor(self.ratio * (q_position_B + 1).astype(jnp.float32)), 1).astype(jnp.int32)
        return jnp.where(self.ratio >= 0, by_ratio, self.budget)

    def select(self, q_BxTxHxD, k_BxCxKxD, mask):
        if q_BxTxHxD.shape[1] != 1:
            return mask  # the prompt (several queries per row) reads densely
        c = self.capacity
        valid = self.valid & (self.positions <= mask.q_positions[:, :1, None])
        scores = page_scores(q_BxTxHxD[:, 0], jnp.swapaxes(k_BxCxKxD, 1, 2), valid, self.page)
        newest = jnp.maximum(self.counts - 1, 0) // self.page  # [B, K]
        n_pages = scores.shape[-1]
        scores = jnp.where(jnp.arange(n_pages)[None, None, :] == newest[..., None], jnp.inf, scores)
        want = -(-self.read_budget(mask.q_positions[:, 0]) // self.page)
        keep_page = descending_rank(scores) < want[:, None, None]
        keep = jnp.repeat(keep_page, self.page, axis=-1)[..., :c]
        return dataclasses.replace(mask, kv_valid=keep)


@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    name: ClassVar[str] = "quest"
    kind: ClassVar[str] = "select"
    page: int = 16
    skip_layers: int = 2

    def __post_init__(self):
        check_int(self.name, "page", self.page, 1)
        check_int(self.name, "skip_layers", self.skip_layers)

    def max_kept(self, budget: int, length: int, n_layers: int) -> int:
        return length  # nothing is evicted

    def prepare(self, cache, model):
        b, cap = cache.batch, cache.capacity
        layers = tuple(
            layer if i < self.skip_layers else
            QuestLayerKV(k=layer.k, v=layer.v, positions=layer.positions, counts=layer.counts,
                         read_impl=layer.read_impl, budget=jnp.full((b,), cap, jnp.int32),
                         ratio=jnp.full((b,), -1.0, jnp.float32), page=self.page)
            for i, layer in enumerate(cache.layers))
        return dataclasses.replace(cache, layers=layers)

    def __call__(self, cache, state, obs):
        budgets = self.layer_budgets(cache, state, obs)
        layers = []
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, QuestLayerKV):
                ratio = jnp.full(cache.lengths.shape, -1.0, jnp.float32)
                if obs.ratio is not None:  # the schedule's share of this layer, applied to the tokens seen then
                    ratio = obs.ratio * budgets[i].astype(jnp.float32) / jnp.maximum(obs.budget, 1).astype(jnp.float32)
                layer = dataclasses.replace(layer, budget=budgets[i], ratio=ratio)
            layers.append(layer)
        return dataclasses.replace(cache, layers=tuple(layers)), state

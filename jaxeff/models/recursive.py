"""Recursive transformers and Mixture-of-Recursions (MoR).

Recursive transformer (Bae et al., 2024, arXiv 2410.20672): the L unrolled layers reuse a stack
of U = L' / N_r shared blocks N_r times (L' = L, or L - 2 for the ``middle_*`` strategies, whose
first and last layers stay unique). ``cycle``: layer l uses block l mod U; ``sequence``: block
l // N_r. Optional per-recursion LoRA relaxes the sharing (:mod:`jaxeff.nn.lora`).

MoR (Bae et al., 2025, arXiv 2507.10524): a router decides per token how many passes over the
shared stack it makes. Three forward paths compute it:

* ``mode='topk'`` (training with expert-choice): each step gathers its k_r selected tokens, runs
  the shared stack on them alone (RoPE at their original positions, causal attention among
  them), and scatters ``h + g * block(h)`` back, so compute really shrinks with the capacities.
* ``mode='threshold'`` (causal inference): a token continues while its gate passes the threshold;
  computed densely with position masks. Token-choice trains this way too (its loads vary).
* :meth:`RecursiveTransformer.extend` (decoding with a :class:`RecursiveCache`): the threshold
  rule with per-recursion compacted caches; prefill + decode equals ``mode='threshold'``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig, RecursionConfig
from jaxeff.kv.recursive_cache import RecursiveCache
from jaxeff.models.decoder import LMEnds
from jaxeff.models.transformer import model_mask, token_positions
from jaxeff.nn import Block, cache_attend, merge_layer_aux, position_impl, self_attend
from jaxeff.nn.lora import BlockLoRA
from jaxeff.nn.routers import ExpertChoiceRouter, TokenChoiceRouter, expert_step_aux
from jaxeff.ops import AttentionMask, attention, routing
from jaxeff.parallel import constrain

MODES = ("topk", "threshold")


def shared_depth(strategy: str, n_layers: int) -> int:
    return n_layers - 2 if strategy.startswith("middle_") else n_layers


def sharing_map(strategy: str, n_layers: int, n_recursions: int) -> tuple[tuple[int, int], ...]:
    """(shared block j, recursion r) of each shared unrolled layer, in execution order."""
    depth = shared_depth(strategy, n_layers)
    u = depth // n_recursions
    if strategy.endswith("cycle"):
        return tuple((i % u, i // u) for i in range(depth))
    if strategy.endswith("sequence"):
        return tuple((i // n_recursions, i % n_recursions) for i in range(depth))
    raise ValueError(f"sharing_map: strategy must be a sharing strategy, got {strategy!r}")


def shared_block_layers(strategy: str, n_layers: int, n_recursions: int) -> list[int]:
    """The unrolled layer each shared block first serves: the index its per-layer settings (its
    FFN kind, say) are read at."""
    offset = 1 if strategy.startswith("middle_") else 0
    first: dict[int, int] = {}
    for i, (j, _) in enumerate(sharing_map(strategy, n_layers, n_recursions)):
        first.setdefault(j, offset + i)
    return [first[j] for j in sorted(first)]


def layer_sources(strategy: str, n_layers: int, n_recursions: int) -> list[str]:
    """Which parameters each of the L unrolled layers uses: 'first', 'shared[j]' or 'last'."""
    middle = [f"shared[{j}]" for j, _ in sharing_map(strategy, n_layers, n_recursions)]
    return ["first", *middle, "last"] if strategy.startswith("middle_") else middle


def gated_delta(gate_BxN: jax.Array, y_BxNxD: jax.Array, dtype) -> jax.Array:
    """g * f(h), the part of MoR's residual update h + g * f(h) (Bae et al., 2025, eq. 2) that a
    step adds to the tokens it selects."""
    return (gate_BxN[..., None] * y_BxNxD.astype(jnp.float32)).astype(dtype)


def _fits(decide_BxT: jax.Array, layer) -> jax.Array:
    """The deciding tokens that still find a free slot in ``layer``, in token order (MoR's
    decode-time overflow rule for caches allocated by capacity)."""
    rank_BxT = jnp.cumsum(decide_BxT.astype(jnp.int32), axis=1) - 1
    free_B = layer.capacity - layer.counts[:, 0]
    return decide_BxT & (rank_BxT < free_B[:, None])


class SharedKV:
    """The keys/values each recursion step attends to, over the training forward paths.

    Recursion-wise (no sharing), step r attends to its own fresh keys. Under recursive KV sharing
    (Bae et al., 2025, section 2.2.2) steps r > 0 reuse the first step's keys and values of the
    same shared block; with ``update`` the tokens step r selects first overwrite their own entries
    there (the official code's ``update_cache``), at ``overwrite_idx`` [B, N]: each token's index
    in the first step's key list (out of range: left alone)."""

    def __init__(self, share: bool, update: bool):
        self.share, self.update = share, update
        self.first: dict[int, tuple] = {}

    def keys(self, j: int, r: int, k, v, meta, overwrite_idx_BxN=None):
        """(k, v, meta) that step r of block j attends to; ``meta`` is the mask information of
        the keys (positions, validity, segment ids), kept with the first step's keys."""
        if r == 0 or not self.share:
            if r == 0:
                self.first[j] = (k, v, meta)
            return k, v, meta
        k0, v0, meta0 = self.first[j]
        if self.update:
            rows_Bx1 = jnp.arange(k0.shape[0])[:, None]
            k0 = k0.at[rows_Bx1, overwrite_idx_BxN].set(k, mode="drop")
            v0 = v0.at[rows_Bx1, overwrite_idx_BxN].set(v, mode="drop")
            self.first[j] = (k0, v0, meta0)
        return k0, v0, meta0


class RecursiveTransformer(LMEnds, nnx.Module):
    """Same contract as :class:`jaxeff.Transformer`: ``model(tokens) -> (logits, aux)``, and the
    :class:`~jaxeff.models.decoder.Decoder` protocol with a :class:`RecursiveCache`."""

    def __init__(self, cfg: ModelConfig, rcfg: RecursionConfig, *, rngs: nnx.Rngs):
        if not rcfg.enabled:
            raise ValueError("RecursiveTransformer: recursion.strategy is 'none'; use jaxeff.Transformer")
        rcfg.check_depth(cfg.n_layers)
        self.cfg, self.rcfg = cfg, rcfg
        middle = rcfg.strategy.startswith("middle_")
        self.n_shared = shared_depth(rcfg.strategy, cfg.n_layers) // rcfg.n_recursions
        self.layer_map = sharing_map(rcfg.strategy, cfg.n_layers, rcfg.n_recursions)
        self.capacities = rcfg.resolved_capacities
        self._make_embedding(cfg, rngs)
        block_layers = shared_block_layers(rcfg.strategy, cfg.n_layers, rcfg.n_recursions)
        self.first = Block(cfg, 0, rngs=rngs) if middle else None
        self.shared = nnx.List([Block(cfg, layer, rngs=rngs) for layer in block_layers])
        self.last = Block(cfg, cfg.n_layers - 1, rngs=rngs) if middle else None
        self.lora = (nnx.List([BlockLoRA(self.shared[j].lora_targets(), rcfg.n_recursions, rcfg.lora_rank,
                                         param_dtype=cfg.param_dtype, rngs=rngs)
                               for j in range(self.n_shared)]) if rcfg.lora_rank else None)
        self.router = {"none": lambda: None, "expert": lambda: ExpertChoiceRouter(cfg, rcfg, rngs=rngs),
                       "token": lambda: TokenChoiceRouter(cfg, rcfg, rngs=rngs)}[rcfg.routing]()
        self._make_head(cfg, rngs)

    # ----------------------------------------------------------------------------------- pieces
    def _lora(self, j: int, r: int):
        return None if self.lora is None else self.lora[j].deltas(r)

    def _share(self, r: int) -> bool:
        """Whether step r reads the first recursion's keys/values instead of its own."""
        return self.rcfg.kv_strategy == "share" and r > 0

    def _shared_kv(self) -> SharedKV:
        return SharedKV(self.rcfg.kv_strategy == "share", self.rcfg.kv_share_update)

    def _combine(self, h_BxTxD, y_BxTxD, decide_BxT, gate_BxT):
        """Recursion without routing replaces h; MoR's step keeps h + g * f(h) where it decides."""
        if self.rcfg.routing == "none":
            return y_BxTxD
        return jnp.where(decide_BxT[..., None], h_BxTxD + gated_delta(gate_BxT, y_BxTxD, h_BxTxD.dtype), h_BxTxD)

    def _unique(self, block, h, positions_BxT, mask, auxes):
        h, _, aux = block(h, positions_BxT, self_attend(mask, block.attn.impl))
        auxes.append(aux)
        return h

    def _position_mask(self, q_pos, kv_pos, **kw) -> AttentionMask:
        return AttentionMask.by_position(q_pos, kv_pos, pattern=self.cfg.mask, **kw)

    # ---------------------------------------------------------------------------------- forward
    def __call__(self, tokens_BxT: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, mode: str = "topk") -> tuple[jax.Array, dict]:
        if mode not in MODES:
            raise ValueError(f"RecursiveTransformer: mode must be one of {MODES}, got {mode!r}")
        positions_BxT = token_positions(tokens_BxT, positions)
        valid_BxT = jnp.ones(tokens_BxT.shape, bool) if segment_ids is None else segment_ids != 0
        h = constrain(self.embed(tokens_BxT), ("batch", "seq", "act_embed"))
        layer_auxes: list[dict] = []
        mask = model_mask(self.cfg, tokens_BxT.shape, segment_ids)  # every token, in order: index masks
        if self.first is not None:
            h = self._unique(self.first, h, positions_BxT, mask, layer_auxes)
        if self.rcfg.routing == "none":
            h, aux = self._forward_plain(h, positions_BxT, mask, layer_auxes), {}
        elif self.rcfg.routing == "expert" and mode == "topk":
            h, aux = self._forward_compact(h, positions_BxT, segment_ids, valid_BxT, layer_auxes)
        else:
            h, aux = self._forward_masked(h, positions_BxT, segment_ids, valid_BxT, self._decider(mode), layer_auxes)
            if mode != "threshold":  # training metrics stay scalars (a [B, T] array is not one)
                aux.pop("depth", None)
        if self.last is not None:
            h = self._unique(self.last, h, positions_BxT, mask, layer_auxes)
        return self.logits(h), {**merge_layer_aux(layer_auxes), **aux}

    def _forward_plain(self, h, positions_BxT, mask, layer_auxes):
        """Every token through every recursion: the recursive transformer without routing."""
        kv = self._shared_kv()
        every_BxT = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])  # updating every token
        for j, r in self.layer_map:
            def attend(q, k, v, j=j, r=r):
                k, v, _ = kv.keys(j, r, k, v, None, every_BxT)
                return attention(q, k, v, mask=mask, impl=self.cfg.attention_impl), None
            h, _, a = self.shared[j](h, positions_BxT, attend, lora=self._lora(j, r))
            layer_auxes.append(a)
        return h

    def _run_stack(self, x, r, positions, attend_for, layer_auxes):
        for j in range(self.n_shared):
            x, _, a = self.shared[j](x, positions, attend_for(j), lora=self._lora(j, r))
            layer_auxes.append(a)
        return x

    def _forward_compact(self, h_BxTxD, positions_BxT, segment_ids, valid_BxT, layer_auxes):
        """Expert-choice training (Bae et al., 2025, section 2.2.1): step r's router scores the
        n candidates the previous step kept, the top k_r = max(1, int(c_r T)) go on (hierarchical
        filtering, indices sorted to keep causal order), the shared stack runs on those K gathered
        tokens alone (RoPE at their positions), and h + g * f(h) is scattered back."""
        b, t = valid_BxT.shape
        aux: dict = {}
        cand_BxN = None  # [B, n] original positions of the candidates (None: all T)
        kv = self._shared_kv()
        loc_BxK = None  # [B, k_r] where each selected token sits among the first step's tokens
        for r, cap in enumerate(self.capacities):
            k = routing.tokens_for_capacity(cap, t)
            x_BxNxD = h_BxTxD if cand_BxN is None else routing.gather_rows(h_BxTxD, cand_BxN)
            valid_BxN = valid_BxT if cand_BxN is None else routing.gather_rows(valid_BxT, cand_BxN)
            n = x_BxNxD.shape[1]
            logit_BxN, decide_logit_BxN = self.router.logits(r, x_BxNxD)
            gate_BxN = self.router.gate(logit_BxN)
            if k >= n:  # every candidate goes on
                local_BxK = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
                selected_BxN = jnp.ones((b, n), bool)
            else:
                local_BxK, selected_BxN = routing.expert_choice_topk(jnp.where(valid_BxN, logit_BxN, -1e30), k)
            if cap < 1.0:  # the threshold rule decides at this step at inference: train it here
                aux.update(expert_step_aux(r, logit_BxN, decide_logit_BxN, selected_BxN, valid_BxN, self.rcfg))
            # index of each selected_BxN token in the first step's key list (its rank among them)
            loc_BxK = (jnp.broadcast_to(jnp.arange(local_BxK.shape[1], dtype=jnp.int32), local_BxK.shape) if loc_BxK is None
                   else routing.gather_rows(loc_BxK, local_BxK))
            if cand_BxN is None and k >= n:  # every token goes on: no gather or scatter needed
                idx_BxK, x_BxKxD, pos_BxK, seg_BxK, valid_BxK = None, h_BxTxD, positions_BxT, segment_ids, valid_BxT
            else:
                idx_BxK = local_BxK if cand_BxN is None else routing.gather_rows(cand_BxN, local_BxK)
                x_BxKxD, pos_BxK = routing.gather_rows(h_BxTxD, idx_BxK), routing.gather_rows(positions_BxT, idx_BxK)
                seg_BxK = None if segment_ids is None else routing.gather_rows(segment_ids, idx_BxK)
                valid_BxK = routing.gather_rows(valid_BxT, idx_BxK)
            aux[f"mor/selected_frac_r{r + 1}"] = valid_BxK.sum() / jnp.maximum(valid_BxT.sum(), 1)

            def attend_for(j, r=r, pos_BxK=pos_BxK, seg_BxK=seg_BxK, loc_BxK=loc_BxK):
                def attend(q, k_, v_):
                    k0, v0, (pos0_BxS, seg0_BxS) = kv.keys(j, r, k_, v_, (pos_BxK, seg_BxK), loc_BxK)
                    impl = position_impl(self.cfg.attention_impl)
                    if self._share(r):  # this step's queries against the first step's keys
                        mask = self._position_mask(pos_BxK, pos0_BxS, q_segment_ids_BxT=seg_BxK, kv_segment_ids_BxS=seg0_BxS)
                    elif self.cfg.mask in ("causal", "document"):  # gathered tokens keep causal order
                        mask = AttentionMask.training(seg_BxK)
                    else:  # a window or chunks go by the tokens' positions, not their gathered index
                        mask = self._position_mask(pos_BxK, pos_BxK, q_segment_ids_BxT=seg_BxK, kv_segment_ids_BxS=seg_BxK)
                    return attention(q, k0, v0, mask=mask, impl=impl), None
                return attend

            y_BxKxD = self._run_stack(x_BxKxD, r, pos_BxK, attend_for, layer_auxes)
            # padding that fills a short row's top-k slots is computed but left unchanged
            if idx_BxK is None:
                h_BxTxD = h_BxTxD + gated_delta(jnp.where(valid_BxK, gate_BxN, 0.0), y_BxKxD, h_BxTxD.dtype)
            else:
                gate_BxK = jnp.where(valid_BxK, routing.gather_rows(gate_BxN, local_BxK), 0.0)
                h_BxTxD = routing.scatter_add_rows(h_BxTxD, idx_BxK, gated_delta(gate_BxK, y_BxKxD, h_BxTxD.dtype))
            cand_BxN = idx_BxK
        last_BxT = (jnp.ones((b, t), bool) if cand_BxN is None
                else jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], cand_BxN].set(True))
        aux["mor/dead_token_ratio"] = routing.dead_token_ratio(last_BxT, valid_BxT)
        return h_BxTxD, aux

    def _decider(self, mode: str):
        """``decide(r, h, active) -> (decide [B,T], gate [B,T], aux)`` for the masked/cached paths."""
        rc = self.rcfg
        if rc.routing == "token":
            state = {}

            def decide(r, h, active):
                if r == 0:
                    state["depth"], state["gate"], aux = self.router.route(h, active)
                else:
                    aux = {}
                return active & (state["depth"] >= r + 1), state["gate"], aux
            return decide

        if rc.routing == "none":
            return lambda r, h, active: (active, jnp.ones(active.shape, jnp.float32), {})

        if rc.router_func == "softmax" and mode == "threshold":
            raise ValueError("recursion.router_func='softmax' gates each token against the whole sequence, so it "
                             "has no causal inference rule; train with 'sigmoid' or 'tanh' to decode")

        def decide(r, h, active):
            logit, decide_logit = self.router.logits(r, h)
            gate = self.router.gate(logit)
            t = h.shape[1]
            cap = self.capacities[r]
            if cap >= 1.0:
                return active, gate, {}
            if mode == "threshold":
                return active & routing.threshold_decision(decide_logit, rc.router_func), gate, {}
            # top-k among the active tokens: the oracle the compacted path is tested against
            k = routing.tokens_for_capacity(cap, t)
            _, selected = routing.expert_choice_topk(jnp.where(active, logit, -1e30), k)
            return active & selected, gate, {}
        return decide

    def _forward_masked(self, h, positions_BxT, segment_ids, valid_BxT, decide_fn, layer_auxes):
        """Dense compute, position masks: the tokens a step does not select are computed and dropped."""
        aux: dict = {}
        active = valid_BxT
        depth_BxT = jnp.zeros(valid_BxT.shape, jnp.int32)
        kv = self._shared_kv()
        token_idx_BxT = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
        for r in range(self.rcfg.n_recursions):
            decide, gate, a = decide_fn(r, h, active)
            aux.update(a)
            aux[f"mor/selected_frac_r{r + 1}"] = decide.sum() / jnp.maximum(valid_BxT.sum(), 1)
            depth_BxT = depth_BxT + decide.astype(jnp.int32)
            overwrite_BxT = jnp.where(decide, token_idx_BxT, h.shape[1])  # the selected tokens' own entries

            def attend_for(j, r=r, decide=decide, overwrite_BxT=overwrite_BxT):
                def attend(q, k, v):
                    k, v, kv_valid = kv.keys(j, r, k, v, decide, overwrite_BxT)
                    mask = self._position_mask(positions_BxT, positions_BxT, kv_valid=kv_valid,
                                               q_segment_ids_BxT=segment_ids, kv_segment_ids_BxS=segment_ids)
                    return attention(q, k, v, mask=mask, impl=position_impl(self.cfg.attention_impl)), None
                return attend

            x = self._run_stack(h, r, positions_BxT, attend_for, layer_auxes)
            h = self._combine(h, x, decide, gate)
            active = decide
        if self.rcfg.routing != "none":
            aux["mor/dead_token_ratio"] = routing.dead_token_ratio(active, valid_BxT)
            aux["depth"] = depth_BxT  # recursion steps each token ran, [B, T] (mode='threshold' only)
        return h, aux

    # ----------------------------------------------------------------------------------- decode
    def stored_capacities(self, capacity: int) -> tuple[int, ...]:
        """Slots of each stored recursion's cache for a ``capacity``-token context: all of them
        with ``kv_slack=0``, else ceil(c_r * capacity * kv_slack) (at most ``capacity``), c_r the
        step's capacity (expert-choice) or its balanced load (token-choice)."""
        rc = self.rcfg
        n_stored = rc.n_recursions if rc.kv_strategy == "recursion" else 1
        if not rc.kv_slack or rc.routing == "none":
            return (capacity,) * n_stored
        fracs = (self.capacities if rc.routing == "expert"
                 else tuple((rc.n_recursions - r) / rc.n_recursions for r in range(rc.n_recursions)))
        return tuple(min(capacity, math.ceil(fracs[s] * capacity * rc.kv_slack)) for s in range(n_stored))

    def init_cache(self, batch: int, capacity: int, dtype=None) -> RecursiveCache:
        cfg = self.cfg
        return RecursiveCache.empty(n_unique=2 if self.first is not None else 0,
                                    stored_capacities=self.stored_capacities(capacity), n_shared=self.n_shared,
                                    batch=batch, capacity=capacity, n_kv_heads=cfg.n_kv_heads,
                                    head_dim=cfg.resolved_head_dim, dtype=jnp.dtype(dtype or cfg.dtype))

    def extend(self, tokens_BxT: jax.Array, cache: RecursiveCache, *, valid_lengths: jax.Array | None = None,
               stats_rows: int = 0) -> tuple[jax.Array, RecursiveCache, dict]:
        """Appends T tokens per row (prefill or decode) under the causal threshold rule. A step
        appends the tokens it selects to its stored recursion's layers; under KV sharing with
        updates they overwrite their first-step slots instead. (``stats_rows``: not yet
        reported for recursive models; the stats are empty.)"""
        b, t = tokens_BxT.shape
        added = jnp.full((b,), t, jnp.int32) if valid_lengths is None else valid_lengths.astype(jnp.int32)
        positions_BxT = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        valid_BxT = jnp.arange(t)[None, :] < added[:, None]
        impl, pattern = self.cfg.attention_impl, self.cfg.mask
        h = self.embed(tokens_BxT)
        unique = list(cache.unique)
        if self.first is not None:
            h, (unique[0], _), _ = self.first(h, positions_BxT, cache_attend(unique[0], positions_BxT, impl,
                                                                             keep_BxT=valid_BxT, pattern=pattern))
        shared = list(cache.shared)
        u = self.n_shared
        stored = lambda r: 0 if self.rcfg.kv_strategy == "share" else r
        first_slots: dict[int, jax.Array] = {}

        def attend_for(j, r, decide_BxT):
            def attend(q, k, v):
                i = stored(r) * u + j
                layer = shared[i]
                if not self._share(r):  # the step's tokens take the next free slots of its own layers
                    layer, slots = layer.append(k, v, positions_BxT, decide_BxT)
                    if r == 0:
                        first_slots[j] = slots
                elif self.rcfg.kv_share_update:  # they overwrite their own first-step entries
                    layer = layer.write(k, v, jnp.where(decide_BxT[:, None, :], first_slots[j], layer.capacity))
                shared[i] = layer
                k_all, v_all = layer.keys_values(q.dtype)
                return attention(q, k_all, v_all, mask=layer.mask(positions_BxT, pattern=pattern),
                                 impl=position_impl(impl)), None
            return attend

        if self.rcfg.routing == "none":  # every token through the unrolled layers, in their order
            for j, r in self.layer_map:
                h, _, _ = self.shared[j](h, positions_BxT, attend_for(j, r, valid_BxT), lora=self._lora(j, r))
        else:
            decide_fn, active = self._decider("threshold"), valid_BxT
            for r in range(self.rcfg.n_recursions):
                decide, gate, _ = decide_fn(r, h, active)
                if not self._share(r):  # a full cache: the tokens that do not fit stop at depth r
                    decide = _fits(decide, shared[stored(r) * u])
                x = h
                for j in range(u):
                    x, _, _ = self.shared[j](x, positions_BxT, attend_for(j, r, decide), lora=self._lora(j, r))
                h, active = self._combine(h, x, decide, gate), decide
        if self.last is not None:
            h, (unique[1], _), _ = self.last(h, positions_BxT, cache_attend(unique[1], positions_BxT, impl,
                                                                            keep_BxT=valid_BxT, pattern=pattern))
        new_cache = RecursiveCache(unique=tuple(unique), shared=tuple(shared), lengths=cache.lengths + added,
                                   n_stored=cache.n_stored)
        return self.logits(h), new_cache, {}

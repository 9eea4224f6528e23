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

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig, RecursionConfig
from jaxeff.kv.recursive_cache import RecursiveCache, compact_slots, write_slots
from jaxeff.models.mor import ExpertChoiceRouter, TokenChoiceRouter, expert_step_aux
from jaxeff.nn import Block, Embedding, LMHead, RMSNorm
from jaxeff.nn.lora import BlockLoRA
from jaxeff.ops import attention, attention_by_position, routing
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


def layer_sources(strategy: str, n_layers: int, n_recursions: int) -> list[str]:
    """Which parameters each of the L unrolled layers uses: 'first', 'shared[j]' or 'last'."""
    middle = [f"shared[{j}]" for j, _ in sharing_map(strategy, n_layers, n_recursions)]
    return ["first", *middle, "last"] if strategy.startswith("middle_") else middle


class RecursiveTransformer(nnx.Module):
    """Same contract as :class:`jaxeff.Transformer`: ``model(tokens) -> (logits, aux)`` and
    ``model.extend(tokens, cache) -> (logits, cache)``."""

    def __init__(self, cfg: ModelConfig, rcfg: RecursionConfig, *, rngs: nnx.Rngs):
        if not rcfg.enabled:
            raise ValueError("RecursiveTransformer: recursion.strategy is 'none'; use jaxeff.Transformer")
        rcfg.check_depth(cfg.n_layers)
        self.cfg, self.rcfg = cfg, rcfg
        middle = rcfg.strategy.startswith("middle_")
        self.n_shared = shared_depth(rcfg.strategy, cfg.n_layers) // rcfg.n_recursions
        self.layer_map = sharing_map(rcfg.strategy, cfg.n_layers, rcfg.n_recursions)
        self.capacities = rcfg.resolved_capacities
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs)
        self.first = Block(cfg, rngs=rngs) if middle else None
        self.shared = nnx.List([Block(cfg, rngs=rngs) for _ in range(self.n_shared)])
        self.last = Block(cfg, rngs=rngs) if middle else None
        self.lora = (nnx.List([BlockLoRA(cfg, rcfg.n_recursions, rcfg.lora_rank, rngs=rngs)
                               for _ in range(self.n_shared)]) if rcfg.lora_rank else None)
        self.router = {"none": lambda: None, "expert": lambda: ExpertChoiceRouter(cfg, rcfg, rngs=rngs),
                       "token": lambda: TokenChoiceRouter(cfg, rcfg, rngs=rngs)}[rcfg.routing]()
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LMHead(
            cfg.d_model, cfg.vocab_size, std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    # ----------------------------------------------------------------------------------- pieces
    def _lora(self, j: int, r: int):
        return None if self.lora is None else self.lora[j].deltas(r)

    def logits(self, x_BxTxD: jax.Array) -> jax.Array:
        x_BxTxD = self.final_norm(x_BxTxD)
        logits_BxTxV = self.embed.attend(x_BxTxD) if self.lm_head is None else self.lm_head(x_BxTxD)
        return constrain(logits_BxTxV, ("batch", "seq", "vocab"))

    def _share(self, r: int) -> bool:
        """Whether step r reads the first recursion's keys/values instead of its own."""
        return self.rcfg.kv_strategy == "share" and r > 0

    def _combine(self, h, x, decide_BxT, gate_BxT):
        if self.rcfg.routing == "none":
            return x
        # MoR: h + g * block(h) for the tokens that go on, h for the rest.
        upd = h + (gate_BxT[..., None] * x.astype(jnp.float32)).astype(h.dtype)
        return jnp.where(decide_BxT[..., None], upd, h)

    # ---------------------------------------------------------------------------------- forward
    def __call__(self, tokens_BxT: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, mode: str = "topk") -> tuple[jax.Array, dict]:
        if mode not in MODES:
            raise ValueError(f"RecursiveTransformer: mode must be one of {MODES}, got {mode!r}")
        b, t = tokens_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
        valid_BxT = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
        h = constrain(self.embed(tokens_BxT), ("batch", "seq", "act_embed"))
        if self.first is not None:
            h = self.first(h, positions_BxT, segment_ids_BxT=segment_ids)[0]
        if self.rcfg.routing == "none":
            h, aux = self._forward_plain(h, positions_BxT, segment_ids), {}
        elif self.rcfg.routing == "expert" and mode == "topk":
            h, aux = self._forward_compact(h, positions_BxT, segment_ids, valid_BxT)
        else:
            h, aux = self._forward_masked(h, positions_BxT, segment_ids, valid_BxT, self._decider(mode))
            if mode != "threshold":  # training metrics stay scalars (a [B, T] array is not one)
                aux.pop("depth", None)
        if self.last is not None:
            h = self.last(h, positions_BxT, segment_ids_BxT=segment_ids)[0]
        return self.logits(h), aux

    def _forward_plain(self, h, positions_BxT, segment_ids):
        """Every token through every recursion: the recursive transformer without routing."""
        first_kv = {}
        for j, r in self.layer_map:
            def attend(q, k, v, j=j, r=r):
                if self._share(r) and not self.rcfg.kv_share_update:  # (updating every token = not sharing)
                    k0, v0 = first_kv[j]
                    return attention(q, k0, v0, impl=self.cfg.attention_impl, segment_ids_BxT=segment_ids), None
                return attention(q, k, v, impl=self.cfg.attention_impl, segment_ids_BxT=segment_ids), (k, v)
            h, kv = self.shared[j].forward_with(h, positions_BxT, attend, lora=self._lora(j, r))
            if r == 0:
                first_kv[j] = kv
        return h

    def _run_stack(self, x, r, positions, attend_for):
        for j in range(self.n_shared):
            x, _ = self.shared[j].forward_with(x, positions, attend_for(j), lora=self._lora(j, r))
        return x

    def _forward_compact(self, h, positions_BxT, segment_ids, valid_BxT):
        """Expert-choice training: the shared stack runs only on each step's gathered top-k."""
        b, t = valid_BxT.shape
        aux: dict = {}
        cand_idx = None  # [B, n] original positions of the candidates (None: all T)
        first_kv = {}
        loc = None  # [B, k_r] where each selected token sits among the first step's tokens
        for r, cap in enumerate(self.capacities):
            k = routing.tokens_for_capacity(cap, t)
            x_c = h if cand_idx is None else routing.gather_rows(h, cand_idx)
            valid_c = valid_BxT if cand_idx is None else routing.gather_rows(valid_BxT, cand_idx)
            n = x_c.shape[1]
            logit, decide_logit = self.router.logits(r, x_c)
            gate_c = self.router.gate(logit)
            if k >= n:
                local = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            else:
                local, selected = routing.expert_choice_topk(jnp.where(valid_c, logit, -1e30), k)
                aux.update(expert_step_aux(r, logit, decide_logit, selected, valid_c, self.rcfg))
            loc = local if loc is None else routing.gather_rows(loc, local)
            if cand_idx is None and k >= n:  # every token goes on: no gather or scatter needed
                idx, x_s, pos_s, seg_s, valid_s = None, h, positions_BxT, segment_ids, valid_BxT
            else:
                idx = local if cand_idx is None else routing.gather_rows(cand_idx, local)
                x_s, pos_s = routing.gather_rows(h, idx), routing.gather_rows(positions_BxT, idx)
                seg_s = None if segment_ids is None else routing.gather_rows(segment_ids, idx)
                valid_s = routing.gather_rows(valid_BxT, idx)
            aux[f"mor/selected_frac_r{r + 1}"] = valid_s.sum() / jnp.maximum(valid_BxT.sum(), 1)

            def attend_for(j, r=r, pos_s=pos_s, seg_s=seg_s, loc=loc):
                def attend(q, k_, v_):
                    if self._share(r):
                        k0, v0, pos0, seg0 = first_kv[j]
                        if self.rcfg.kv_share_update:  # the selected tokens' entries take their fresh keys
                            rows = jnp.arange(q.shape[0])[:, None]
                            k0, v0 = k0.at[rows, loc].set(k_), v0.at[rows, loc].set(v_)
                            first_kv[j] = (k0, v0, pos0, seg0)
                        return attention_by_position(q, k0, v0, q_positions_BxT=pos_s, kv_positions_BxS=pos0,
                                                     q_segment_ids_BxT=seg_s, kv_segment_ids_BxS=seg0,
                                                     impl=self.cfg.attention_impl), None
                    if r == 0:
                        first_kv[j] = (k_, v_, pos_s, seg_s)
                    return attention(q, k_, v_, impl=self.cfg.attention_impl, segment_ids_BxT=seg_s), None
                return attend

            y = self._run_stack(x_s, r, pos_s, attend_for)
            if idx is None:
                h = h + (gate_c[..., None] * y.astype(jnp.float32)).astype(h.dtype)
            else:
                g_s = routing.gather_rows(gate_c, local)
                h = routing.scatter_add_rows(h, idx, (g_s[..., None] * y.astype(jnp.float32)).astype(h.dtype))
            cand_idx = idx
        last = (jnp.ones((b, t), bool) if cand_idx is None
                else jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], cand_idx].set(True))
        aux["mor/dead_token_ratio"] = routing.dead_token_ratio(last, valid_BxT)
        return h, aux

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

    def _forward_masked(self, h, positions_BxT, segment_ids, valid_BxT, decide_fn, *, attn_impl=None):
        """Dense compute, position masks: the tokens a step does not select are computed and dropped."""
        impl = attn_impl or self.cfg.attention_impl
        aux: dict = {}
        active = valid_BxT
        depth_BxT = jnp.zeros(valid_BxT.shape, jnp.int32)
        first_kv = {}
        for r in range(self.rcfg.n_recursions):
            decide, gate, a = decide_fn(r, h, active)
            aux.update(a)
            aux[f"mor/selected_frac_r{r + 1}"] = decide.sum() / jnp.maximum(valid_BxT.sum(), 1)
            depth_BxT = depth_BxT + decide.astype(jnp.int32)

            def attend_for(j, r=r, decide=decide):
                def attend(q, k, v):
                    if self._share(r):
                        k0, v0, d0 = first_kv[j]
                        if self.rcfg.kv_share_update:
                            sel = decide[:, :, None, None]
                            k0, v0 = jnp.where(sel, k, k0), jnp.where(sel, v, v0)
                            first_kv[j] = (k0, v0, d0)
                        k, v, kv_valid = k0, v0, d0
                    else:
                        kv_valid = decide
                        if r == 0:
                            first_kv[j] = (k, v, decide)
                    return attention_by_position(q, k, v, q_positions_BxT=positions_BxT,
                                                 kv_positions_BxS=positions_BxT, kv_valid_BxS=kv_valid,
                                                 q_segment_ids_BxT=segment_ids, kv_segment_ids_BxS=segment_ids,
                                                 impl=impl), None
                return attend

            x = self._run_stack(h, r, positions_BxT, attend_for)
            h = self._combine(h, x, decide, gate)
            active = decide
        if self.rcfg.routing != "none":
            aux["mor/dead_token_ratio"] = routing.dead_token_ratio(active, valid_BxT)
            aux["depth"] = depth_BxT  # recursion steps each token ran, [B, T] (mode='threshold' only)
        return h, aux

    # ----------------------------------------------------------------------------------- decode
    def init_cache(self, batch: int, capacity: int, dtype=None) -> RecursiveCache:
        cfg, rc = self.cfg, self.rcfg
        return RecursiveCache.empty(n_unique=2 if self.first is not None else 0,
                                    n_stored=rc.n_recursions if rc.kv_strategy == "recursion" else 1,
                                    n_shared=self.n_shared, batch=batch, capacity=capacity,
                                    n_kv_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim,
                                    dtype=jnp.dtype(dtype or cfg.dtype))

    def extend(self, tokens_BxT: jax.Array, cache: RecursiveCache, *, valid_lengths: jax.Array | None = None
               ) -> tuple[jax.Array, RecursiveCache]:
        """Appends T tokens per row (prefill or decode) under the causal threshold rule."""
        b, t = tokens_BxT.shape
        added = jnp.full((b,), t, jnp.int32) if valid_lengths is None else valid_lengths.astype(jnp.int32)
        positions_BxT = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        valid_BxT = jnp.arange(t)[None, :] < added[:, None]
        h = self.embed(tokens_BxT)
        unique_k, unique_v = list(cache.unique_k), list(cache.unique_v)
        if self.first is not None:
            h, (unique_k[0], unique_v[0]) = self.first(h, positions_BxT, kv=(unique_k[0], unique_v[0], cache.lengths))
        ks, vs, poss = list(cache.k), list(cache.v), list(cache.positions)
        counts, new_counts = cache.counts, cache.counts
        u, cap = self.n_shared, cache.capacity
        stored = lambda r: 0 if self.rcfg.kv_strategy == "share" else r

        def claim(s, decide):
            """Gives the deciding tokens their slots in stored recursion s's cache."""
            nonlocal new_counts
            slots = compact_slots(decide, counts[s], cap)
            poss[s] = write_slots(poss[s], positions_BxT, slots)
            new_counts = new_counts.at[s].add(decide.sum(1).astype(jnp.int32))
            return slots

        def attend_for(j, r, slots):
            def attend(q, k, v):
                i = stored(r) * u + j
                if not self._share(r) or self.rcfg.kv_share_update:
                    ks[i] = write_slots(ks[i], k, slots)
                    vs[i] = write_slots(vs[i], v, slots)
                kv_valid = jnp.arange(cap)[None, :] < new_counts[stored(r)][:, None]
                return attention_by_position(q, ks[i].astype(q.dtype), vs[i].astype(q.dtype),
                                             q_positions_BxT=positions_BxT, kv_positions_BxS=poss[stored(r)],
                                             kv_valid_BxS=kv_valid, impl="xla"), None
            return attend

        if self.rcfg.routing == "none":
            slots = [claim(s, valid_BxT) for s in range(cache.n_stored)]
            for j, r in self.layer_map:
                h, _ = self.shared[j].forward_with(h, positions_BxT, attend_for(j, r, slots[stored(r)]),
                                                   lora=self._lora(j, r))
        else:
            decide_fn, active = self._decider("threshold"), valid_BxT
            for r in range(self.rcfg.n_recursions):
                decide, gate, _ = decide_fn(r, h, active)
                if not self._share(r):
                    slots = first_slots = claim(stored(r), decide)
                else:  # with kv_share_update the tokens of this step rewrite their first-step slots
                    slots = jnp.where(decide, first_slots, cap)
                x = h
                for j in range(u):
                    x, _ = self.shared[j].forward_with(x, positions_BxT, attend_for(j, r, slots), lora=self._lora(j, r))
                h, active = self._combine(h, x, decide, gate), decide
        if self.last is not None:
            h, (unique_k[1], unique_v[1]) = self.last(h, positions_BxT, kv=(unique_k[1], unique_v[1], cache.lengths))
        new_cache = RecursiveCache(unique_k=tuple(unique_k), unique_v=tuple(unique_v), k=tuple(ks), v=tuple(vs),
                                   positions=tuple(poss), counts=new_counts, lengths=cache.lengths + added)
        return self.logits(h), new_cache


def flops_per_token(cfg: ModelConfig, rcfg: RecursionConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, PaLM convention as in
    :meth:`ModelConfig.flops_per_token`) counting the work each token really gets: a shared
    layer at step r runs on the fraction c_r of the tokens, its attention among c_r T keys
    (c_r^2 overall), or the first step's c_1 T keys under KV sharing, which also skips the key
    and value projections after the first step. Token-choice is counted at its balanced load
    (the same fractions as the default capacities)."""
    if not rcfg.enabled:
        return cfg.flops_per_token(seq_len)
    d, h, kh, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff
    qo, kv, mlp = 2 * d * h * hd, 2 * d * kh * hd, 3 * d * f
    attn = 12.0 * h * hd * seq_len
    n_unique = 2 if rcfg.strategy.startswith("middle_") else 0
    u = shared_depth(rcfg.strategy, cfg.n_layers) // rcfg.n_recursions
    fracs = (rcfg.resolved_capacities if rcfg.routing == "expert" else
             tuple((rcfg.n_recursions - r) / rcfg.n_recursions for r in range(rcfg.n_recursions))
             if rcfg.routing == "token" else (1.0,) * rcfg.n_recursions)
    total = n_unique * (6.0 * (qo + kv + mlp) + attn) + 6.0 * d * cfg.vocab_size
    for r, c in enumerate(fracs):
        shared_kv = rcfg.kv_strategy == "share" and r > 0
        keys = fracs[0] if shared_kv else c
        total += u * c * (6.0 * (qo + mlp + (0 if shared_kv else kv)) + attn * keys)
    if rcfg.routing == "expert":
        total += 6.0 * d * (1.0 + sum(fracs[:-1]))  # step r's router scores step r-1's survivors
    elif rcfg.routing == "token":
        total += 6.0 * d * rcfg.n_recursions
    return total

"""Continuous depth-wise batching for Mixture-of-Recursions decoding (Bae et al., 2025, arXiv
2507.10524, section 2.2 and its throughput appendix; the scheme of Relaxed Recursive Transformers,
Bae et al., 2024, arXiv 2410.20672, section 3.3).

Plain batched decoding (:func:`jaxeff.generate`) runs every token of the batch through every
recursion step: a batch waits for its deepest token, so MoR decodes no faster than the model it
unrolls to. Here the shared recursion stack always runs a full batch of tokens *at whatever depth
each one is*: a token that exits early frees its place at once, and the next token of that
sequence takes it.

Design. ``S`` slots, one sequence each; a sequence has one token in flight (the next token
depends on this one's logits), so the slots are also the shared stack's batch. A slot holds that
token's hidden state ``h``, its position and the recursion steps it has run (``depth``), and the
sequence's caches. One compiled step (:func:`_step`) does, for all slots at once:

1. *shared stack*: every slot whose token continues runs recursion step ``r = depth`` of the
   shared blocks, each slot at its own ``r``: the router gate of step ``r`` is picked per slot,
   and attention reads that sequence's recursion-``r`` cache (recursion-wise caching) or its
   first recursion's cache (KV sharing). Per-recursion LoRA cannot be picked per row of a
   matmul, so a model with LoRA runs the stack once per recursion, masked (correct, N_r times
   the cost); without LoRA the stack runs once.
2. *routing*: the causal threshold rule of :meth:`RecursiveTransformer.extend` decides, on the new
   ``h``, whether the token runs step ``r + 1`` (a full capacity-sized cache stops it, as there).
   A token that stops waits to exit.
3. *exit lanes*: up to ``lanes`` waiting tokens (rotating priority, so none starves) take the last
   unique layer, the final norm and head, and are sampled; the new token enters the same slot
   through the embedding and the first unique layer, at depth 0. A sequence that reaches its
   length (or ``eos_id``) frees its slot. The unique layers and the head run on ``lanes`` rows,
   not ``S``: with average depth d (in recursions) about ``S / d`` tokens exit per step.

Shapes are static (``S`` slots, a fixed cache capacity per slot, ``lanes`` exit rows), so the
step compiles once; :class:`DepthwiseDecoder` runs it in a ``lax.while_loop`` that returns to the
host only when a slot frees while requests wait. Admission prefills a prompt (padded to
``max_prompt_len``) with ``model.extend`` on a one-row cache and copies that cache into the slot:
its own compiled function.

Caches per slot: the unique layers are :class:`~jaxeff.kv.cache.LayerKV` rows; each shared block
is one ``LayerKV`` whose slot axis holds the stored recursions' caches side by side (segment
``s`` has ``model.stored_capacities(capacity)[s]`` slots, so ``recursion.kv_slack`` sizes them by
capacity as in :class:`~jaxeff.kv.recursive_cache.RecursiveCache`); step ``r`` writes at the next
free slot of its segment and reads a window of the largest segment's length over it, the other
segments' slots masked out.

Every sequence sees exactly the computation of ``jaxeff.generate`` run on it alone with the same
cache capacity (tested; equal up to float rounding of differently batched matmuls). Sampling
(``temperature`` > 0) draws each token with a key of (request, token index), so outputs do not
depend on the schedule either.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.generate import sample_logits
from jaxeff.kv.cache import LayerKV
from jaxeff.nn import cache_attend, position_impl
from jaxeff.ops import AttentionMask, attention, routing


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static shape of a scheduler: ``slots`` sequences in flight, ``capacity`` tokens per
    sequence, ``lanes`` exit rows per step, and the slots of each stored recursion's segment."""
    slots: int
    capacity: int
    lanes: int
    segments: tuple[int, ...]
    max_new: int

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(itertools.accumulate((0,) + self.segments[:-1]))

    @property
    def total(self) -> int:
        return sum(self.segments)

    @property
    def window(self) -> int:
        return max(self.segments)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    h_SxD: jax.Array  # hidden state of each slot's token in flight
    pos_S: jax.Array  # its position
    depth_S: jax.Array  # recursion steps it has run
    run_S: jax.Array  # bool: it runs step ``depth`` at the next step (else it waits to exit)
    live_S: jax.Array  # bool: the slot holds a sequence still generating
    first_slot_S: jax.Array  # its slot in the first recursion's segment (KV sharing with updates)
    route_depth_S: jax.Array  # token-choice: the depth its router chose
    route_gate_S: jax.Array  # token-choice: its gate
    unique: tuple[LayerKV, ...]  # the first and last layers' caches, one row per slot
    shared: tuple[LayerKV, ...]  # per shared block: the stored recursions' segments side by side
    filled_SxN: jax.Array  # tokens held in each stored recursion's segment
    out_SxM: jax.Array  # the tokens generated so far
    n_out_S: jax.Array
    limit_S: jax.Array  # tokens to generate
    seq_S: jax.Array  # the request in the slot (its sampling keys)
    stats: jax.Array  # [4]: steps, slot passes through the shared stack, exits, exits that waited a step
    clock: jax.Array  # steps so far (rotates the exit priority)


def _rows(layer: LayerKV, idx_M: jax.Array) -> LayerKV:
    return jax.tree.map(lambda a: a[idx_M], layer)


def _put_rows(layer: LayerKV, idx_M: jax.Array, rows: LayerKV) -> LayerKV:
    """Rows written back at ``idx`` (an index of ``slots`` or more: left alone)."""
    return jax.tree.map(lambda a, r: a.at[idx_M].set(r, mode="drop"), layer, rows)


def _unique_layer(block, layer: LayerKV, x_Mx1xD, pos_M, keep_M, lanes_M, all_rows: bool, cfg):
    """A unique (first or last) layer on the lanes' rows of its cache: gathered and written
    back, or, when the lanes are all the slots in order, in place."""
    rows = layer if all_rows else _rows(layer, lanes_M)
    x, (rows, _), _ = block(x_Mx1xD, pos_M[:, None], cache_attend(rows, pos_M[:, None], cfg.attention_impl,
                                                                  keep_BxT=keep_M[:, None], pattern=cfg.mask))
    return x, rows if all_rows else _put_rows(layer, jnp.where(keep_M, lanes_M, layer.k.shape[0]), rows)


def _pick(x_SxR: jax.Array, r_S: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_SxR, jnp.clip(r_S, 0, x_SxR.shape[1] - 1)[:, None], axis=1)[:, 0]


def _stored(model, r_S: jax.Array) -> jax.Array:
    """The stored recursion (cache segment) that step r reads."""
    return jnp.zeros_like(r_S) if model.rcfg.kv_strategy == "share" else r_S


def _router_logits(model, h_Sx1xD):
    """(gating, deciding) logits of every recursion step, ``[S, N_r]`` each."""
    pairs = [model.router.logits(r, h_Sx1xD) for r in range(model.rcfg.n_recursions)]
    return jnp.concatenate([g for g, _ in pairs], 1), jnp.concatenate([d for _, d in pairs], 1)


def _goes_on(model, layout: Layout, h_Sx1xD, r_S, route_depth_S, filled_SxN):
    """Whether each token runs recursion step ``r``: MoR's causal threshold rule (or the
    token-choice depth), and a full capacity-sized cache stops it (:func:`recursive._fits`)."""
    rc = model.rcfg
    ok_S = r_S < rc.n_recursions
    if rc.routing == "expert":
        _, decide_SxR = _router_logits(model, h_Sx1xD)
        always_S = jnp.asarray([c >= 1.0 for c in model.capacities])[jnp.clip(r_S, 0, rc.n_recursions - 1)]
        ok_S &= always_S | routing.threshold_decision(_pick(decide_SxR, r_S), rc.router_func)
    elif rc.routing == "token":
        ok_S &= route_depth_S >= r_S + 1
    stored_S = jnp.clip(_stored(model, r_S), 0, len(layout.segments) - 1)
    fits_S = _pick(filled_SxN, stored_S) < jnp.asarray(layout.segments)[stored_S]
    if rc.kv_strategy == "share":  # later steps write nothing (or overwrite their own entries)
        fits_S |= r_S > 0
    return ok_S & fits_S


def _gate(model, h_Sx1xD, r_S, route_gate_S):
    rc = model.rcfg
    if rc.routing == "expert":
        gate_SxR, _ = _router_logits(model, h_Sx1xD)
        return model.router.gate(_pick(gate_SxR, r_S))
    if rc.routing == "token":
        return route_gate_S
    return jnp.ones(r_S.shape, jnp.float32)


def _window(layer: LayerKV, layout: Layout, off_S, seg_S):
    """Keys, values ``[S, W, K, D]`` and positions ``[S, K, W]`` of each slot's segment (a
    window of the largest segment's length; slots outside the segment read as empty)."""
    s, k_heads = layer.positions.shape[:2]
    w = layout.window
    if w == layout.total:
        idx_SxW = jnp.broadcast_to(jnp.arange(w), (s, w))
        k, v, pos = layer.k, layer.v, layer.positions
    else:
        start_S = jnp.minimum(off_S, layout.total - w)
        idx_SxW = start_S[:, None] + jnp.arange(w)[None, :]
        idx_SxKxW = jnp.broadcast_to(idx_SxW[:, None, :], (s, k_heads, w))
        take = lambda a: jnp.take_along_axis(a, jnp.broadcast_to(idx_SxKxW[..., None], idx_SxKxW.shape + a.shape[3:]),
                                             axis=2)
        k, v = take(layer.k), take(layer.v)
        pos = jnp.take_along_axis(layer.positions, idx_SxKxW, axis=2)
    inside_SxW = (idx_SxW >= off_S[:, None]) & (idx_SxW < (off_S + seg_S)[:, None])
    pos = jnp.where(inside_SxW[:, None, :], pos, -1)
    return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), pos


def _shared_pass(model, layout: Layout, st: Slots):
    """Step 1 of the design: every running token through its own recursion step of the shared
    stack. Returns (new h [S, 1, D], shared caches, filled counts, first slots)."""
    rc, cfg = model.rcfg, model.cfg
    share = rc.kv_strategy == "share"
    h = st.h_SxD[:, None, :]
    pos_Sx1 = st.pos_S[:, None]
    r_S = st.depth_S
    stored_S = _stored(model, r_S)
    off_S = jnp.asarray(layout.offsets)[stored_S]
    seg_S = jnp.asarray(layout.segments)[stored_S]
    appends_S = st.run_S & (r_S == 0) if share else st.run_S
    fill_S = _pick(st.filled_SxN, stored_S)
    write_S = jnp.where(appends_S, off_S + fill_S, layout.total)
    if share and rc.kv_share_update:  # later steps overwrite the token's first-step entries
        write_S = jnp.where(st.run_S & (r_S > 0), st.first_slot_S, write_S)
    gate_S = _gate(model, h, r_S, st.route_gate_S)
    shared = list(st.shared)
    groups = [None] if model.lora is None else list(range(rc.n_recursions))
    y = h
    for g in groups:
        rows_S = st.run_S if g is None else st.run_S & (r_S == g)
        slot_S = jnp.where(rows_S, write_S, layout.total)
        x = h
        for j in range(model.n_shared):
            def attend(q, k, v, j=j, slot_S=slot_S):
                n_kv = shared[j].n_kv_heads
                layer = shared[j].write(k, v, jnp.broadcast_to(slot_S[:, None, None], (slot_S.shape[0], n_kv, 1)),
                                        pos_Sx1)
                shared[j] = layer
                k_all, v_all, kv_pos = _window(layer, layout, off_S, seg_S)
                mask = AttentionMask.by_position(pos_Sx1, kv_pos, pattern=cfg.mask)
                return attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask=mask,
                                 impl=position_impl(cfg.attention_impl)), None
            x, _, _ = model.shared[j](x, pos_Sx1, attend, lora=None if g is None else model._lora(j, g))
        y = x if g is None else jnp.where((r_S == g)[:, None, None], x, y)
    # (without routing, _combine replaces h: keep the waiting tokens' states)
    h = jnp.where(st.run_S[:, None, None], model._combine(h, y, st.run_S[:, None], gate_S[:, None]), h)
    rows = jnp.arange(r_S.shape[0])
    filled = st.filled_SxN.at[rows, stored_S].add(appends_S.astype(jnp.int32))
    first_slot = jnp.where(st.run_S & (r_S == 0), write_S, st.first_slot_S)
    return h, tuple(shared), filled, first_slot


def _enter(model, layout: Layout, st: Slots, lanes_M, enter_M, tok_M, pos_M, all_rows: bool) -> Slots:
    """The next token of each entering lane's sequence: embedding and first unique layer at
    ``pos``, then :func:`_place`."""
    x = model.embed(tok_M[:, None])
    unique = list(st.unique)
    if model.first is not None:
        x, unique[0] = _unique_layer(model.first, unique[0], x, pos_M, enter_M, lanes_M, all_rows, model.cfg)
    return _place(model, layout, dataclasses.replace(st, unique=tuple(unique)), lanes_M, enter_M, x, pos_M)


def _place(model, layout: Layout, st: Slots, lanes_M, enter_M, x_Mx1xD, pos_M) -> Slots:
    """Entering tokens (after the first unique layer) take their lanes' slots at depth 0, with
    the routing decision of step 0."""
    depth_M = jnp.zeros(pos_M.shape, jnp.int32)
    gate_M = jnp.ones(pos_M.shape, jnp.float32)
    if model.rcfg.routing == "token":
        d, g, _ = model.router.route(x_Mx1xD, enter_M[:, None])
        depth_M, gate_M = d[:, 0], g[:, 0]
    run_M = enter_M & _goes_on(model, layout, x_Mx1xD, jnp.zeros_like(depth_M), depth_M, st.filled_SxN[lanes_M])
    put_M = jnp.where(enter_M, lanes_M, layout.slots)
    put = lambda a, new: a.at[put_M].set(new.astype(a.dtype), mode="drop")
    return dataclasses.replace(
        st, h_SxD=put(st.h_SxD, x_Mx1xD[:, 0]), pos_S=put(st.pos_S, pos_M), depth_S=put(st.depth_S, 0 * depth_M),
        run_S=put(st.run_S, run_M), route_depth_S=put(st.route_depth_S, depth_M),
        route_gate_S=put(st.route_gate_S, gate_M))


def _sample(logits_MxV, key, seq_M, index_M, temperature, top_k):
    if temperature == 0.0:
        return jnp.argmax(logits_MxV, axis=-1).astype(jnp.int32)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(key, s), i))(seq_M, index_M)
    return jax.vmap(lambda lg, k: sample_logits(lg[None], k, temperature, top_k)[0])(logits_MxV, keys)


def _record(st: Slots, layout: Layout, lanes_M, ok_M, tok_M, eos_id):
    """Appends the sampled tokens; returns (state, the lanes whose sequence goes on)."""
    n_M = st.n_out_S[lanes_M]
    out = st.out_SxM.at[jnp.where(ok_M, lanes_M, layout.slots), n_M].set(tok_M, mode="drop")
    n_M = n_M + ok_M.astype(jnp.int32)
    done_M = ok_M & (n_M >= st.limit_S[lanes_M])
    if eos_id is not None:
        done_M |= ok_M & (tok_M == eos_id)
    put = jnp.where(ok_M, lanes_M, layout.slots)
    st = dataclasses.replace(st, out_SxM=out, n_out_S=st.n_out_S.at[put].set(n_M, mode="drop"),
                             live_S=st.live_S.at[jnp.where(done_M, lanes_M, layout.slots)].set(False, mode="drop"),
                             run_S=st.run_S.at[put].set(False, mode="drop"))
    return st, ok_M & ~done_M


def _step(model, layout: Layout, st: Slots, key, *, temperature, top_k, eos_id) -> Slots:
    """One depth-wise step over all slots (the module docstring's 1-3)."""
    cfg = model.cfg
    s, m = layout.slots, layout.lanes
    ran_S = st.run_S
    h, shared, filled, first_slot = _shared_pass(model, layout, st)
    depth_S = st.depth_S + st.run_S.astype(jnp.int32)
    goes_on_S = st.run_S & _goes_on(model, layout, h, depth_S, st.route_depth_S, filled)
    waiting_S = st.live_S & ~goes_on_S
    if m >= s:
        lanes_M = jnp.arange(s)
    else:  # the waiting tokens first, from a priority that rotates every step
        prio_S = (jnp.arange(s) - st.clock) % s
        lanes_M = jnp.argsort(jnp.where(waiting_S, prio_S, prio_S + s))[:m].astype(jnp.int32)
    ok_M = waiting_S[lanes_M]
    st = dataclasses.replace(st, h_SxD=h[:, 0], depth_S=depth_S, run_S=goes_on_S, shared=shared, filled_SxN=filled,
                             first_slot_S=first_slot)
    x = h[lanes_M]
    pos_M = st.pos_S[lanes_M]
    unique = list(st.unique)
    if model.last is not None:
        x, unique[-1] = _unique_layer(model.last, unique[-1], x, pos_M, ok_M, lanes_M, m >= s, cfg)
    st = dataclasses.replace(st, unique=tuple(unique))
    tok_M = _sample(model.logits(x)[:, 0], key, st.seq_S[lanes_M], st.n_out_S[lanes_M], temperature, top_k)
    st, enter_M = _record(st, layout, lanes_M, ok_M, tok_M, eos_id)
    st = _enter(model, layout, st, lanes_M, enter_M, tok_M, pos_M + 1, all_rows=m >= s)
    n_exit = ok_M.sum(dtype=jnp.int32)
    stats = st.stats + jnp.stack([jnp.int32(1), ran_S.sum(dtype=jnp.int32), n_exit,
                                  waiting_S.sum(dtype=jnp.int32) - n_exit])
    return dataclasses.replace(st, stats=stats, clock=st.clock + 1)


def _empty(model, layout: Layout) -> Slots:
    cfg = model.cfg
    s, dtype = layout.slots, jnp.dtype(cfg.dtype)
    kv = lambda c: LayerKV.empty(s, cfg.n_kv_heads, c, cfg.resolved_head_dim, dtype)
    z, f = jnp.zeros((s,), jnp.int32), jnp.zeros((s,), bool)
    return Slots(h_SxD=jnp.zeros((s, cfg.d_model), dtype), pos_S=z, depth_S=z, run_S=f, live_S=f, first_slot_S=z,
                 route_depth_S=z, route_gate_S=jnp.zeros((s,), jnp.float32),
                 unique=tuple(kv(layout.capacity) for _ in range(2 if model.first is not None else 0)),
                 shared=tuple(kv(layout.total) for _ in range(model.n_shared)),
                 filled_SxN=jnp.zeros((s, len(layout.segments)), jnp.int32),
                 out_SxM=jnp.zeros((s, layout.max_new), jnp.int32), n_out_S=z, limit_S=z, seq_S=z - 1,
                 stats=jnp.zeros((4,), jnp.int32), clock=jnp.int32(0))


def _admit(model, layout: Layout, st: Slots, slot, prompt_P, length, limit, seq, key, *, temperature, top_k,
           eos_id) -> Slots:
    """Prefills one prompt on a one-row cache, copies the cache into ``slot``, samples the first
    token and lets the next one enter (as :func:`jaxeff.generate` does for a batch)."""
    cache = model.init_cache(1, layout.capacity)
    logits_1xPxV, cache, _ = model.extend(prompt_P[None], cache, valid_lengths=length[None])
    last_1xV = jax.lax.dynamic_index_in_dim(logits_1xPxV[0], length - 1, axis=0)
    tok_1 = _sample(last_1xV, key, seq[None], jnp.zeros((1,), jnp.int32), temperature, top_k)
    st = dataclasses.replace(
        st, out_SxM=st.out_SxM.at[slot].set(0), n_out_S=st.n_out_S.at[slot].set(0),
        limit_S=st.limit_S.at[slot].set(limit), seq_S=st.seq_S.at[slot].set(seq), live_S=st.live_S.at[slot].set(True),
        run_S=st.run_S.at[slot].set(False), first_slot_S=st.first_slot_S.at[slot].set(0))
    lanes_1 = slot[None].astype(jnp.int32)
    st, enter_1 = _record(st, layout, lanes_1, jnp.ones((1,), bool), tok_1, eos_id)
    # the next token's first layer runs on the one-row cache, before it is copied in
    x = model.embed(tok_1[:, None])
    if model.first is not None:
        x, (u0, _), _ = model.first(x, length[None, None], cache_attend(
            cache.unique[0], length[None, None], model.cfg.attention_impl, keep_BxT=enter_1[:, None],
            pattern=model.cfg.mask))
        cache = dataclasses.replace(cache, unique=(u0,) + cache.unique[1:])
    row = lambda a, r: a.at[slot].set(r[0].astype(a.dtype))
    unique = tuple(jax.tree.map(row, big, small) for big, small in zip(st.unique, cache.unique))
    shared = []
    for j, big in enumerate(st.shared):
        for s_, (off, n) in enumerate(zip(layout.offsets, layout.segments)):
            small = cache.layer(s_, j)
            big = dataclasses.replace(big, k=big.k.at[slot, :, off:off + n].set(small.k[0].astype(big.k.dtype)),
                                      v=big.v.at[slot, :, off:off + n].set(small.v[0].astype(big.v.dtype)),
                                      positions=big.positions.at[slot, :, off:off + n].set(small.positions[0]))
        shared.append(big)
    filled = jnp.stack([cache.layer(s_, 0).counts[0, 0] for s_ in range(len(layout.segments))])
    st = dataclasses.replace(st, unique=unique, shared=tuple(shared), filled_SxN=st.filled_SxN.at[slot].set(filled))
    return _place(model, layout, st, lanes_1, enter_1, x, length[None])


def _run(model, layout: Layout, st: Slots, key, max_steps, stop_on_free, *, temperature, top_k, eos_id) -> Slots:
    """Steps until no sequence is live, ``max_steps`` are done, or (``stop_on_free``: requests
    wait) a slot is free."""
    def cond(carry):
        st, i = carry
        return (i < max_steps) & jnp.any(st.live_S) & ~(stop_on_free & jnp.any(~st.live_S))

    def body(carry):
        st, i = carry
        return _step(model, layout, st, key, temperature=temperature, top_k=top_k, eos_id=eos_id), i + 1

    return jax.lax.while_loop(cond, body, (st, jnp.int32(0)))[0]


_STATIC = ("graphdef", "layout", "temperature", "top_k", "eos_id")


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"))
def _empty_jit(graphdef, params, *, layout):
    return _empty(nnx.merge(graphdef, params), layout)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("st",))
def _admit_jit(graphdef, params, st, slot, prompt_P, length, limit, seq, key, *, layout, temperature, top_k, eos_id):
    return _admit(nnx.merge(graphdef, params), layout, st, slot, prompt_P, length, limit, seq, key,
                  temperature=temperature, top_k=top_k, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("st",))
def _run_jit(graphdef, params, st, key, max_steps, stop_on_free, *, layout, temperature, top_k, eos_id):
    return _run(nnx.merge(graphdef, params), layout, st, key, max_steps, stop_on_free, temperature=temperature,
                top_k=top_k, eos_id=eos_id)


class DepthwiseDecoder:
    """A queue of requests decoded with continuous depth-wise batching (module docstring).

    ``slots`` sequences in flight, prompts of at most ``max_prompt_len`` tokens, at most
    ``max_new_tokens`` tokens each, ``capacity`` cache slots per sequence (default: their sum,
    what :func:`jaxeff.generate` allocates for a prompt of ``max_prompt_len``), ``lanes`` exit
    rows per step (default ``slots``: no token ever waits; about ``slots / average depth`` spends
    less on the unique layers and the head). ``steps_per_call`` bounds one device loop."""

    def __init__(self, model, *, slots: int, max_prompt_len: int, max_new_tokens: int, capacity: int | None = None,
                 lanes: int | None = None, steps_per_call: int = 4096):
        if not hasattr(model, "rcfg") or not hasattr(model, "n_shared"):
            raise ValueError("DepthwiseDecoder: the model must be a jaxeff RecursiveTransformer (MoR); "
                             "a plain Transformer has no recursion depths to batch")
        model._decider("threshold")  # raises for a gate without a causal rule (softmax)
        for name, v in (("slots", slots), ("max_prompt_len", max_prompt_len), ("max_new_tokens", max_new_tokens),
                        ("steps_per_call", steps_per_call)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DepthwiseDecoder: {name} must be an integer >= 1, got {v!r}")
        capacity = max_prompt_len + max_new_tokens if capacity is None else capacity
        if capacity < max_prompt_len + max_new_tokens - 1 or capacity > model.cfg.max_seq_len:
            raise ValueError(f"DepthwiseDecoder: capacity {capacity} must hold a prompt of {max_prompt_len} plus "
                             f"{max_new_tokens - 1} decoded tokens and stay within max_seq_len {model.cfg.max_seq_len}")
        lanes = slots if lanes is None else lanes
        if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= slots:
            raise ValueError(f"DepthwiseDecoder: lanes must be an integer in [1, slots={slots}], got {lanes!r}")
        self.layout = Layout(slots=slots, capacity=capacity, lanes=lanes, max_new=max_new_tokens,
                             segments=tuple(model.stored_capacities(capacity)))
        self.max_prompt_len, self.steps_per_call = max_prompt_len, steps_per_call
        self.graphdef, self.params = nnx.split(model)
        self.vocab = model.cfg.vocab_size
        self.stats: dict = {}

    def cache_nbytes(self) -> int:
        """Bytes of the slots' KV caches (all slots, written or not)."""
        st = jax.eval_shape(lambda p: _empty_jit(self.graphdef, p, layout=self.layout), self.params)
        return sum(x.size * x.dtype.itemsize for layer in st.unique + st.shared for x in jax.tree.leaves(layer))

    def generate(self, prompts, max_new_tokens=None, *, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
        """Each prompt followed by its continuation (cut after ``eos_id``), in request order.
        ``max_new_tokens``: one number or one per request (default: the decoder's maximum)."""
        prompts = [list(map(int, p)) for p in prompts]
        lay = self.layout
        n = len(prompts)
        limits = [lay.max_new] * n if max_new_tokens is None else (
            [int(max_new_tokens)] * n if np.ndim(max_new_tokens) == 0 else [int(x) for x in max_new_tokens])
        if len(limits) != n or any(not 1 <= x <= lay.max_new for x in limits):
            raise ValueError(f"DepthwiseDecoder.generate: max_new_tokens must be in [1, {lay.max_new}], one value or "
                             f"one per prompt, got {max_new_tokens!r}")
        for i, p in enumerate(prompts):
            if not 1 <= len(p) <= self.max_prompt_len:
                raise ValueError(f"DepthwiseDecoder.generate: prompt {i} has {len(p)} tokens; 1 to "
                                 f"{self.max_prompt_len} fit")
            if any(not 0 <= t < self.vocab for t in p):
                raise ValueError(f"DepthwiseDecoder.generate: prompt {i} has a token outside [0, {self.vocab})")
        if temperature < 0 or not np.isfinite(temperature):
            raise ValueError(f"DepthwiseDecoder.generate: temperature must be >= 0 and finite, got {temperature!r}")
        static = dict(layout=lay, temperature=float(temperature), top_k=top_k, eos_id=eos_id)
        key = jax.random.key(seed)
        st = _empty_jit(self.graphdef, self.params, layout=lay)
        queue = collections.deque(range(n))
        owner = [-1] * lay.slots  # request in each slot (host side)
        results: list[list[int] | None] = [None] * n
        calls = admitted = 0
        times = {"admit_s": 0.0, "run_s": 0.0}
        while queue or any(o >= 0 for o in owner):
            live, n_out, out = jax.device_get((st.live_S, st.n_out_S, st.out_SxM))
            for s, req in enumerate(owner):
                if req >= 0 and not live[s]:
                    results[req] = prompts[req] + out[s, :n_out[s]].tolist()
                    owner[s] = -1
            t0 = time.perf_counter()
            for s in range(lay.slots):
                if owner[s] < 0 and queue:
                    req = queue.popleft()
                    p = np.zeros((self.max_prompt_len,), np.int32)
                    p[:len(prompts[req])] = prompts[req]
                    st = _admit_jit(self.graphdef, self.params, st, jnp.int32(s), jnp.asarray(p),
                                    jnp.int32(len(prompts[req])), jnp.int32(limits[req]), jnp.int32(req), key, **static)
                    owner[s], admitted = req, admitted + 1
            jax.block_until_ready(st.live_S)
            t1 = time.perf_counter()
            if any(o >= 0 for o in owner):
                st = _run_jit(self.graphdef, self.params, st, key, jnp.int32(self.steps_per_call),
                              jnp.bool_(bool(queue)), **static)
                calls += 1
                jax.block_until_ready(st.live_S)
            times["admit_s"] += t1 - t0
            times["run_s"] += time.perf_counter() - t1
        steps, passes, exits, waited = (int(x) for x in jax.device_get(st.stats))
        self.stats = {"steps": steps, "shared_passes": passes, "exits": exits, "waited": waited, "device_calls": calls,
                      "admitted": admitted, "slot_utilisation": passes / max(1, steps * lay.slots), **times}
        if eos_id is not None:
            results = [r[:len(p)] + (c[:c.index(eos_id) + 1] if eos_id in c else c)
                       for p, r in zip(prompts, results) for c in [r[len(p):]]]
        return results


def depthwise_generate(model, prompts, max_new_tokens: int, *, slots: int, lanes: int | None = None,
                       temperature: float = 0.0, top_k: int | None = None, seed: int = 0, eos_id: int | None = None,
                       capacity: int | None = None) -> list[list[int]]:
    """:func:`jaxeff.generate`'s list form through a :class:`DepthwiseDecoder` of ``slots``."""
    dec = DepthwiseDecoder(model, slots=slots, max_prompt_len=max(len(p) for p in prompts),
                           max_new_tokens=max_new_tokens, capacity=capacity, lanes=lanes)
    return dec.generate(prompts, temperature=temperature, top_k=top_k, seed=seed, eos_id=eos_id)

"""Question answering over a compressed cache, batched and jitted: prefill (and compress) a
context once, then ask questions in turn, each appended to the cache with its greedy answer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.kv import compress_once


@functools.lru_cache(maxsize=32)
def _prefill(graphdef, transform, capacity: int):
    def run(state, ctx, lengths, value):
        m = nnx.merge(graphdef, state)
        if transform is None:
            _, cache, _ = m.extend(ctx, m.init_cache(ctx.shape[0], capacity), valid_lengths=lengths)
        else:
            _, cache, _ = compress_once(m, ctx, lengths, transform, capacity, budget_value=value)
        return cache
    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _ask(graphdef, n_answer: int):
    def run(state, cache, q, q_len):
        m = nnx.merge(graphdef, state)
        logits, cache, _ = m.extend(q, cache, valid_lengths=q_len)
        tok = jnp.argmax(jnp.take_along_axis(logits, (q_len - 1)[:, None, None], 1)[:, 0], -1).astype(jnp.int32)

        def step(carry, _):
            tok, cache = carry
            lg, cache, _ = m.extend(tok[:, None], cache)
            return (jnp.argmax(lg[:, 0], -1).astype(jnp.int32), cache), tok

        (_, cache), toks = jax.lax.scan(step, (tok, cache), None, length=n_answer)  # every answer token is cached
        return toks.T, cache
    return jax.jit(run)


def pad_questions(questions: list[list[int]], width: int):
    q = np.zeros((len(questions), width), np.int32)
    for i, x in enumerate(questions):
        if len(x) > width:
            raise ValueError(f"question of {len(x)} tokens is longer than the pad width {width}")
        q[i, :len(x)] = x
    return jnp.asarray(q), jnp.asarray([len(x) for x in questions], jnp.int32)


def answer_correct(tokenizer, ids, answer: str) -> bool:
    return answer in tokenizer.decode([int(t) for t in ids])


def run_turns(model, tokenizer, contexts, turns, answers, transform, *, value=None, n_answer: int = 8,
              q_width: int = 32, query_aware: bool = False):
    """``turns``: per turn a list (one per row) of question token lists; ``answers[i][turn]``.
    The context is compressed before any question (query-agnostic), or with ``query_aware``
    after all but the last token of the first question (which then sits in SnapKV's window).
    Returns (per-turn accuracy, mean kept slots after compression, answers decoded)."""
    graphdef, state = nnx.split(model)
    b, n = contexts.shape
    capacity = n + len(turns) * (q_width + n_answer)
    ctx, lengths = np.asarray(contexts), np.full(b, n, np.int32)
    turns = [list(t) for t in turns]
    if query_aware:
        q1, _ = pad_questions([q[:-1] for q in turns[0]], q_width)
        ctx = np.concatenate([ctx, np.asarray(q1)], 1)
        lengths = lengths + np.asarray([len(q) - 1 for q in turns[0]], np.int32)
        turns[0] = [q[-1:] for q in turns[0]]
    cache = _prefill(graphdef, transform, capacity)(state, jnp.asarray(ctx), jnp.asarray(lengths), value)
    kept = float(np.mean([np.asarray(layer.counts).mean() for layer in cache.layers]))
    acc, decoded = [], []
    for t, qs in enumerate(turns):
        q, q_len = pad_questions(qs, q_width)
        ids, cache = _ask(graphdef, n_answer)(state, cache, q, q_len)
        ids = np.asarray(ids)
        ok = [answer_correct(tokenizer, ids[i], answers[i][t]) for i in range(b)]
        acc.append(float(np.mean(ok)))
        decoded.append([tokenizer.decode([int(x) for x in ids[i]]) for i in range(b)])
    return acc, kept, decoded

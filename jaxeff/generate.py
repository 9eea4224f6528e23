"""Sampling from any jaxeff model with a KV cache, the whole decode loop inside one jit."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    """Greedy when temperature == 0, else softmax sampling at ``temperature`` among the top_k."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_B = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_B, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _extend_kw(transform, prefill: bool) -> dict:
    """Which statistics the transform needs from ``extend`` (decode steps have one query row)."""
    if transform is None:
        return {"stats_rows": 0}
    rows = transform.stats_rows if prefill else min(transform.stats_rows, 1)
    kw = {"stats_rows": rows}
    if getattr(transform, "stats_sums", False):
        kw["stats_sums"] = True
    return kw


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "capacity", "temperature", "top_k",
                                             "cache_transform", "transform_every", "decode_impl"))
def _generate(graphdef, state, tokens_BxP, lengths_B, key, *, max_new_tokens, capacity, temperature, top_k,
              cache_transform, transform_every, decode_impl=None):
    model = nnx.merge(graphdef, state)
    b = tokens_BxP.shape[0]
    t = cache_transform
    cache = model.init_cache(b, capacity)
    if decode_impl is not None:
        from jaxeff.kv.decode import with_decode_kernel
        cache = with_decode_kernel(cache, decode_impl)
    if t is not None and hasattr(t, "prepare"):
        cache = t.prepare(cache, model)
    logits_BxPxV, cache, stats = model.extend(tokens_BxP, cache, valid_lengths=lengths_B, **_extend_kw(t, True))
    tstate = ()
    if t is not None:
        if hasattr(t, "after_prefill"):  # jaxeff.kv.KVCompression: observe the prompt, then compress
            cache, tstate = t.after_prefill(cache, None, stats)
        else:
            cache, tstate = t(cache, t.init(cache), stats)
    last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    keys = jax.random.split(key, max_new_tokens)
    first_B = sample_logits(last_BxV, keys[0], temperature, top_k)

    def step(carry, xs):
        tok_B, cache, tstate = carry
        key_i, i = xs
        logits_Bx1xV, cache, stats = model.extend(tok_B[:, None], cache, **_extend_kw(t, False))
        if t is not None and hasattr(t, "observe"):
            tstate = t.observe(cache, tstate, stats)
        if t is not None and transform_every:
            cache, tstate = jax.lax.cond(i % transform_every == 0, lambda c, s: t(c, s, stats),
                                         lambda c, s: (c, s), cache, tstate)
        nxt_B = sample_logits(logits_Bx1xV[:, 0], key_i, temperature, top_k)
        return (nxt_B, cache, tstate), tok_B

    steps = jnp.arange(1, max_new_tokens, dtype=jnp.int32)  # decode steps done after this one
    (last_B, _, _), toks_NxB = jax.lax.scan(step, (first_B, cache, tstate), (keys[1:], steps))
    return jnp.concatenate([toks_NxB.T, last_B[:, None]], axis=1)


def kv_transform(kv_policy, kv_budget=None, compress_every=None, **options):
    """The :class:`jaxeff.kv.KVCompression` that ``generate(..., kv_policy=...)`` runs: a policy
    name (with ``options``) or object, a budget (ratio in (0, 1], token count, or
    :class:`jaxeff.kv.Budget`) and the decode interval."""
    from jaxeff.kv import KVCompression, policy
    if compress_every is not None and (isinstance(compress_every, bool) or not isinstance(compress_every, int)
                                       or compress_every < 1):
        raise ValueError(f"generate: compress_every must be an integer >= 1 or None, got {compress_every!r}")
    return KVCompression(policy(kv_policy, **options), kv_budget, compress_every)


def generate(model, prompt_tokens, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0, eos_id: int | None = None, cache_transform=None, transform_every: int | None = None,
             kv_policy=None, kv_budget=None, compress_every: int | None = None, kv_options: dict | None = None,
             decode_impl: str | None = None):
    """Continues each prompt by ``max_new_tokens`` tokens.

    ``prompt_tokens``: a list of token ids, a list of such lists (lengths may differ), or an int
    array [B, P]. Returns the prompts followed by their continuations, in the same form (for an
    array, an array [B, P + max_new_tokens]). With ``eos_id``, a continuation is cut after its
    first end-of-sequence token (list forms only).

    ``model`` is any :class:`jaxeff.models.decoder.Decoder`. ``cache_transform`` (a
    :class:`jaxeff.kv.transform.CacheTransform`) is applied to the cache after the prompt and,
    with ``transform_every=k``, after every k-th decode step, inside the same compiled loop.

    KV-cache compression (:mod:`jaxeff.kv`): ``kv_policy`` (a name such as ``"snapkv"``, with
    ``kv_options``, or a policy object), ``kv_budget`` (a ratio of the tokens seen in (0, 1], a
    token count per head, or a :class:`jaxeff.kv.Budget` with layer and head-wise allocation) and
    ``compress_every`` (also compress every k decode steps; default: only after the prompt, or the
    policy's own interval, LazyEviction's window). The cache then holds only as many slots as the
    policy can keep plus the tokens between compressions. ``decode_impl`` reads the cache through
    a ``pallas_kernels.decode_attention`` kernel (``"portable"``, ``"mosaic_gpu"``, ...).
    """
    if kv_policy is not None:
        if cache_transform is not None or transform_every is not None:
            raise ValueError("generate: give either kv_policy or cache_transform/transform_every, not both")
        cache_transform = kv_transform(kv_policy, kv_budget, compress_every, **(kv_options or {}))
        transform_every = cache_transform.interval()
    elif kv_budget is not None or compress_every is not None or kv_options:
        raise ValueError("generate: kv_budget, compress_every and kv_options need a kv_policy")
    if transform_every is not None and (isinstance(transform_every, bool) or not isinstance(transform_every, int)
                                        or transform_every < 1):
        raise ValueError(f"generate: transform_every must be an integer >= 1 or None, got {transform_every!r}")
    if transform_every is not None and cache_transform is None:
        raise ValueError("generate: transform_every needs a cache_transform")
    as_array = isinstance(prompt_tokens, (np.ndarray, jax.Array))
    single = (not as_array and bool(prompt_tokens)
              and all(isinstance(t, (int, np.integer)) for t in prompt_tokens))
    if as_array:
        arr = np.asarray(prompt_tokens)
        if arr.ndim != 2:
            raise ValueError(f"generate: prompt_tokens array must be [batch, length], got shape {arr.shape}")
        prompts = [list(map(int, row)) for row in arr]
    elif single:
        prompts = [list(map(int, prompt_tokens))]
    else:
        prompts = [list(map(int, p)) for p in prompt_tokens]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    # Checked here, eagerly, naming the value: inside jit nothing can be (JAX clamps or wraps
    # out-of-range gather indices instead of raising: an id >= vocab_size reads a NaN-filled
    # embedding row, a negative id wraps around, -1 to the last row).
    cfg = model.cfg
    vocab = cfg.vocab_size
    for i, p in enumerate(prompts):
        for j, t in enumerate(p):
            if not 0 <= t < vocab:
                where = f"prompt {i}, position {j}" if len(prompts) > 1 else f"position {j}"
                raise ValueError(f"generate: prompt token {t} is outside the vocabulary [0, {vocab}) ({where})")
    longest = max(len(p) for p in prompts)
    if longest >= cfg.max_seq_len:
        raise ValueError(f"generate: the prompt is {longest} tokens, which leaves no room below the model's "
                         f"max_seq_len {cfg.max_seq_len}; shorten it to at most {cfg.max_seq_len - 1} tokens")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number))
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"generate: temperature must be >= 0 and finite, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"generate: top_k must be >= 1 or None, got {top_k!r}")
    capacity = longest + max_new_tokens
    if capacity > cfg.max_seq_len:
        raise ValueError(f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_seq_len {cfg.max_seq_len}")
    if hasattr(cache_transform, "capacity"):
        capacity = cache_transform.capacity(longest, max_new_tokens, cfg.n_kv_heads)
        cache_transform.check(capacity, [len(p) for p in prompts])
    tokens = np.zeros((len(prompts), longest), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    graphdef, state = nnx.split(model)
    new = np.asarray(_generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
                               max_new_tokens=max_new_tokens, capacity=capacity, temperature=float(temperature),
                               top_k=top_k, cache_transform=cache_transform, transform_every=transform_every,
                               decode_impl=decode_impl))
    if as_array:
        return np.concatenate([np.asarray(prompt_tokens), new], axis=1)
    out = []
    for p, cont in zip(prompts, new.tolist()):
        if eos_id is not None and eos_id in cont:
            cont = cont[: cont.index(eos_id) + 1]
        out.append(p + cont)
    return out[0] if single else out

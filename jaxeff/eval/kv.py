"""KV-cache compression measured on text: the continuation perplexity after compressing a context,
and the ``kv-perplexity`` command and ``--kv-policy/--kv-budget`` options for the command line.

:func:`kv_perplexity` prefills the first ``context_tokens`` tokens of a text, compresses the cache
to the budget with a policy, then scores the next ``continuation_tokens`` tokens as a
continuation that reads the compressed cache (every prediction comes after the compression: the
continuation's first token is fed, its second is the first target). The same prefill without
compression gives the reference perplexity. By default the continuation is scored in one
``extend`` (the context compressed once, as kvpress does); ``compress_every=k`` instead decodes it
token by token, compressing every k steps (compression during generation), and a read-time
policy (Quest) always decodes token by token. The budget is a traced argument, so one compiled
program serves every budget of a policy.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.kv import Budget, KVCompression, bytes_per_token, policy as make_policy
from jaxeff.kv.registry import parse_options, policy_names
from jaxeff.ops import cross_entropy


def _extend_kw(transform, prefill: bool) -> dict:
    rows = transform.stats_rows if prefill else min(transform.stats_rows, 1)
    return {"stats_rows": rows, **({"stats_sums": True} if transform.stats_sums else {})}


@functools.lru_cache(maxsize=64)
def _scorer(graphdef, transform, capacity: int, stepwise: bool):
    """A jitted ``(state, context [1, N], inputs [1, M], targets [1, M], budget) -> (nll, kept
    [L, K], positions [L, K, C] after compressing the context)`` for one policy
    (``transform=None``: no compression)."""

    def run(state, ctx_1xN, inp_1xM, tgt_1xM, budget_value):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(1, capacity)
        lengths = jnp.full((1,), ctx_1xN.shape[1], jnp.int32)
        if transform is None:
            _, cache, _ = model.extend(ctx_1xN, cache)
        else:
            cache = transform.prepare(cache, model)
            _, cache, stats = model.extend(ctx_1xN, cache, valid_lengths=lengths, **_extend_kw(transform, True))
            cache, tstate = transform.after_prefill(cache, None, stats, budget_value=budget_value)
        kept = jnp.stack([layer.counts[0] for layer in cache.layers])
        positions = jnp.stack([layer.positions[0] for layer in cache.layers])
        if not stepwise:
            logits, _, _ = model.extend(inp_1xM, cache)
            return cross_entropy(logits, tgt_1xM)[0], kept, positions
        every = transform.interval() if transform is not None else None

        def step(carry, xs):
            cache, tstate = carry
            tok, tgt, i = xs
            logits, cache, stats = model.extend(tok[None, None], cache, **(
                _extend_kw(transform, False) if transform is not None else {}))
            if transform is not None:
                tstate = transform.observe(cache, tstate, stats, budget_value=budget_value)
                if every:
                    cache, tstate = jax.lax.cond((i + 1) % every == 0,
                                                 lambda c, s: transform(c, s, stats, budget_value=budget_value),
                                                 lambda c, s: (c, s), cache, tstate)
            nll = cross_entropy(logits, tgt[None, None])[0]
            return (cache, tstate), nll

        m = inp_1xM.shape[1]
        tstate0 = tstate if transform is not None else ()
        _, nlls = jax.lax.scan(step, (cache, tstate0), (inp_1xM[0], tgt_1xM[0], jnp.arange(m, dtype=jnp.int32)))
        return nlls.mean(), kept, positions

    return jax.jit(run)


def _split_text(tokenizer, text: str, context_tokens: int, continuation_tokens: int | None, max_seq_len: int):
    ids = tokenizer.encode(text)
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
        raise ValueError(f"kv_perplexity: context_tokens must be an integer >= 1, got {context_tokens!r}")
    room = len(ids) - context_tokens - 1
    if room < 1:
        raise ValueError(f"kv_perplexity: the text has {len(ids)} tokens; context_tokens={context_tokens} leaves "
                         f"no continuation to score")
    m = room if continuation_tokens is None else continuation_tokens
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"kv_perplexity: continuation_tokens must be an integer >= 1, got {continuation_tokens!r}")
    m = min(m, room, max_seq_len - context_tokens)
    if m < 1:
        raise ValueError(f"kv_perplexity: context_tokens={context_tokens} leaves no room below the model's "
                         f"max_seq_len {max_seq_len}")
    ctx = np.asarray(ids[:context_tokens], np.int32)[None]
    inp = np.asarray(ids[context_tokens:context_tokens + m], np.int32)[None]
    tgt = np.asarray(ids[context_tokens + 1:context_tokens + m + 1], np.int32)[None]
    return ctx, inp, tgt


def kv_perplexity(model, tokenizer, text: str, *, policy, budget, context_tokens: int,
                  continuation_tokens: int | None = 256, compress_every: int | None = None,
                  options: dict | None = None, layer_weights=None, headwise: bool = False,
                  with_full: bool = True, return_positions: bool = False) -> dict:
    """Continuation perplexity with a compressed cache (see the module docstring).

    ``policy``: a name (:func:`jaxeff.kv.policy_names`, with ``options``) or a policy object;
    ``budget``: a ratio of the context in (0, 1] or a token count per head (``None`` for
    quantisation policies); ``layer_weights`` / ``headwise``: the :class:`jaxeff.kv.Budget`
    schedule and AdaKV allocation. Returns a dict: ``policy``, ``options``, ``budget``,
    ``context_tokens``, ``continuation_tokens``, ``kept_slots`` (mean per layer and head after
    compressing the context), ``kept_fraction`` (of the context), ``kept_per_layer``, ``nll`` and
    ``perplexity``, ``full_nll`` / ``full_perplexity`` (no compression, ``with_full``),
    ``bytes_per_token`` (of the compressed cache, all layers) and ``seconds``; with
    ``return_positions`` also ``positions``, the context positions each layer and head kept
    (an int array [L, K, C], -1 for empty slots)."""
    pol = make_policy(policy, **(options or {}))
    if compress_every is not None and (isinstance(compress_every, bool) or not isinstance(compress_every, int)
                                       or compress_every < 1):
        raise ValueError(f"kv_perplexity: compress_every must be an integer >= 1 or None, got {compress_every!r}")
    bud = None
    if pol.uses_budget:
        if budget is None:
            raise ValueError(f"kv_perplexity: budget is required for policy {pol.name!r}")
        bud = Budget(budget, layers=None if layer_weights is None else tuple(layer_weights), headwise=headwise)
    elif budget not in (None, 1, 1.0):
        raise ValueError(f"kv_perplexity: policy {pol.name!r} evicts nothing; budget must be None, got {budget!r}")
    transform = KVCompression(pol, bud, compress_every)
    ctx, inp, tgt = _split_text(tokenizer, text, context_tokens, continuation_tokens, model.cfg.max_seq_len)
    n, m = ctx.shape[1], inp.shape[1]
    capacity = n + m
    if bud is not None:
        if not bud.is_ratio and bud.value > n:
            raise ValueError(f"kv_perplexity: budget {bud.value} tokens exceeds context_tokens {n}")
        transform.check(capacity, [n])
    stepwise = compress_every is not None or pol.kind == "select"
    graphdef, state = nnx.split(model)
    t0 = time.perf_counter()
    value = None if bud is None else jnp.asarray(bud.value, jnp.float32 if bud.is_ratio else jnp.int32)
    # one program per policy and budget kind: the budget's value is an argument
    placeholder = None if bud is None else Budget(0.5 if bud.is_ratio else 1, layers=bud.layers, headwise=headwise)
    key_transform = KVCompression(pol, placeholder, compress_every)
    nll, kept, positions = _scorer(graphdef, key_transform, capacity, stepwise)(
        state, jnp.asarray(ctx), jnp.asarray(inp), jnp.asarray(tgt), value)
    nll = float(nll)
    kept = np.asarray(kept)
    out = {"policy": pol.name, "options": {k: v for k, v in vars(pol).items()}, "budget": budget,
           "compress_every": compress_every, "context_tokens": n, "continuation_tokens": m,
           "kept_slots": float(kept.mean()), "kept_fraction": float(kept.mean() / n),
           "kept_per_layer": kept.mean(-1).round(2).tolist(), "nll": nll, "perplexity": math.exp(nll),
           "bytes_per_token": _bytes_per_token(model, transform, capacity)}
    if return_positions:
        out["positions"] = np.asarray(positions)
    if with_full:
        full_nll = float(_scorer(graphdef, None, capacity, stepwise and pol.kind != "select")(
            state, jnp.asarray(ctx), jnp.asarray(inp), jnp.asarray(tgt), None)[0])
        out["full_nll"], out["full_perplexity"] = full_nll, math.exp(full_nll)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _bytes_per_token(model, transform, capacity: int) -> float:
    """Bytes per cached token over all layers, from the layer format the policy ends with."""
    graphdef, state = nnx.split(model)

    def shape_of():
        m = nnx.merge(graphdef, state)
        cache = transform.prepare(m.init_cache(1, 8), m)
        if transform.policy.kind == "quantize" and not transform.policy.uses_budget:
            from jaxeff.kv.quantized import KIVILayerKV
            from jaxeff.kv.policies.kivi import KIVI
            if isinstance(transform.policy, KIVI):
                layers = tuple(KIVILayerKV.from_layer(l, bits=transform.policy.bits, group=transform.policy.group,
                                                      residual=transform.policy.residual) for l in cache.layers)
                cache = type(cache)(layers=layers, lengths=cache.lengths)
        return cache

    cache = jax.eval_shape(shape_of)
    return float(bytes_per_token(cache))


# --- command line -------------------------------------------------------------------------------

def _budget_arg(text: str):
    """'0.5' -> 0.5 (a ratio), '256' -> 256 (tokens), 'none' -> None."""
    if text.lower() in ("none", "full"):
        return None
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budget must be a ratio in (0, 1], a token count or 'none', "
                                             f"got {text!r}") from None
    return value


def add_kv_generate_options(parser: argparse.ArgumentParser) -> None:
    """``--kv-policy NAME --kv-budget B [--kv-compress-every K] [--kv-option NAME=VALUE ...]`` for
    ``jaxeff generate``; :func:`kv_generate_kwargs` turns them into ``jaxeff.generate`` arguments."""
    g = parser.add_argument_group("KV-cache compression")
    g.add_argument("--kv-policy", default=None, metavar="NAME",
                   help=f"compress the KV cache with this policy ({', '.join(policy_names())})")
    g.add_argument("--kv-budget", type=_budget_arg, default=None, metavar="B",
                   help="slots kept: a ratio of the tokens seen in (0, 1] or a token count per head")
    g.add_argument("--kv-compress-every", type=int, default=None, metavar="K",
                   help="also compress every K decode steps (default: after the prompt only)")
    g.add_argument("--kv-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a policy option, e.g. window=32 (repeatable)")


def kv_generate_kwargs(args: argparse.Namespace) -> dict:
    """The ``jaxeff.generate`` keyword arguments of :func:`add_kv_generate_options`'s options
    (empty without ``--kv-policy``); raises ``ValueError`` for options without a policy."""
    policy = getattr(args, "kv_policy", None)
    if policy is None:
        if getattr(args, "kv_budget", None) is not None or getattr(args, "kv_compress_every", None) is not None \
                or getattr(args, "kv_option", None):
            raise ValueError("--kv-budget, --kv-compress-every and --kv-option need --kv-policy")
        return {}
    pol = make_policy(policy, **parse_options(args.kv_option))
    return {"kv_policy": pol, "kv_budget": args.kv_budget, "compress_every": args.kv_compress_every}


def register_kv_commands(subparsers) -> argparse.ArgumentParser:
    """Adds ``kv-perplexity`` to an ``argparse`` subparsers object (``func`` = :func:`run_kv_perplexity`)."""
    p = subparsers.add_parser(
        "kv-perplexity", help="continuation perplexity after compressing a context's KV cache",
        description="Prefill the first N tokens of TEXT_FILE, compress the KV cache to the budget with a policy, "
                    "then score the rest of the file as a continuation with the compressed cache (and, for "
                    "reference, with the full cache).")
    p.add_argument("text_file", metavar="TEXT_FILE")
    p.add_argument("--policy", required=True, help=f"one of: {', '.join(policy_names())}")
    p.add_argument("--budget", type=_budget_arg, default=0.5,
                   help="a ratio of the context in (0, 1], a token count per head, or 'none' (quantisation)")
    p.add_argument("--context-tokens", type=int, required=True, metavar="N")
    p.add_argument("--continuation-tokens", type=int, default=256, metavar="M")
    p.add_argument("--compress-every", type=int, default=None, metavar="K",
                   help="decode the continuation token by token, compressing every K steps")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="a policy option (repeatable)")
    p.add_argument("--gguf", default=None, metavar="PATH", help="a GGUF model file (default: the bundled SmolLM2-135M)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_kv_perplexity)
    return p


def run_kv_perplexity(args: argparse.Namespace) -> int:
    """The ``kv-perplexity`` command: prints the policy, the kept slots and the continuation
    perplexity (and the full cache's). Returns the exit status (2 for bad input)."""
    from jaxeff.io import load_gguf
    try:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        print(f"kv-perplexity: cannot read {args.text_file!r}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        opts = parse_options(args.option)
        make_policy(args.policy, **opts)  # fail on bad names/options before loading a model
        model, tokenizer = load_gguf(args.gguf)
        res = kv_perplexity(model, tokenizer, text, policy=args.policy, budget=args.budget,
                            context_tokens=args.context_tokens, continuation_tokens=args.continuation_tokens,
                            compress_every=args.compress_every, options=opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"kv-perplexity: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, default=str))
    else:
        print(f"policy {res['policy']} {res['options']}, budget {res['budget']}")
        print(f"context {res['context_tokens']} tokens -> {res['kept_slots']:.1f} slots kept per layer and head "
              f"({100 * res['kept_fraction']:.1f}%), {res['bytes_per_token']:.0f} bytes per cached token")
        print(f"continuation of {res['continuation_tokens']} tokens: perplexity {res['perplexity']:.3f} "
              f"(full cache {res['full_perplexity']:.3f})")
    return 0

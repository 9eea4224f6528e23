"""Perplexity of a model on text: windows that score every token once (disjoint or sliding),
document by document over a corpus."""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxeff.data.corpora import load_corpus
from jaxeff.eval.generation import with_bos
from jaxeff.io.gguf import load_gguf
from jaxeff.ops.losses import cross_entropy


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef, state, inputs_BxT, targets_BxT, weights_BxT):
    """Sum of the weighted next-token NLLs of a batch of windows (float32)."""
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
    ids = with_bos(tokenizer, tokenizer.encode(text))
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
    check_perplexity_args(seq_len=seq_len, stride=stride, batch_size=batch_size, max_tokens=max_tokens)
    spec = paths_or_corpus_name if isinstance(paths_or_corpus_name, str) else ",".join(map(str, paths_or_corpus_name))
    docs = load_corpus(spec)
    if model is None or tokenizer is None:
        model, tokenizer = load_gguf(gguf_path, dtype=dtype)
    total, count, results = 0.0, 0, []
    for doc in docs:
        ids = with_bos(tokenizer, tokenizer.encode(doc.text))
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

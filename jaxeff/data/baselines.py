"""Reference numbers a language model's loss is read against.

A model that has learned only token frequencies scores the unigram cross-entropy; anything that
uses context must beat it. Bytes per token converts a per-token loss into bits per byte, which
is comparable across tokenizers (byte vs BPE) and vocabulary sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def unigram_cross_entropy_nats(train_tokens: np.ndarray, val_targets: np.ndarray, vocab_size: int) -> float:
    """Mean ``-log p(t)`` over ``val_targets`` with ``p`` the add-one-smoothed train unigram.

    ``p(t) = (count_train(t) + 1) / (n_train + vocab_size)``; the smoothing keeps tokens unseen in
    training finite, as a model's softmax would.
    """
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise ValueError(f"unigram_cross_entropy_nats: vocab_size must be a positive integer, got {vocab_size!r}")
    train = np.asarray(train_tokens).reshape(-1).astype(np.int64)
    val = np.asarray(val_targets).reshape(-1).astype(np.int64)
    if val.size == 0:
        raise ValueError("unigram_cross_entropy_nats: val_targets is empty")
    for name, arr in (("train_tokens", train), ("val_targets", val)):
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"unigram_cross_entropy_nats: {name} has ids outside [0, {vocab_size})")
    counts_V = np.bincount(train, minlength=vocab_size).astype(np.float64)
    log_p_V = np.log(counts_V + 1.0) - math.log(train.size + vocab_size)
    return float(-log_p_V[val].mean())


def bytes_per_token(texts: Iterable[str], n_tokens: int) -> float:
    """UTF-8 bytes of ``texts`` divided by ``n_tokens``.

    Pass the number of tokens a loss is averaged over (eos included), so that
    ``bits_per_byte = loss_nats / ln(2) / bytes_per_token``.
    """
    if n_tokens <= 0:
        raise ValueError(f"bytes_per_token: n_tokens must be positive, got {n_tokens}")
    return sum(len(t.encode("utf-8")) for t in texts) / n_tokens

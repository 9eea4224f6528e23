"""Packing token streams into fixed-length rows, and a stateless, resumable batch order.

Rows hold ``S = seq_len + 1`` tokens so one row gives both inputs (``[:, :-1]``) and targets
(``[:, 1:]``) without a second gather. Documents are concatenated with an eos after each and cut
into rows with no regard for document boundaries (no token is wasted), and segment ids record
where documents start inside each row so attention can stay within a document.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def check_token_ids(token_lists: Sequence[Sequence[int]], vocab_size: int | None = None, *,
                    what: str = "pack_documents") -> None:
    """Raises ``ValueError`` naming the first document and id outside ``[0, vocab_size)`` (or
    negative, when ``vocab_size`` is None). Models cannot check ids inside jit (JAX clamps or wraps
    gather indices), so the data is checked here, once, before training."""
    for d, tokens in enumerate(token_lists):
        arr = np.asarray(tokens).reshape(-1)
        if arr.size == 0:
            continue
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{what}: document {d} holds {arr.dtype} values, not integer token ids")
        bad = (arr < 0) if vocab_size is None else ((arr < 0) | (arr >= vocab_size))
        if bad.any():
            j = int(np.argmax(bad))
            span = "must be >= 0" if vocab_size is None else f"is outside the vocabulary [0, {vocab_size})"
            raise ValueError(f"{what}: document {d}, position {j}: token id {int(arr[j])} {span}")


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int,
                   eos_id: int, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates ``doc + [eos]`` for every document and cuts the stream into rows of seq_len + 1.

    Token ids (and ``eos_id``) must be >= 0 and, when ``vocab_size`` is given, below it; the
    first one that is not is named in a ``ValueError``.

    Returns ``(tokens_NxS, segment_ids_NxS)``, both int32. In every row segment ids start at 1 and
    go up by one at each document boundary in that row (a document continued from the previous
    row is segment 1 of the new row; a document's eos belongs to that document). The last row is
    padded with ``eos_id`` and segment id 0, so ``segment_ids > 0`` masks real tokens. Nothing is
    dropped; a stream shorter than one row raises ``ValueError``.
    """
    if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"pack_documents: seq_len must be a positive integer, got {seq_len!r}")
    row_len = int(seq_len) + 1
    if len(token_lists) == 0:
        raise ValueError("pack_documents: token_lists is empty; the corpus has no documents")
    check_token_ids(token_lists, vocab_size)
    if eos_id < 0 or (vocab_size is not None and eos_id >= vocab_size):
        raise ValueError(f"pack_documents: eos_id {eos_id} is outside the vocabulary [0, {vocab_size or 'inf'})")
    eos = np.asarray([eos_id], dtype=np.int32)
    pieces = []
    for tokens in token_lists:
        pieces.append(np.asarray(tokens, dtype=np.int32).reshape(-1))
        pieces.append(eos)
    stream_L = np.concatenate(pieces)
    lengths_D = np.asarray([len(t) + 1 for t in token_lists], dtype=np.int64)
    total = int(stream_L.shape[0])
    if total < row_len:
        raise ValueError(f"pack_documents: the corpus ({total} tokens, eos included) is smaller than one "
                         f"sequence of seq_len+1 = {row_len} tokens; use a smaller seq_len or more text")
    doc_index_L = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths_D)

    n_rows = -(-total // row_len)
    pad = n_rows * row_len - total
    tokens_NxS = np.concatenate([stream_L, np.full(pad, eos_id, dtype=np.int32)]).reshape(n_rows, row_len)
    doc_index_NxS = np.concatenate([doc_index_L, np.full(pad, -1, dtype=np.int64)]).reshape(n_rows, row_len)
    # Documents are contiguous and each holds >= 1 token (its eos), so the document index minus the
    # row's first document index counts the boundaries crossed within the row.
    segment_ids_NxS = (doc_index_NxS - doc_index_NxS[:, :1] + 1).astype(np.int32)
    segment_ids_NxS[doc_index_NxS < 0] = 0
    return tokens_NxS, segment_ids_NxS


def _check_rows(tokens_NxS: np.ndarray, segment_ids_NxS: np.ndarray, batch_size: int, fn: str) -> int:
    if tokens_NxS.ndim != 2 or tokens_NxS.shape != segment_ids_NxS.shape:
        raise ValueError(f"{fn}: tokens_NxS and segment_ids_NxS must be 2-D with equal shapes, got "
                         f"{tokens_NxS.shape} and {segment_ids_NxS.shape}")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"{fn}: batch_size must be a positive integer, got {batch_size!r}")
    return int(tokens_NxS.shape[0])


@functools.lru_cache(maxsize=8)
def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng((seed, epoch)).permutation(n_rows)
    perm.setflags(write=False)
    return perm


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation drawn from ``np.random.default_rng((seed, epoch))``."""
    return _epoch_permutation(int(n_rows), int(seed), int(epoch))


def batch_rows(n_rows: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices of global ``step``: positions ``step*B .. step*B+B-1`` of the endless sequence
    made by concatenating epoch permutations, so a batch may straddle two epochs."""
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise ValueError(f"batch_at: step must be a non-negative integer, got {step!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"batch_at: seed must be a non-negative integer, got {seed!r}")
    if batch_size > n_rows:
        raise ValueError(f"batch_at: batch_size {batch_size} exceeds the {n_rows} packed rows; use a smaller "
                         f"batch_size or seq_len, or a larger corpus")
    positions = int(step) * int(batch_size) + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n_rows)
    rows = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        rows[sel] = epoch_permutation(n_rows, int(seed), int(epoch))[offsets[sel]]
    return rows


def batch_at(tokens_NxS: np.ndarray, segment_ids_NxS: np.ndarray, step: int, batch_size: int,
             seed: int) -> dict[str, np.ndarray]:
    """The training batch of global ``step``: a pure function of (data, step, batch_size, seed).

    Because no iterator state exists, resuming from a checkpoint at step k reproduces exactly
    the batches an uninterrupted run would have seen. Returns ``tokens`` and ``segment_ids``,
    each ``[batch_size, S]`` int32.
    """
    n_rows = _check_rows(tokens_NxS, segment_ids_NxS, batch_size, "batch_at")
    rows_B = batch_rows(n_rows, step, batch_size, seed)
    return {"tokens": tokens_NxS[rows_B], "segment_ids": segment_ids_NxS[rows_B]}


def eval_batches(tokens_NxS: np.ndarray, segment_ids_NxS: np.ndarray, batch_size: int,
                 n_batches: int) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches: rows in order 0, 1, 2, ..., wrapping around if there are fewer
    than ``batch_size * n_batches`` rows (then some rows count twice), so every evaluation of a
    run, and of every run on the same data, scores the same tokens."""
    n_rows = _check_rows(tokens_NxS, segment_ids_NxS, batch_size, "eval_batches")
    if not isinstance(n_batches, (int, np.integer)) or isinstance(n_batches, bool) or n_batches <= 0:
        raise ValueError(f"eval_batches: n_batches must be a positive integer, got {n_batches!r}")
    out = []
    for b in range(n_batches):
        rows_B = (b * batch_size + np.arange(batch_size)) % n_rows
        out.append({"tokens": tokens_NxS[rows_B], "segment_ids": segment_ids_NxS[rows_B]})
    return out


@dataclass(frozen=True, eq=False)
class Batches:
    """Packed rows plus the batch size and seed, indexable by step: ``batches[step]``."""

    tokens_NxS: np.ndarray
    segment_ids_NxS: np.ndarray
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        n_rows = _check_rows(self.tokens_NxS, self.segment_ids_NxS, self.batch_size, "Batches")
        if self.batch_size > n_rows:
            raise ValueError(f"Batches: batch_size {self.batch_size} exceeds the {n_rows} packed rows")

    @property
    def steps_per_epoch(self) -> float:
        """Steps to see every row once (fractional: batches straddle epoch boundaries)."""
        return self.tokens_NxS.shape[0] / self.batch_size

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        return batch_at(self.tokens_NxS, self.segment_ids_NxS, step, self.batch_size, self.seed)

"""From a ``DataConfig`` to packed train/validation arrays, a tokenizer and baseline numbers.

The tokenizer is trained on the training split only, so validation text is unseen by every
learned component. With a ``tokenizer_dir`` the tokenizer and the encoded token streams are
saved there; a resumed run reloads both instead of retraining and re-tokenizing, which also
guarantees it sees the very same ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxeff.config import DataConfig
from jaxeff.data.baselines import bytes_per_token, unigram_cross_entropy_nats
from jaxeff.data.corpora import Document, load_corpus, split_documents
from jaxeff.data.packing import batch_at, check_token_ids, eval_batches, pack_documents
from jaxeff.data.tokenizers import META_FILE, BPETokenizer, Tokenizer, build_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)
class Dataset:
    """Packed rows of ``seq_len + 1`` tokens (see ``pack_documents``) for both splits, plus baselines.

    ``unigram_entropy_nats``: cross-entropy of the add-one-smoothed train unigram on the
    validation targets (non-padding ``tokens[:, 1:]``), the loss a context-free model reaches.
    ``bytes_per_token``: UTF-8 bytes of the validation text per validation token (one eos per
    document included); ``bits_per_byte = loss_nats / ln(2) / bytes_per_token``.
    """

    train_tokens_NxS: np.ndarray
    train_segment_ids_NxS: np.ndarray
    val_tokens_NxS: np.ndarray
    val_segment_ids_NxS: np.ndarray
    tokenizer: Tokenizer
    unigram_entropy_nats: float
    bytes_per_token: float
    seq_len: int
    n_train_docs: int
    n_val_docs: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """The training batch of global ``step`` (see ``batch_at``)."""
        return batch_at(self.train_tokens_NxS, self.train_segment_ids_NxS, step, batch_size, seed)

    def eval_batches(self, batch_size: int, n_batches: int) -> list[dict[str, np.ndarray]]:
        """Fixed, in-order validation batches (see ``eval_batches``)."""
        return eval_batches(self.val_tokens_NxS, self.val_segment_ids_NxS, batch_size, n_batches)

    def bits_per_byte(self, loss_nats: float) -> float:
        """Converts a mean per-token loss in nats (over validation targets) to bits per UTF-8 byte."""
        return loss_nats / math.log(2.0) / self.bytes_per_token


def _get_tokenizer(cfg: DataConfig, train_docs: list[Document], tokenizer_dir: str | None) -> Tokenizer:
    if tokenizer_dir is not None and (Path(tokenizer_dir) / META_FILE).is_file():
        tok = load_tokenizer(tokenizer_dir)
        if tok.kind != cfg.tokenizer:
            raise ValueError(f"prepare_dataset: tokenizer_dir {tokenizer_dir!r} holds a {tok.kind!r} tokenizer but "
                             f"DataConfig.tokenizer is {cfg.tokenizer!r}; use another directory or empty it")
        if isinstance(tok, BPETokenizer) and tok.vocab_size > cfg.bpe_vocab_size:
            raise ValueError(f"prepare_dataset: tokenizer_dir {tokenizer_dir!r} holds a BPE vocabulary of "
                             f"{tok.vocab_size} > DataConfig.bpe_vocab_size={cfg.bpe_vocab_size}")
        logger.info("loaded %r from %s", tok, tokenizer_dir)
        return tok
    start = time.perf_counter()
    tok = build_tokenizer(cfg.tokenizer, (d.text for d in train_docs), cfg.bpe_vocab_size)
    logger.info("built %r on %d train documents in %.1fs", tok, len(train_docs), time.perf_counter() - start)
    if tokenizer_dir is not None:
        tok.save(tokenizer_dir)
    return tok


def _cache_key(cfg: DataConfig, tok: Tokenizer, train: list[Document], val: list[Document]) -> str:
    """Covers everything the encoded ids depend on: config, tokenizer, and every document's text."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "cfg": dataclasses.asdict(cfg), "tok": tok.kind,
                         "vocab": tok.vocab_size}, sort_keys=True).encode())
    if isinstance(tok, BPETokenizer):
        h.update(tok.to_json().encode())
    for split, docs in (("train", train), ("val", val)):
        h.update(f"{split}:{len(docs)}".encode())
        for d in docs:
            h.update(f"{len(d.name)}:{d.name}{len(d.text)}:".encode())
            h.update(d.text.encode("utf-8"))
    return h.hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)  # atomic: a crash never leaves a truncated cache file behind


def _encode(tok: Tokenizer, docs: list[Document], cache_dir: str | None, key: str, split: str) -> list[np.ndarray]:
    """Token ids per document, read from / written to ``<cache_dir>/encoded_<key>_<split>_*.npy``."""
    if cache_dir is not None:
        ids_path = Path(cache_dir) / f"encoded_{key}_{split}_ids.npy"
        lens_path = Path(cache_dir) / f"encoded_{key}_{split}_lengths.npy"
        if ids_path.is_file() and lens_path.is_file():
            try:
                ids, lens = np.load(ids_path), np.load(lens_path)
            except (OSError, ValueError) as err:
                ids = lens = None
                logger.warning("ignoring unreadable token cache %s (%s)", ids_path, type(err).__name__)
            if lens is not None and lens.shape == (len(docs),) and int(lens.sum()) == ids.shape[0]:
                bad = (ids < 0) | (ids >= tok.vocab_size)
                if not bad.any():
                    logger.info("loaded encoded %s split from %s", split, ids_path)
                    return np.split(ids, np.cumsum(lens)[:-1])
                logger.warning("ignoring token cache %s: token id %d is outside the vocabulary [0, %d); "
                               "re-encoding", ids_path, int(ids[np.argmax(bad)]), tok.vocab_size)
            elif lens is not None:
                logger.warning("ignoring inconsistent token cache %s", ids_path)
    start = time.perf_counter()
    encoded = [np.asarray(ids, dtype=np.int32) for ids in tok.encode_batch([d.text for d in docs])]
    logger.info("encoded %s split (%d documents) in %.1fs", split, len(docs), time.perf_counter() - start)
    check_token_ids(encoded, tok.vocab_size, what=f"prepare_dataset: {split} split, {tok!r}")
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        _save_npy(ids_path, np.concatenate(encoded) if encoded else np.zeros(0, np.int32))
        _save_npy(lens_path, np.asarray([len(e) for e in encoded], dtype=np.int64))
    return encoded


def _pack(encoded: list[np.ndarray], seq_len: int, eos_id: int, split: str, n_docs: int, vocab_size: int):
    try:
        return pack_documents(encoded, seq_len, eos_id, vocab_size)
    except ValueError as err:
        raise ValueError(f"prepare_dataset: {split} split ({n_docs} documents): {err}") from None


def prepare_dataset(cfg: DataConfig, seq_len: int, tokenizer_dir: str | None = None) -> Dataset:
    """Loads, splits, tokenizes and packs ``cfg.corpus`` into rows of ``seq_len + 1`` tokens.

    If ``tokenizer_dir`` holds a saved tokenizer it is reused (it must match ``cfg.tokenizer``);
    otherwise one is built from the training split and saved there. Encoded ids are cached in
    ``tokenizer_dir`` keyed by a hash of the config, tokenizer and corpus contents.
    """
    if not isinstance(cfg, DataConfig):
        raise ValueError(f"prepare_dataset: cfg must be a DataConfig, got {type(cfg).__name__}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"prepare_dataset: seq_len must be a positive integer, got {seq_len!r}")
    docs = load_corpus(cfg.corpus)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    tok = _get_tokenizer(cfg, train_docs, tokenizer_dir)
    key = _cache_key(cfg, tok, train_docs, val_docs)
    train_enc = _encode(tok, train_docs, tokenizer_dir, key, "train")
    val_enc = _encode(tok, val_docs, tokenizer_dir, key, "val")

    train_tokens, train_segs = _pack(train_enc, seq_len, tok.eos_id, "train", len(train_docs), tok.vocab_size)
    val_tokens, val_segs = _pack(val_enc, seq_len, tok.eos_id, "validation", len(val_docs), tok.vocab_size)

    val_targets = val_tokens[:, 1:][val_segs[:, 1:] > 0]
    entropy = unigram_cross_entropy_nats(train_tokens[train_segs > 0], val_targets, tok.vocab_size)
    n_val_tokens = sum(len(e) for e in val_enc) + len(val_enc)  # one eos per document
    bpt = bytes_per_token((d.text for d in val_docs), n_val_tokens)
    logger.info("dataset: %d train rows, %d val rows of %d tokens; unigram %.3f nats/token; %.3f bytes/token",
                train_tokens.shape[0], val_tokens.shape[0], seq_len + 1, entropy, bpt)
    return Dataset(train_tokens_NxS=train_tokens, train_segment_ids_NxS=train_segs, val_tokens_NxS=val_tokens,
                   val_segment_ids_NxS=val_segs, tokenizer=tok, unigram_entropy_nats=entropy,
                   bytes_per_token=bpt, seq_len=seq_len, n_train_docs=len(train_docs), n_val_docs=len(val_docs))

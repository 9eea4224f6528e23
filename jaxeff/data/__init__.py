"""Text data for jaxeff: corpora, tokenizers, packing into fixed-length rows, resumable batches.

Typical use::

    ds = prepare_dataset(cfg.data, seq_len=cfg.train.seq_len, tokenizer_dir=run_dir + "/tokenizer")
    batch = ds.train_batch(step, cfg.train.batch_size, cfg.train.seed)   # tokens / segment_ids [B, S]
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
"""

from jaxeff.data.baselines import bytes_per_token, unigram_cross_entropy_nats
from jaxeff.data.corpora import Document, chunk_document, load_corpus, split_documents
from jaxeff.data.packing import (Batches, batch_at, batch_rows, check_token_ids, epoch_permutation, eval_batches,
                                 pack_documents)
from jaxeff.data.pipeline import Dataset, prepare_dataset
from jaxeff.data.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "BPETokenizer", "Batches", "ByteTokenizer", "Dataset", "Document", "Tokenizer", "batch_at", "batch_rows",
    "build_tokenizer", "bytes_per_token", "check_token_ids", "chunk_document", "epoch_permutation", "eval_batches",
    "load_corpus", "load_tokenizer", "pack_documents", "prepare_dataset", "split_documents",
    "unigram_cross_entropy_nats",
]

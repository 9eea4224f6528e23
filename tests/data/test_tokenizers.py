"""Tokenizers: exact round-trips, special-token handling, persistence and determinism."""

import json

import numpy as np
import pytest

from jaxeff.data.corpora import load_shakespeare
from jaxeff.data.tokenizers import (BPETokenizer, ByteTokenizer, Tokenizer, build_tokenizer, load_tokenizer)

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "naïve café, Ελληνικά, русский, 日本語の文章, עברית",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷 and skin tone 👍🏽",
    "",
    "   ",
    "a  \t\t b\n\n\n   \r\n\r\n  c   ",
    "\n",
    "literal <|eos|> and <|bos|> and <|pad|> markers",
    "\x00\x01 control \u200b zero-width \ufeff bom",
]

TRAIN_TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n",
    "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n",
] * 10


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXTS, 320)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    assert bpe.decode(np.asarray(ids, dtype=np.int32)) == text


def test_byte_specials_and_decode_errors():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    assert tok.decode([256, 72, 105, 257, 33]) == "Hi!"
    assert tok.decode([0xFF, 65]) == "\ufffdA"  # invalid UTF-8 is replaced, not raised
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([258])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_bpe_specials_never_come_from_text(bpe):
    assert (bpe.bos_id, bpe.eos_id) == (0, 1)
    ids = bpe.encode("<|eos|><|bos|>")
    assert bpe.eos_id not in ids and bpe.bos_id not in ids
    word = bpe.encode("To be")
    assert bpe.decode([bpe.bos_id] + word + [bpe.eos_id]) == "To be"


def test_bpe_merges_and_vocab_size(bpe):
    assert bpe.vocab_size == bpe._hf.get_vocab_size() <= 320
    assert bpe.vocab_size > 258  # merges were learned
    text = TRAIN_TEXTS[0]
    assert len(bpe.encode(text)) < 0.6 * len(text.encode("utf-8"))
    tiny = BPETokenizer.train(["abab abab"], 1000)
    assert tiny.vocab_size == tiny._hf.get_vocab_size() < 1000


def test_bpe_pad_option():
    tok = BPETokenizer.train(TRAIN_TEXTS, 300, add_pad=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.decode([2, 2] + tok.encode("sleep")) == "sleep"


def test_bpe_train_is_deterministic(bpe):
    again = BPETokenizer.train(TRAIN_TEXTS, 320)
    assert again.to_json() == bpe.to_json()
    assert again == bpe
    other = BPETokenizer.train(TRAIN_TEXTS[:3] + ["zebra quagga " * 20], 320)
    assert other != bpe


def test_bpe_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 258"):
        BPETokenizer.train(TRAIN_TEXTS, 257)


def test_encode_batch_matches_encode(bpe):
    texts = ROUND_TRIP_TEXTS + TRAIN_TEXTS[:3]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    assert ByteTokenizer().encode_batch(texts) == [ByteTokenizer().encode(t) for t in texts]


def test_save_load_bpe(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer_meta.json").read_text())
    assert meta["kind"] == "bpe" and meta["vocab_size"] == bpe.vocab_size and meta["eos_id"] == bpe.eos_id
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, BPETokenizer)
    assert loaded == bpe and loaded.vocab_size == bpe.vocab_size
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == bpe.encode(text)
    assert loaded.encode("<|eos|>") == bpe.encode("<|eos|>")  # literal specials stay text after a reload


def test_save_load_byte(tmp_path):
    ByteTokenizer().save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and isinstance(loaded, Tokenizer)
    assert loaded.encode("é") == [0xC3, 0xA9]


def test_load_errors(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_meta.json"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(ValueError, match="unknown kind 'wordpiece'"):
        load_tokenizer(tmp_path)
    other = BPETokenizer.train(TRAIN_TEXTS, 300)
    bpe.save(tmp_path / "mixed")
    other._hf.save(str(tmp_path / "mixed" / "tokenizer.json"))
    with pytest.raises(ValueError, match="mixes two tokenizers"):
        load_tokenizer(tmp_path / "mixed")


def test_build_tokenizer():
    assert isinstance(build_tokenizer("byte", [], 0), ByteTokenizer)
    tok = build_tokenizer("bpe", TRAIN_TEXTS, 300)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size <= 300
    with pytest.raises(ValueError, match="kind must be 'byte' or 'bpe'"):
        build_tokenizer("chars", TRAIN_TEXTS, 300)


def test_bpe_on_shakespeare_subset():
    plays = load_shakespeare()[:2]
    tok = BPETokenizer.train((p.text for p in plays), 1024)
    assert tok.vocab_size == 1024
    text = plays[0].text[:20_000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(text.encode("utf-8")) / len(ids) > 2.5  # a real compression, not byte fallback

"""Packing keeps every token in order with correct segment ids; batch order is a pure function."""

import numpy as np
import pytest

from jaxeff.data.packing import Batches, batch_at, epoch_permutation, eval_batches, pack_documents

EOS = 0


def test_pack_hand_example():
    tokens, segs = pack_documents([[1, 2, 3], [4, 5], [6]], seq_len=3, eos_id=EOS)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 0], [4, 5, 0, 6], [0, 0, 0, 0]])
    np.testing.assert_array_equal(segs, [[1, 1, 1, 1], [1, 1, 1, 2], [1, 0, 0, 0]])
    assert tokens.dtype == np.int32 and segs.dtype == np.int32


def test_pack_continued_document_restarts_at_segment_one():
    tokens, segs = pack_documents([[7] * 9, [8, 8]], seq_len=3, eos_id=99)
    np.testing.assert_array_equal(tokens, [[7, 7, 7, 7], [7, 7, 7, 7], [7, 99, 8, 8], [99, 99, 99, 99]])
    np.testing.assert_array_equal(segs, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 2, 2], [1, 0, 0, 0]])


def test_pack_exact_fit_has_no_padding():
    tokens, segs = pack_documents([[1, 2, 3], [4, 5, 6]], seq_len=3, eos_id=EOS)
    assert tokens.shape == (2, 4) and (segs > 0).all()


def test_pack_empty_document_is_its_own_segment():
    tokens, segs = pack_documents([[5, 5], [], [6]], seq_len=5, eos_id=EOS)
    np.testing.assert_array_equal(tokens, [[5, 5, 0, 0, 6, 0]])
    np.testing.assert_array_equal(segs, [[1, 1, 1, 2, 3, 3]])


@pytest.mark.parametrize("seq_len", [1, 4, 17, 64])
def test_pack_invariants_random(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(1, 50, size=rng.integers(0, 40)).tolist() for _ in range(30)]
    eos = 50
    tokens, segs = pack_documents(docs, seq_len=seq_len, eos_id=eos)
    n_rows, row_len = tokens.shape
    assert row_len == seq_len + 1
    stream = [t for d in docs for t in d + [eos]]
    assert n_rows == -(-len(stream) // row_len)
    flat_tokens, flat_segs = tokens.reshape(-1), segs.reshape(-1)
    # every token preserved, in order, and padding only at the very end (eos, segment 0)
    assert flat_tokens[: len(stream)].tolist() == stream
    assert (flat_segs[: len(stream)] > 0).all() and (flat_segs[len(stream):] == 0).all()
    assert (flat_tokens[len(stream):] == eos).all()
    # segment ids: 1 at each row start, +1 exactly where a new document starts within the row
    doc_starts = set(np.cumsum([0] + [len(d) + 1 for d in docs])[:-1].tolist())
    for r in range(n_rows):
        assert segs[r, 0] == 1
        for c in range(1, row_len):
            pos = r * row_len + c
            if pos >= len(stream):
                break
            assert segs[r, c] - segs[r, c - 1] == (1 if pos in doc_starts else 0), (r, c)


def test_pack_errors():
    with pytest.raises(ValueError, match=r"corpus \(5 tokens, eos included\) is smaller than one sequence of "
                                         r"seq_len\+1 = 9"):
        pack_documents([[1, 2], [3]], seq_len=8, eos_id=EOS)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        pack_documents([[1, 2]], seq_len=0, eos_id=EOS)
    with pytest.raises(ValueError, match="token_lists is empty"):
        pack_documents([], seq_len=2, eos_id=EOS)


def _rows(n_rows: int, row_len: int = 3):
    tokens = np.arange(n_rows * row_len, dtype=np.int32).reshape(n_rows, row_len)
    return tokens, tokens + 1000  # row-specific segment ids, so a tokens/segments mix-up shows


def _row_ids(batch, row_len: int = 3):
    return (batch["tokens"][:, 0] // row_len).tolist()


def test_batch_at_is_deterministic_and_pure():
    tokens, segs = _rows(50)
    first = batch_at(tokens, segs, 7, 8, seed=3)
    for step in range(20):
        batch_at(tokens, segs, step, 8, seed=3)
    again = batch_at(tokens, segs, 7, 8, seed=3)
    np.testing.assert_array_equal(first["tokens"], again["tokens"])
    np.testing.assert_array_equal(first["segment_ids"], again["segment_ids"])
    assert first["tokens"].shape == (8, 3)
    assert _row_ids(batch_at(tokens, segs, 7, 8, seed=4)) != _row_ids(first)
    # rows are whole packed rows with their own segment ids
    rows = _row_ids(first)
    np.testing.assert_array_equal(first["tokens"], tokens[rows])
    np.testing.assert_array_equal(first["segment_ids"], segs[rows])


def test_batch_at_follows_the_documented_permutation():
    tokens, segs = _rows(10)
    expected = np.concatenate([np.random.default_rng((5, e)).permutation(10) for e in range(3)])
    got = [r for s in range(7) for r in _row_ids(batch_at(tokens, segs, s, 4, seed=5))]
    assert got == expected[:28].tolist()
    assert epoch_permutation(10, 5, 1).tolist() == expected[10:20].tolist()


def test_epoch_covers_every_row_once_and_steps_are_disjoint():
    tokens, segs = _rows(40)
    batches = [_row_ids(batch_at(tokens, segs, s, 8, seed=0)) for s in range(5)]  # exactly one epoch
    flat = [r for b in batches for r in b]
    assert sorted(flat) == list(range(40))
    next_epoch = [r for s in range(5, 10) for r in _row_ids(batch_at(tokens, segs, s, 8, seed=0))]
    assert sorted(next_epoch) == list(range(40)) and next_epoch != flat  # reshuffled


def test_batches_straddling_epochs():
    tokens, segs = _rows(10)
    seq = [r for s in range(10) for r in _row_ids(batch_at(tokens, segs, s, 3, seed=1))]  # 30 positions
    for e in range(3):
        assert sorted(seq[10 * e: 10 * (e + 1)]) == list(range(10))


def test_batch_at_errors():
    tokens, segs = _rows(5)
    with pytest.raises(ValueError, match="batch_size 6 exceeds the 5 packed rows"):
        batch_at(tokens, segs, 0, 6, seed=0)
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        batch_at(tokens, segs, -1, 2, seed=0)
    with pytest.raises(ValueError, match="equal shapes"):
        batch_at(tokens, segs[:, :2], 0, 2, seed=0)


def test_batches_class_matches_batch_at():
    tokens, segs = _rows(12)
    batches = Batches(tokens, segs, batch_size=5, seed=2)
    assert batches.steps_per_epoch == 12 / 5
    for step in (0, 3, 11):
        np.testing.assert_array_equal(batches[step]["tokens"], batch_at(tokens, segs, step, 5, 2)["tokens"])
    with pytest.raises(ValueError, match="exceeds the 12 packed rows"):
        Batches(tokens, segs, batch_size=13)


def test_eval_batches_in_order_and_cycling():
    tokens, segs = _rows(5)
    batches = eval_batches(tokens, segs, batch_size=2, n_batches=4)
    assert [_row_ids(b) for b in batches] == [[0, 1], [2, 3], [4, 0], [1, 2]]
    assert all((b["segment_ids"] == b["tokens"] + 1000).all() for b in batches)
    assert [_row_ids(b) for b in eval_batches(tokens, segs, 2, 4)] == [_row_ids(b) for b in batches]
    with pytest.raises(ValueError, match="n_batches must be a positive integer"):
        eval_batches(tokens, segs, 2, 0)

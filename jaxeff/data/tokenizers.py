"""Tokenizers: a dependency-free byte tokenizer and a byte-level BPE trained with HF ``tokenizers``.

Both are lossless: ``decode(encode(text)) == text`` for every string, so losses measured in
tokens can be converted to bits per byte and samples print exactly what the model produced.
Special tokens (bos/eos) are never produced by ``encode``; they exist only as ids the data
pipeline inserts (eos after every document) so literal text such as ``"<|eos|>"`` in a corpus
cannot masquerade as a document boundary.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

META_FILE = "tokenizer_meta.json"
HF_FILE = "tokenizer.json"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def checked_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """Accepts lists, tuples and numpy/JAX arrays; rejects ids outside ``[0, vocab_size)``."""
    out = [int(i) for i in ids]
    for i in out:
        if not 0 <= i < vocab_size:
            raise ValueError(f"decode: ids: token id {i} is outside the vocabulary [0, {vocab_size})")
    return out


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: readers (other processes of a multi-host run that
    save the same tokenizer at once) never see a half-written file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class Tokenizer(abc.ABC):
    """What the rest of jaxeff relies on: ids in ``[0, vocab_size)``, bos/eos ids, persistence."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids, without bos/eos (the packer adds eos between documents)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special ids are skipped so model samples containing eos decode cleanly."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``tokenizer_meta.json`` (and ``tokenizer.json`` for BPE) into ``directory``."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts; subclasses override this with a parallel implementation."""
        return [self.encode(t) for t in texts]

    def _write_meta(self, directory: str | os.PathLike) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "format_version": 1}
        _write_atomic(path / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                                                   encoding="utf-8"))
        return path


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus bos=256 and eos=257: no training, no files, any text round-trips."""

    kind = "byte"
    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # errors='replace': a sampled model may emit byte sequences that are not valid UTF-8.
        data = bytes(i for i in checked_ids(ids, self.vocab_size) if i < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        self._write_meta(directory)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258)"


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style alphabet, no prefix space) backed by an HF ``tokenizers.Tokenizer``.

    Byte-level means every byte has a token, so there is no unknown token and decoding is exact.
    Special tokens take the first ids: ``<|bos|>`` = 0, ``<|eos|>`` = 1, and ``<|pad|>`` = 2 when
    trained with ``add_pad=True``.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        self._hf = hf_tokenizer
        # Literal "<|eos|>" in the text is encoded as ordinary bytes, never as the special id.
        self._hf.encode_special_tokens = True
        bos, eos = hf_tokenizer.token_to_id(BOS), hf_tokenizer.token_to_id(EOS)
        if bos is None or eos is None:
            raise ValueError(f"BPETokenizer: hf_tokenizer lacks the special tokens {BOS!r} and {EOS!r}")
        self.bos_id, self.eos_id = int(bos), int(eos)
        pad = hf_tokenizer.token_to_id(PAD)
        self.pad_id: int | None = None if pad is None else int(pad)
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, add_pad: bool = False) -> BPETokenizer:
        """Learns merges from ``texts``; the same texts and ``vocab_size`` always give the same vocab.

        The reported ``vocab_size`` is the size actually reached, which is smaller than requested
        when the texts run out of pairs worth merging.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        specials = [BOS, EOS] + ([PAD] if add_pad else [])
        minimum = 256 + len(specials)
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(f"BPETokenizer.train: vocab_size must be an integer >= {minimum} "
                             f"(256 byte tokens plus {len(specials)} special tokens), got {vocab_size!r}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Rust-parallel batch encoding (uses all cores unless TOKENIZERS_PARALLELISM=false)."""
        encodings = self._hf.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode(checked_ids(ids, self.vocab_size), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        path = self._write_meta(directory)
        _write_atomic(path / HF_FILE, lambda tmp: self._hf.save(str(tmp)))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory) / HF_FILE
        if not path.is_file():
            raise FileNotFoundError(f"BPETokenizer.load: directory {str(directory)!r} has no {HF_FILE}")
        return cls(HFTokenizer.from_file(str(path)))

    def to_json(self) -> str:
        """The full HF serialization; equal strings mean identical vocab and merges."""
        return self._hf.to_str()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Restores whatever ``Tokenizer.save`` wrote into ``directory``."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"load_tokenizer: directory {str(directory)!r} has no {META_FILE} "
                                f"(save a tokenizer there first)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    kind = meta.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        tok = BPETokenizer.load(directory)
        if tok.vocab_size != meta.get("vocab_size"):
            raise ValueError(f"load_tokenizer: {meta_path} says vocab_size={meta.get('vocab_size')} but "
                             f"{HF_FILE} has {tok.vocab_size}; the directory mixes two tokenizers")
        return tok
    raise ValueError(f"load_tokenizer: {meta_path} has unknown kind {kind!r}; expected 'byte' or 'bpe'")


def build_tokenizer(kind: Literal["byte", "bpe"], texts: Iterable[str] = (), vocab_size: int = 258) -> Tokenizer:
    """The tokenizer a ``DataConfig`` asks for; ``texts`` and ``vocab_size`` matter only for BPE."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise ValueError(f"build_tokenizer: kind must be 'byte' or 'bpe', got {kind!r}")

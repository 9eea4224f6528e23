"""The tokenizer stored in a GGUF file's metadata, rebuilt with Hugging Face ``tokenizers``.

llama.cpp keeps a BPE tokenizer (``tokenizer.ggml.model == 'gpt2'``) as:
  * ``tokenizer.ggml.tokens``: the vocabulary, token strings in GPT-2's byte-to-unicode alphabet
    (a space is ``'Ġ'``, a newline ``'Ċ'``), the id being the position in the list;
  * ``tokenizer.ggml.merges``: the merge rules, ``"left right"`` strings in priority order;
  * ``tokenizer.ggml.token_type``: 1 normal, 2 unknown, 3 control (special), 4 user-defined,
    5 unused, 6 byte;
  * ``tokenizer.ggml.pre``: the name of the pre-tokenizer, which llama.cpp turns into a list of
    regular expressions applied one after the other (``llama-vocab.cpp``). ``'smollm'`` (like
    ``'starcoder'``) first isolates every single digit (``\\p{N}``) and then applies GPT-2's
    regex, so ``"2024"`` is four tokens; that equals the ``Digits(individual_digits=True)`` +
    ``ByteLevel`` pre-tokenizer of SmolLM2's own ``tokenizer.json``.

:class:`GGUFTokenizer` reproduces that pipeline (each regex as an isolating ``Split``, then a
byte-level mapping without regex) and follows jaxeff's tokenizer conventions: ``encode`` never
produces special ids unless asked (literal ``"<|im_end|>"`` in a text is encoded as ordinary
pieces), ``decode`` skips special ids, and ``decode(encode(text)) == text`` for every string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from jaxeff.data.tokenizers import HF_FILE, META_FILE, Tokenizer, checked_ids
from jaxeff.io.gguf_file import gguf_value, open_gguf

# Token types of llama.cpp's vocabulary (llama_token_type / gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's split regex as llama.cpp writes it.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regexes llama.cpp applies in order (see llama-vocab.cpp).
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    **{name: (r"\p{N}", _GPT2) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                                            "minerva-7b")},
    **{name: (_GPT2,) for name in ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais")},
    **{name: (_LLAMA3,) for name in ("llama-bpe", "llama3", "smaug-bpe")},
}


def _field(reader, key: str, default=None):
    return gguf_value(reader, key, default)


class GGUFTokenizer(Tokenizer):
    """A GGUF file's BPE tokenizer: ``encode``, ``decode``, ``vocab_size``, ``bos_id``, ``eos_id``.

    ``special_ids`` are the control tokens (``<|endoftext|>``, ``<|im_start|>``, ... for
    SmolLM2); ``encode(text, special=True)`` parses them in the text (for chat prompts).
    """

    kind = "gguf"

    def __init__(self, hf_tokenizer, *, bos_id: int | None, eos_id: int | None, pre: str,
                 special_ids: Iterable[int] = (), chat_template: str | None = None, add_bos: bool = False) -> None:
        self._hf = hf_tokenizer
        self._hf.encode_special_tokens = True
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        # jaxeff's Tokenizer interface has integer bos/eos; -1 marks "the file names none".
        self.bos_id = -1 if bos_id is None else int(bos_id)
        self.eos_id = -1 if eos_id is None else int(eos_id)
        self.pre = pre
        self.special_ids = frozenset(int(i) for i in special_ids)
        self.chat_template = chat_template
        # tokenizer.ggml.add_bos_token: whether llama.cpp starts every sequence with bos (Llama 3
        # does, SmolLM2 does not). encode() never adds it; generation and perplexity honour it.
        self.add_bos = bool(add_bos) and bos_id is not None

    # --- construction -----------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> GGUFTokenizer:
        return cls.from_reader(open_gguf(path))

    @classmethod
    def from_reader(cls, reader) -> GGUFTokenizer:
        """Builds the tokenizer from an open ``gguf.GGUFReader``."""
        model = _field(reader, "tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.model: the file carries no tokenizer")
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) tokenizers are "
                             f"supported (SentencePiece 'llama' vocabularies are not)")
        tokens = _field(reader, "tokenizer.ggml.tokens")
        merges = _field(reader, "tokenizer.ggml.merges")
        if not tokens:
            raise ValueError("GGUF metadata key tokenizer.ggml.tokens is missing or empty")
        if merges is None:
            raise ValueError("GGUF metadata key tokenizer.ggml.merges is missing (a 'gpt2' tokenizer needs merges)")
        types = _field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries but tokenizer.ggml.tokens has "
                             f"{len(tokens)}")
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        bos = _field(reader, "tokenizer.ggml.bos_token_id")
        eos = _field(reader, "tokenizer.ggml.eos_token_id")
        return cls.build(tokens, merges, types, pre=pre, bos_id=bos, eos_id=eos,
                         chat_template=_field(reader, "tokenizer.chat_template"),
                         add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def build(cls, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], *, pre: str = "default",
              bos_id: int | None = None, eos_id: int | None = None, chat_template: str | None = None,
              add_bos: bool = False) -> GGUFTokenizer:
        """The tokenizer from the raw GGUF arrays (tokens, ``"a b"`` merges, token types)."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if pre not in PRE_TOKENIZER_REGEXES:
            raise ValueError(f"tokenizer.ggml.pre is {pre!r}, a pre-tokenizer jaxeff does not know; supported: "
                             f"{sorted(PRE_TOKENIZER_REGEXES)}")
        for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id)):
            if value is not None and not 0 <= int(value) < len(tokens):
                raise ValueError(f"tokenizer.ggml.{key} {int(value)} is outside the vocabulary [0, {len(tokens)})")
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)  # a duplicated string keeps its first id, as llama.cpp's lookup does
        pairs = []
        for rank, merge in enumerate(merges):
            parts = merge.split(" ")
            if len(parts) != 2:
                raise ValueError(f"tokenizer.ggml.merges[{rank}] = {merge!r} is not two symbols separated by a space")
            pairs.append((parts[0], parts[1]))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZER_REGEXES[pre]]
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        special = [i for i, t in enumerate(token_types) if t in (CONTROL, UNKNOWN)]
        user = [i for i, t in enumerate(token_types) if t == USER_DEFINED]
        if special:
            hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
        if user:
            hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
        for i in special + user:
            if hf.token_to_id(tokens[i]) != vocab[tokens[i]]:
                raise ValueError(f"GGUFTokenizer: token {tokens[i]!r} did not keep its id {i}")
        if hf.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError(f"GGUFTokenizer: rebuilt vocabulary has {hf.get_vocab_size(with_added_tokens=True)} "
                             f"tokens, the file lists {len(tokens)} (duplicated token strings?)")
        return cls(hf, bos_id=bos_id, eos_id=eos_id, pre=pre, special_ids=special, chat_template=chat_template,
                   add_bos=add_bos)

    # --- the Tokenizer interface ------------------------------------------------------------------

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Text to ids, no bos/eos added. ``special=True`` turns literal control-token strings
        (``"<|im_start|>"``) into their ids, as llama.cpp does for chat prompts."""
        if not special:
            return list(self._hf.encode(text, add_special_tokens=False).ids)
        self._hf.encode_special_tokens = False
        try:
            return list(self._hf.encode(text, add_special_tokens=False).ids)
        finally:
            self._hf.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Ids to text; control tokens are dropped unless ``skip_special=False``."""
        return self._hf.decode(checked_ids(ids, self.vocab_size), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string (byte-level alphabet: ``'Ġthe'`` for ``' the'``)."""
        return self._hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(int(i))

    def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
        """A ChatML prompt (``<|im_start|>role\\n...<|im_end|>``) ending in the assistant turn, for
        files whose chat template is ChatML (SmolLM2); raises ``ValueError`` for other templates."""
        if self.token_to_id("<|im_start|>") is None or self.token_to_id("<|im_end|>") is None:
            raise ValueError("chat_prompt: this tokenizer has no <|im_start|>/<|im_end|> tokens (not ChatML)")
        text = ""
        if system is not None:
            text += f"<|im_start|>system\n{system}<|im_end|>\n"
        text += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return ([self.bos_id] if self.add_bos else []) + self.encode(text, special=True)

    # --- persistence ------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``tokenizer_meta.json`` (kind 'gguf', plus pre / special ids) and ``tokenizer.json``."""
        path = self._write_meta(directory)
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        meta.update(pre=self.pre, special_ids=sorted(self.special_ids), chat_template=self.chat_template,
                    add_bos=self.add_bos)
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self._hf.save(str(path / HF_FILE))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GGUFTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory)
        if not (path / HF_FILE).is_file() or not (path / META_FILE).is_file():
            raise FileNotFoundError(f"GGUFTokenizer.load: directory {str(directory)!r} lacks {HF_FILE} or {META_FILE}")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if meta.get("kind") != cls.kind:
            raise ValueError(f"GGUFTokenizer.load: {path / META_FILE} has kind {meta.get('kind')!r}, not 'gguf'")
        bos, eos = meta["bos_id"], meta["eos_id"]
        return cls(HFTokenizer.from_file(str(path / HF_FILE)), bos_id=None if bos < 0 else bos,
                   eos_id=None if eos < 0 else eos, pre=meta.get("pre", "default"),
                   special_ids=meta.get("special_ids", ()), chat_template=meta.get("chat_template"),
                   add_bos=meta.get("add_bos", False))

    def __repr__(self) -> str:
        return (f"GGUFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pre={self.pre!r})")

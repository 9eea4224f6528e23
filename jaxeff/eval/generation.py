"""Text generation from a model and its tokenizer (run directories and GGUF models alike)."""

from __future__ import annotations

import os

from jaxeff.generate import generate
from jaxeff.io.gguf import load_gguf


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """Prepends bos when the file asks for it (``tokenizer.ggml.add_bos_token``; not SmolLM2)."""
    return [tokenizer.bos_id] + ids if getattr(tokenizer, "add_bos", False) else ids


# --- sampling -------------------------------------------------------------------------------------

def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0, chat: bool = False, system: str | None = None,
                  **generate_kwargs) -> str:
    """The model's continuation of ``prompt`` (the continuation only, without the prompt).

    ``temperature=0`` is greedy. With ``chat=True`` the prompt is wrapped as one ChatML user turn
    (SmolLM2-Instruct's template) and the reply is returned. Generation stops at the first
    control token (``<|im_end|>``, ``<|endoftext|>``, ...), which is not part of the text.
    """
    if chat:
        prompt_ids = tokenizer.chat_prompt(prompt, system=system)
    else:
        prompt_ids = with_bos(tokenizer, tokenizer.encode(prompt))
    if not prompt_ids:
        raise ValueError("generate_text: the prompt is empty (it encodes to no tokens)")
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   **generate_kwargs)
    new = out[len(prompt_ids):]
    stops = getattr(tokenizer, "special_ids", frozenset()) or {tokenizer.eos_id}
    for i, t in enumerate(new):
        if t in stops:
            new = new[:i]
            break
    if chat:
        return tokenizer.decode(new)
    # Decoding prompt + continuation together keeps a character split across the boundary whole.
    full, head = tokenizer.decode(prompt_ids + new), tokenizer.decode(prompt_ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)


def generate_from_gguf(path: str | os.PathLike | None, prompt: str, max_new_tokens: int = 64,
                       temperature: float = 0.0, top_k: int | None = None, seed: int = 0, *, chat: bool = False,
                       dtype: str = "float32", **generate_kwargs) -> str:
    """Loads a GGUF file (None: the bundled SmolLM2) and returns its continuation of ``prompt``
    (``generate_kwargs``, e.g. a KV-cache policy, go to :func:`jaxeff.generate`)."""
    model, tokenizer = load_gguf(path, dtype=dtype)
    return generate_text(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                         chat=chat, **generate_kwargs)

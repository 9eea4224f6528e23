"""Fixed-seed model cases whose logits and generations tests/models/test_golden.py pins.

Each case builds a model from a seed, runs a forward pass on fixed tokens (with packed
documents), and decodes greedily from ragged prompts through ``jaxeff.generate``. Only public
entry points are used, so the cases survive refactors of the internals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxeff
from jaxeff import ModelConfig, RecursionConfig

_BASE = dict(vocab_size=97, d_model=48, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)

CASES = {
    "dense_half": (dict(_BASE), None),
    "dense_interleaved_untied": (dict(_BASE, rope_style="interleaved", tie_embeddings=False, n_kv_heads=1), None),
    "mor_expert_cycle": (dict(_BASE), dict(strategy="middle_cycle", n_recursions=3, routing="expert")),
    "mor_expert_share_update": (dict(_BASE), dict(strategy="middle_cycle", n_recursions=3, routing="expert",
                                                   kv_strategy="share", kv_share_update=True,
                                                   capacities="1,0.5,0.25")),
    "mor_token_lora": (dict(_BASE), dict(strategy="middle_cycle", n_recursions=3, routing="token", lora_rank=4)),
    "recursive_sequence_share": (dict(_BASE, n_layers=4), dict(strategy="sequence", n_recursions=2,
                                                               kv_strategy="share")),
}


def _tokens():
    rng = np.random.default_rng(123)
    tokens = rng.integers(0, _BASE["vocab_size"], size=(2, 24)).astype(np.int32)
    seg = np.ones((2, 24), np.int32)
    seg[0, 10:] = 2  # two packed documents in row 0
    seg[1, 20:] = 0  # padding at the end of row 1
    return jnp.asarray(tokens), jnp.asarray(seg)


def run_case(name: str) -> dict[str, np.ndarray]:
    mkw, rkw = CASES[name]
    cfg = ModelConfig(**mkw)
    if rkw is None:
        model = jaxeff.Transformer(cfg, rngs=nnx.Rngs(7))
    else:
        model = jaxeff.RecursiveTransformer(cfg, RecursionConfig(**rkw), rngs=nnx.Rngs(7))
    tokens, seg = _tokens()
    out = {}
    logits, _ = model(tokens, segment_ids=seg)
    out["logits"] = np.asarray(logits, np.float32)
    if rkw is not None and rkw.get("routing") == "expert":
        logits_t, _ = model(tokens, segment_ids=seg, mode="threshold")
        out["logits_threshold"] = np.asarray(logits_t, np.float32)
    prompts = [[int(t) for t in tokens[0, :7]], [int(t) for t in tokens[1, :3]]]
    gen = jaxeff.generate(model, prompts, 6, temperature=0)
    out["generate"] = np.asarray([g[-9:] for g in gen], np.int32)
    return out


def run_gguf() -> dict[str, np.ndarray]:
    """SmolLM2-135M (the bundled GGUF): logits of a short prompt and a greedy continuation."""
    from jaxeff.io import load_gguf

    model, tok = load_gguf("smollm2")
    ids = tok.encode("The capital of France is")
    logits, _ = model(jnp.asarray([ids], jnp.int32))
    gen = jaxeff.generate(model, ids, 5, temperature=0)
    return {"logits_last": np.asarray(logits[0, -1], np.float32), "generate": np.asarray(gen, np.int32)}

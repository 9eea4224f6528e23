"""Quantised cache layers: they store codes and dequantise when attention reads them.

Both have the methods :func:`jaxeff.nn.cache_attend` calls (``append``, ``keys_values``,
``mask``), so a model decodes with them unchanged:

* :class:`KIVILayerKV` (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
  KV Cache", arXiv 2402.02750, section 3): asymmetric ``bits``-bit integers (min and scale per
  group, float16); keys per channel over groups of ``group`` consecutive tokens, values per token
  over groups of ``group`` channels. The newest tokens stay in full precision in a residual
  buffer; whenever more than ``residual`` of them have gathered, the oldest whole groups of
  ``group`` tokens are quantised (so ``residual`` to ``residual + group - 1`` tokens stay exact).
* :class:`BFPLayerKV` (Trukhanov & Soloveychik, 2024, "Accurate Block Quantization in LLMs with
  Outliers", arXiv 2403.20137, section 3): keys in block floating point, ``block`` channels
  sharing one 8-bit exponent, each a signed ``mantissa_bits``-bit integer; keys are written with
  their channels in the K-sort order (by the norm of W_k's columns, so each block holds channels
  of similar scale) and read back in the model's order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.ops.attention_mask import AttentionMask


# --------------------------------------------------------------------------------------------
# Bit packing and the two integer formats.


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 codes < 2**bits along the last axis, ``8 // bits`` per byte."""
    per = 8 // bits
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)
    return (c << shifts).sum(-1).astype(jnp.uint8) if per > 1 else c[..., 0]


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    per = 8 // bits
    if per == 1:
        return packed
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    out = (packed[..., None] >> shifts) & jnp.uint8(2 ** bits - 1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _f16_down(x):
    y = x.astype(jnp.float16)
    return jnp.where(y.astype(jnp.float32) > x, jnp.nextafter(y, jnp.float16(-jnp.inf)), y)


def _f16_up(x):
    y = x.astype(jnp.float16)
    return jnp.where(y.astype(jnp.float32) < x, jnp.nextafter(y, jnp.float16(jnp.inf)), y)


def asym_quantize(x: jax.Array, bits: int, axis: int):
    """Asymmetric integer quantisation with a min and a scale per slice along ``axis`` (kept as
    a size-1 axis), both float16, the min rounded down and the scale up so every element is in
    range: ``|x - dequant| <= scale / 2``. Returns (codes uint8, scale, min)."""
    xf = x.astype(jnp.float32)
    top = 2 ** bits - 1
    mn = _f16_down(xf.min(axis, keepdims=True))
    scale = _f16_up((xf.max(axis, keepdims=True) - mn.astype(jnp.float32)) / top)
    s = scale.astype(jnp.float32)
    codes = jnp.where(s > 0, jnp.round((xf - mn.astype(jnp.float32)) / jnp.where(s > 0, s, 1.0)), 0.0)
    return jnp.clip(codes, 0, top).astype(jnp.uint8), scale, mn


def asym_dequantize(codes, scale, mn):
    return codes.astype(jnp.float32) * scale.astype(jnp.float32) + mn.astype(jnp.float32)


def bfp_quantize(x: jax.Array, block: int, mantissa_bits: int):
    """Block floating point along the last axis: per block of ``block`` values a shared exponent
    ``e = floor(log2 max|x|)`` (int8) and signed ``mantissa_bits``-bit integers ``round(x / 2**(e
    - m + 2))`` clipped to ``+-(2**(m-1) - 1)``; ``|x - dequant| <= 2**(e - m + 2)``. Returns
    (codes uint8 as ``code + 2**(m-1)``, exponents int8)."""
    d = x.shape[-1]
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], d // block, block)
    amax = jnp.abs(xb).max(-1)
    e = jnp.where(amax > 0, jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))), -126.0)
    e = jnp.clip(e, -126, 127)
    step = jnp.exp2(e - mantissa_bits + 2)[..., None]
    lim = 2 ** (mantissa_bits - 1) - 1
    codes = jnp.clip(jnp.round(xb / step), -lim, lim) + 2 ** (mantissa_bits - 1)
    return codes.reshape(x.shape).astype(jnp.uint8), e.astype(jnp.int8)


def bfp_dequantize(codes, exps, block: int, mantissa_bits: int):
    d = codes.shape[-1]
    c = codes.astype(jnp.float32).reshape(*codes.shape[:-1], d // block, block) - 2 ** (mantissa_bits - 1)
    step = jnp.exp2(exps.astype(jnp.float32) - mantissa_bits + 2)[..., None]
    return (c * step).reshape(codes.shape)


# --------------------------------------------------------------------------------------------
# KIVI.


def _kivi_groups(x_BxKxNxD, bits: int, group: int):
    """Quantise whole groups of ``group`` tokens: keys per channel, values per token."""
    b, kh, n, d = x_BxKxNxD.shape
    g = x_BxKxNxD.reshape(b, kh, n // group, group, d)
    kc, ks, km = asym_quantize(g, bits, axis=3)  # per channel over the group's tokens
    return kc.reshape(b, kh, n, d), ks[:, :, :, 0], km[:, :, :, 0]


def _kivi_tokens(x_BxKxNxD, bits: int, group: int):
    b, kh, n, d = x_BxKxNxD.shape
    g = x_BxKxNxD.reshape(b, kh, n, d // group, group)
    vc, vs, vm = asym_quantize(g, bits, axis=4)  # per token over groups of channels
    return vc.reshape(b, kh, n, d), vs[..., 0], vm[..., 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KIVILayerKV:
    k_codes: jax.Array  # [B, K, Cq, D * bits / 8] uint8 (Cq: capacity rounded up to whole groups)
    k_scale: jax.Array  # [B, K, Cq / group, D] float16
    k_min: jax.Array
    v_codes: jax.Array  # [B, K, Cq, D * bits / 8]
    v_scale: jax.Array  # [B, K, Cq, D / group] float16
    v_min: jax.Array
    k_res: jax.Array  # [B, K, residual + group, D]: the full-precision tail, oldest first
    v_res: jax.Array
    positions: jax.Array  # [B, K, C]
    counts: jax.Array  # [B, K]
    n_quant: jax.Array  # [B, K]: slots 0 .. n_quant - 1 are quantised (a multiple of group)
    bits: int = dataclasses.field(default=2, metadata=dict(static=True))
    group: int = dataclasses.field(default=32, metadata=dict(static=True))
    residual: int = dataclasses.field(default=32, metadata=dict(static=True))
    read_impl: str = dataclasses.field(default="xla", metadata=dict(static=True))

    capacity = property(lambda self: self.positions.shape[2])
    n_kv_heads = property(lambda self: self.positions.shape[1])
    head_dim = property(lambda self: self.k_res.shape[3])
    valid = property(lambda self: self.positions >= 0)

    @classmethod
    def from_layer(cls, layer, *, bits: int, group: int, residual: int) -> "KIVILayerKV":
        """Quantises a full-precision layer (compact slots, as after a prefill): every whole group
        of the slots older than the last ``residual``."""
        b, kh, c = layer.positions.shape
        d = layer.k.shape[3]
        cq = -(-c // group) * group
        k = jnp.pad(layer.k, ((0, 0), (0, 0), (0, cq - c), (0, 0)))
        v = jnp.pad(layer.v, ((0, 0), (0, 0), (0, cq - c), (0, 0)))
        kc, ks, km = _kivi_groups(k, bits, group)
        vc, vs, vm = _kivi_tokens(v, bits, group)
        n_quant = jnp.maximum((layer.counts - residual) // group, 0) * group
        rb = residual + group
        idx = jnp.clip(n_quant[..., None] + jnp.arange(rb)[None, None, :], 0, c - 1)
        live = (n_quant[..., None] + jnp.arange(rb)[None, None, :]) < layer.counts[..., None]
        take = lambda x: jnp.where(live[..., None], jnp.take_along_axis(x, idx[..., None], axis=2), 0)  # noqa: E731
        return cls(k_codes=pack(kc, bits), k_scale=ks, k_min=km, v_codes=pack(vc, bits), v_scale=vs, v_min=vm,
                   k_res=take(layer.k), v_res=take(layer.v), positions=layer.positions, counts=layer.counts,
                   n_quant=n_quant.astype(jnp.int32), bits=bits, group=group, residual=residual,
                   read_impl=layer.read_impl)

    def _dequantized(self, dtype):
        g, c = self.group, self.capacity
        k = asym_dequantize(unpack(self.k_codes, self.bits), jnp.repeat(self.k_scale, g, axis=2),
                            jnp.repeat(self.k_min, g, axis=2))[:, :, :c]
        v = asym_dequantize(unpack(self.v_codes, self.bits), jnp.repeat(self.v_scale, g, axis=3),
                            jnp.repeat(self.v_min, g, axis=3))[:, :, :c]
        slot = jnp.arange(c)[None, None, :]
        in_res = (slot >= self.n_quant[..., None]) & (slot < self.counts[..., None])
        ridx = jnp.clip(slot - self.n_quant[..., None], 0, self.k_res.shape[2] - 1)
        k = jnp.where(in_res[..., None], jnp.take_along_axis(self.k_res, ridx[..., None], axis=2).astype(jnp.float32), k)
        v = jnp.where(in_res[..., None], jnp.take_along_axis(self.v_res, ridx[..., None], axis=2).astype(jnp.float32), v)
        return k.astype(dtype), v.astype(dtype)

    def keys_values(self, dtype):
        k, v = self._dequantized(dtype)
        return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    def mask(self, q_positions_BxT, *, pattern: str = "causal") -> AttentionMask:
        return AttentionMask.by_position(q_positions_BxT, self.positions, pattern=pattern)

    def append(self, k_BxTxKxD, v_BxTxKxD, positions_BxT, keep_BxT=None):
        """Appends to the full-precision tail, then quantises its oldest whole groups beyond
        ``residual`` tokens (into slots ``n_quant ..``)."""
        b, t = positions_BxT.shape
        kh, rb, g, c = self.n_kv_heads, self.k_res.shape[2], self.group, self.capacity
        keep_BxT = jnp.ones((b, t), bool) if keep_BxT is None else keep_BxT
        rank = jnp.cumsum(keep_BxT.astype(jnp.int32), axis=1) - 1
        slots = jnp.where(keep_BxT[:, None, :], self.counts[:, :, None] + rank[:, None, :], c)
        slots = jnp.where(slots < c, slots, c)
        rows, heads = jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None]
        positions = self.positions.at[rows, heads, slots].set(
            jnp.broadcast_to(positions_BxT[:, None, :], slots.shape), mode="drop")
        counts = jnp.minimum(self.counts + keep_BxT.sum(1).astype(jnp.int32)[:, None], c)
        # the tail and the new tokens, in slot order, then whole groups leave it
        n = -(-(rb + t) // g) * g
        tail_pos = jnp.where(slots < c, slots - self.n_quant[..., None], n)
        put = lambda res, new: jnp.zeros((b, kh, n) + res.shape[3:], res.dtype).at[:, :, :rb].set(res).at[  # noqa: E731
            rows, heads, tail_pos].set(jnp.swapaxes(new, 1, 2).astype(res.dtype), mode="drop")
        k_tail, v_tail = put(self.k_res, k_BxTxKxD), put(self.v_res, v_BxTxKxD)
        n_fp = counts - self.n_quant
        n_flush = jnp.maximum((n_fp - self.residual) // g, 0) * g
        kc, ks, km = _kivi_groups(k_tail, self.bits, g)
        vc, vs, vm = _kivi_tokens(v_tail, self.bits, g)
        tok = jnp.arange(n)[None, None, :]
        dest_tok = jnp.where(tok < n_flush[..., None], self.n_quant[..., None] + tok, self.k_codes.shape[2])
        grp = jnp.arange(n // g)[None, None, :]
        dest_grp = jnp.where(grp * g < n_flush[..., None], self.n_quant[..., None] // g + grp, self.k_scale.shape[2])
        sett = lambda arr, idx, new: arr.at[rows, heads, idx].set(new, mode="drop")  # noqa: E731
        k_codes = sett(self.k_codes, dest_tok, pack(kc, self.bits))
        v_codes = sett(self.v_codes, dest_tok, pack(vc, self.bits))
        k_scale, k_min = sett(self.k_scale, dest_grp, ks), sett(self.k_min, dest_grp, km)
        v_scale, v_min = sett(self.v_scale, dest_tok, vs), sett(self.v_min, dest_tok, vm)
        left = n_fp - n_flush
        src = jnp.clip(n_flush[..., None] + jnp.arange(rb)[None, None, :], 0, n - 1)
        live = jnp.arange(rb)[None, None, :] < left[..., None]
        shift = lambda x: jnp.where(live[..., None], jnp.take_along_axis(x, src[..., None], axis=2), 0)  # noqa: E731
        layer = dataclasses.replace(self, k_codes=k_codes, k_scale=k_scale, k_min=k_min, v_codes=v_codes,
                                    v_scale=v_scale, v_min=v_min, k_res=shift(k_tail), v_res=shift(v_tail),
                                    positions=positions, counts=counts, n_quant=self.n_quant + n_flush)
        return layer, slots

    def bytes_per_token(self) -> float:
        """Bytes one quantised token takes in this layer (codes, scales and mins, position)."""
        d, kh, g = self.head_dim, self.n_kv_heads, self.group
        return kh * (2 * d * self.bits / 8 + 2 * 2 * d / g + 2 * 2 * d / g + 4)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


# --------------------------------------------------------------------------------------------
# Block floating point with K-sort.


def ksort_permutation(wk_DxKxH: jax.Array, rope_style: str = "half") -> jax.Array:
    """[K, D] int32: per key/value head, the key channels in K-sort order (descending norm of
    W_k's column over d_model), moving RoPE's channel pairs together (half: i and i + D/2;
    interleaved: 2i and 2i + 1), each pair by its joint norm and adjacent in the new order, so
    a rotation never mixes two blocks."""
    d = wk_DxKxH.shape[-1]
    norms = jnp.linalg.norm(wk_DxKxH.astype(jnp.float32), axis=0)  # [K, D]
    if rope_style == "half":
        first = jnp.arange(d // 2)
        second = first + d // 2
    else:
        first = jnp.arange(0, d, 2)
        second = first + 1
    pair = jnp.sqrt(norms[:, first] ** 2 + norms[:, second] ** 2)  # [K, D/2]
    order = jnp.argsort(-pair, axis=-1, stable=True)
    perm = jnp.stack([first[order], second[order]], axis=-1).reshape(norms.shape)
    return perm.astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BFPLayerKV:
    k_codes: jax.Array  # [B, K, C, D * m / 8] uint8 (channels in ``perm`` order)
    k_exp: jax.Array  # [B, K, C, D / block] int8
    v: jax.Array  # [B, K, C, D] (or codes, with quantised values: v_codes / v_exp)
    v_exp: jax.Array | None
    perm: jax.Array  # [K, D] int32: stored channel j is the model's channel perm[j]
    positions: jax.Array
    counts: jax.Array
    block: int = dataclasses.field(default=32, metadata=dict(static=True))
    mantissa_bits: int = dataclasses.field(default=4, metadata=dict(static=True))
    head_dim_: int = dataclasses.field(default=64, metadata=dict(static=True))
    read_impl: str = dataclasses.field(default="xla", metadata=dict(static=True))

    capacity = property(lambda self: self.positions.shape[2])
    n_kv_heads = property(lambda self: self.positions.shape[1])
    head_dim = property(lambda self: self.head_dim_)
    valid = property(lambda self: self.positions >= 0)

    @classmethod
    def empty_like(cls, layer, perm: jax.Array, *, block: int, mantissa_bits: int, values: bool) -> "BFPLayerKV":
        """An empty BFP layer of ``layer``'s shape (keys stored in ``perm`` order)."""
        b, kh, c, d = layer.k.shape
        m = mantissa_bits
        codes = lambda: jnp.full((b, kh, c, d * m // 8), 0, jnp.uint8)  # noqa: E731
        exps = lambda: jnp.zeros((b, kh, c, d // block), jnp.int8)  # noqa: E731
        return cls(k_codes=codes(), k_exp=exps(), v=codes() if values else jnp.zeros_like(layer.v),
                   v_exp=exps() if values else None, perm=perm.astype(jnp.int32),
                   positions=jnp.full(layer.positions.shape, -1, jnp.int32), counts=jnp.zeros_like(layer.counts),
                   block=block, mantissa_bits=m, head_dim_=d, read_impl=layer.read_impl)

    def _encode(self, x_BxKxTxD, permute: bool):
        if permute:
            x_BxKxTxD = jnp.take_along_axis(x_BxKxTxD, self.perm[None, :, None, :], axis=-1)
        codes, exps = bfp_quantize(x_BxKxTxD, self.block, self.mantissa_bits)
        return pack(codes, self.mantissa_bits), exps

    def _decode(self, codes, exps, permute: bool):
        x = bfp_dequantize(unpack(codes, self.mantissa_bits), exps, self.block, self.mantissa_bits)
        if permute:
            inv = jnp.argsort(self.perm, axis=-1)
            x = jnp.take_along_axis(x, inv[None, :, None, :], axis=-1)
        return x

    def keys_values(self, dtype):
        k = self._decode(self.k_codes, self.k_exp, True)
        v = self.v if self.v_exp is None else self._decode(self.v, self.v_exp, False)
        return jnp.swapaxes(k, 1, 2).astype(dtype), jnp.swapaxes(v, 1, 2).astype(dtype)

    def mask(self, q_positions_BxT, *, pattern: str = "causal") -> AttentionMask:
        return AttentionMask.by_position(q_positions_BxT, self.positions, pattern=pattern)

    def append(self, k_BxTxKxD, v_BxTxKxD, positions_BxT, keep_BxT=None):
        b, t = positions_BxT.shape
        kh, c = self.n_kv_heads, self.capacity
        keep_BxT = jnp.ones((b, t), bool) if keep_BxT is None else keep_BxT
        rank = jnp.cumsum(keep_BxT.astype(jnp.int32), axis=1) - 1
        slots = jnp.where(keep_BxT[:, None, :], self.counts[:, :, None] + rank[:, None, :], c)
        rows, heads = jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None]
        put = lambda arr, new: arr.at[rows, heads, slots].set(new.astype(arr.dtype), mode="drop")  # noqa: E731
        kc, ke = self._encode(jnp.swapaxes(k_BxTxKxD, 1, 2), True)
        out = dict(k_codes=put(self.k_codes, kc), k_exp=put(self.k_exp, ke),
                   positions=put(self.positions, jnp.broadcast_to(positions_BxT[:, None, :], slots.shape)),
                   counts=jnp.minimum(self.counts + keep_BxT.sum(1).astype(jnp.int32)[:, None], c))
        if self.v_exp is None:
            out["v"] = put(self.v, jnp.swapaxes(v_BxTxKxD, 1, 2))
        else:
            vc, ve = self._encode(jnp.swapaxes(v_BxTxKxD, 1, 2), False)
            out["v"], out["v_exp"] = put(self.v, vc), put(self.v_exp, ve)
        return dataclasses.replace(self, **out), slots

    def bytes_per_token(self) -> float:
        d, kh = self.head_dim, self.n_kv_heads
        per_k = d * self.mantissa_bits / 8 + d / self.block
        per_v = per_k if self.v_exp is not None else d * self.v.dtype.itemsize
        return kh * (per_k + per_v + 4)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


def bytes_per_token(cache) -> float:
    """Bytes one token takes in the cache over all layers (the format's, for quantised layers;
    keys, values and position for full-precision ones)."""
    total = 0.0
    for layer in cache.layers:
        if hasattr(layer, "bytes_per_token"):
            total += layer.bytes_per_token()
        else:
            total += layer.n_kv_heads * (2 * layer.head_dim * layer.k.dtype.itemsize + 4)
    return total

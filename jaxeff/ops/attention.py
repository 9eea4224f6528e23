"""Causal grouped-query attention: the plain-jnp reference and the dispatch to fast paths.

Layouts: queries ``q_BxTxHxD``, keys and values ``k_BxSxKxD`` with K key/value heads shared by
H // K query heads each (GQA, Ainslie et al., 2023). Query t of row b sits at key index
``q_offset[b] + t``: 0 for a plain forward pass, the cache length when decoding, so one mask rule
(key index <= query index) serves training, prefill and decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLS = ("auto", "xla", "cudnn")


def attention_mask(t: int, s: int, *, q_offset_B: jax.Array | None = None, causal: bool = True,
                   q_segment_ids_BxT: jax.Array | None = None, kv_segment_ids_BxS: jax.Array | None = None,
                   batch: int = 1) -> jax.Array:
    """Boolean mask [B, T, S]: True where query t may attend to key s."""
    q_idx_BxT = jnp.arange(t)[None, :] + (jnp.zeros((batch,), jnp.int32) if q_offset_B is None else q_offset_B)[:, None]
    kv_idx_S = jnp.arange(s)
    mask_BxTxS = jnp.ones((q_idx_BxT.shape[0], t, s), bool)
    if causal:
        mask_BxTxS = kv_idx_S[None, None, :] <= q_idx_BxT[:, :, None]
    if q_segment_ids_BxT is not None:
        kv_seg = q_segment_ids_BxT if kv_segment_ids_BxS is None else kv_segment_ids_BxS
        mask_BxTxS = mask_BxTxS & (q_segment_ids_BxT[:, :, None] == kv_seg[:, None, :])
    return mask_BxTxS


def attention_reference(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                        q_offset_B: jax.Array | None = None, causal: bool = True,
                        segment_ids_BxT: jax.Array | None = None, kv_segment_ids_BxS: jax.Array | None = None,
                        scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale + mask) v, with scores and softmax in float32 (the oracle)."""
    b, t = q_BxTxHxD.shape[:2]
    mask_BxTxS = attention_mask(t, k_BxSxKxD.shape[1], q_offset_B=q_offset_B, causal=causal,
                                q_segment_ids_BxT=segment_ids_BxT, kv_segment_ids_BxS=kv_segment_ids_BxS, batch=b)
    return masked_attention_reference(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, scale=scale)


def masked_attention_reference(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                               mask_BxTxS: jax.Array, *, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale, where mask) v for any boolean mask [B, T, S], in float32."""
    b, t, h, d = q_BxTxHxD.shape
    kh = k_BxSxKxD.shape[2]
    if h % kh:
        raise ValueError(f"attention: query heads ({h}) must be a multiple of key/value heads ({kh})")
    scale = d ** -0.5 if scale is None else scale
    q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kh, h // kh, d)
    scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                                  preferred_element_type=jnp.float32) * scale
    # A finite fill keeps fully masked rows (padding queries) finite instead of NaN.
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
    out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD, preferred_element_type=jnp.float32)
    return out_BxTxKxGxD.reshape(b, t, h, d).astype(q_BxTxHxD.dtype)


def position_mask(q_positions_BxT: jax.Array, kv_positions_BxS: jax.Array, *, kv_valid_BxS: jax.Array | None = None,
                  q_segment_ids_BxT: jax.Array | None = None, kv_segment_ids_BxS: jax.Array | None = None
                  ) -> jax.Array:
    """Causal mask by token position rather than by index: query at position p sees the valid
    keys at positions <= p (of its own document). Serves gathered token subsets, caches whose
    slots hold arbitrary positions, and keys shared across recursions. A query that would see no
    key at all sees every key instead (its output is discarded by the caller; this keeps it
    finite on every backend)."""
    mask_BxTxS = kv_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]
    if kv_valid_BxS is not None:
        mask_BxTxS = mask_BxTxS & kv_valid_BxS[:, None, :]
    if q_segment_ids_BxT is not None:
        mask_BxTxS = mask_BxTxS & (q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :])
    return mask_BxTxS | ~mask_BxTxS.any(-1, keepdims=True)


def attention_by_position(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *,
                          q_positions_BxT: jax.Array, kv_positions_BxS: jax.Array,
                          kv_valid_BxS: jax.Array | None = None, q_segment_ids_BxT: jax.Array | None = None,
                          kv_segment_ids_BxS: jax.Array | None = None, impl: str = "auto",
                          scale: float | None = None) -> jax.Array:
    """Attention under :func:`position_mask` (cuDNN with a dense mask on GPU, else the reference)."""
    mask_BxTxS = position_mask(q_positions_BxT, kv_positions_BxS, kv_valid_BxS=kv_valid_BxS,
                               q_segment_ids_BxT=q_segment_ids_BxT, kv_segment_ids_BxS=kv_segment_ids_BxS)
    if impl not in IMPLS:
        raise ValueError(f"attention_by_position: impl must be one of {IMPLS}, got {impl!r}")
    d = q_BxTxHxD.shape[-1]
    fast = (jax.default_backend() == "gpu" and q_BxTxHxD.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0
            and d <= 256 and impl != "xla" and cudnn_mask_applies(q_BxTxHxD.shape[1], k_BxSxKxD.shape[1]))
    if not fast:
        return masked_attention_reference(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, scale=scale)

    def local(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn")

    return per_device(local, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)


def cudnn_mask_applies(t: int, s: int) -> bool:
    """cuDNN takes a dense mask (as a bias) only for even query and key lengths (jax 0.11.2
    rejects odd ones when training); gathered token subsets, e.g. MoR's top-k, can be odd."""
    return t % 2 == 0 and s % 2 == 0


def cudnn_applies(q_BxTxHxD: jax.Array, *, q_offset_B: jax.Array | None, kv_len: int | None = None) -> bool:
    """Whether cuDNN flash attention can compute this call (GPU, 16-bit, head_dim, no cache
    offset, even lengths: jax 0.11.2's cuDNN path rejects odd ones, e.g. a gathered top-k)."""
    d, t = q_BxTxHxD.shape[-1], q_BxTxHxD.shape[1]
    return (jax.default_backend() == "gpu" and q_BxTxHxD.dtype in (jnp.bfloat16, jnp.float16)
            and d % 8 == 0 and d <= 256 and q_offset_B is None
            and cudnn_mask_applies(t, t if kv_len is None else kv_len))


def attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *, impl: str = "auto",
              q_offset_B: jax.Array | None = None, causal: bool = True,
              segment_ids_BxT: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Attention through the implementation ``impl`` ('auto' picks cuDNN on GPU when it applies)."""
    if impl not in IMPLS:
        raise ValueError(f"attention: impl must be one of {IMPLS}, got {impl!r}")
    applies = cudnn_applies(q_BxTxHxD, q_offset_B=q_offset_B, kv_len=k_BxSxKxD.shape[1])
    use_cudnn = impl == "cudnn" or (impl == "auto" and applies)
    if impl == "cudnn" and not applies:
        raise ValueError("attention: impl='cudnn' needs a GPU, bf16/fp16 inputs, head_dim % 8 == 0 and <= 256, "
                         "even sequence lengths and no KV-cache offset; use impl='auto' to fall back to 'xla'")
    if not use_cudnn:
        return attention_reference(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_offset_B=q_offset_B, causal=causal,
                                   segment_ids_BxT=segment_ids_BxT, scale=scale)
    def local(q, k, v, seg):
        if seg is None:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
        return _cudnn_packed(q, k, v, seg, causal=causal, scale=scale)

    return per_device(local, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT)


def per_device(fn, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT=None):
    """Runs ``fn(q, k, v, segment_ids)`` on each device's own batch rows (and heads, under tensor
    parallelism) with ``jax.shard_map`` when a mesh is set. Attention is independent per row and
    head, so this is exact, and it keeps XLA's partitioner away from cuDNN's custom call, whose
    packed-sequence arguments it cannot split (jax 0.11.2)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    n_batch = 1
    for a in batch_axes:
        n_batch *= sizes[a]
    if q_BxTxHxD.shape[0] % n_batch:
        batch_axes = ()
    tp = sizes.get("tensor", 1)
    head_axis = "tensor" if tp > 1 and q_BxTxHxD.shape[2] % tp == 0 and k_BxSxKxD.shape[2] % tp == 0 else None
    b_spec = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    x_spec = P(b_spec, None, head_axis, None)
    seg_spec = None if segment_ids_BxT is None else P(b_spec, *([None] * (segment_ids_BxT.ndim - 1)))
    if segment_ids_BxT is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(x_spec,) * 3,
                             out_specs=x_spec, check_vma=False)(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD)
    return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec,) * 3 + (seg_spec,), out_specs=x_spec,
                         check_vma=False)(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT)


# cuDNN's packed layout treats a batch of B rows as B x M sequences of up to T tokens, and its
# backward pass keeps a float32 dQ accumulator of B x M x T x H x D: with M = 16 that buffer
# (3.2 GB per layer for the small preset at batch 32) costs more than the attention itself. So M
# is picked per batch, from the most documents any row holds, as the smallest of these tiers
# that fits (1: plain causal attention); rows with more than the last use a boolean mask.
PACKED_SEGMENT_TIERS = (1, 2, 4, 16)


def segment_offsets(segment_ids_BxT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """cuDNN's packed-sequence description of rows of contiguous documents.

    Every maximal run of equal segment ids is one sequence, padding (id 0) included, so cuDNN
    writes every output position and its backward pass never reads unwritten memory. Returns
    (offsets [B, M+1], lengths [B, M], n_segments [B]), -1 where a row has fewer than M runs.
    Built from comparisons and reductions only (no scatter), so it shards over the batch.
    """
    b, t = segment_ids_BxT.shape
    seg = segment_ids_BxT
    prev = jnp.concatenate([seg[:, :1] - 1, seg[:, :-1]], axis=1)
    is_start_BxT = seg != prev
    run_BxT = jnp.cumsum(is_start_BxT, axis=1) - 1  # index of the run each token is in
    n_segments_B = run_BxT[:, -1] + 1
    in_run_BxMxT = run_BxT[:, None, :] == jnp.arange(max_segments)[None, :, None]
    present_BxM = jnp.arange(max_segments)[None, :] < n_segments_B[:, None]
    starts_BxM = jnp.where(present_BxM, jnp.argmax(in_run_BxMxT, axis=-1), -1).astype(jnp.int32)
    lengths_BxM = jnp.where(present_BxM, in_run_BxMxT.sum(-1), -1).astype(jnp.int32)
    offsets = jnp.concatenate([starts_BxM, jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return offsets, lengths_BxM, n_segments_B


def _cudnn_packed(q, k, v, segment_ids_BxT, *, causal: bool, scale: float | None):
    """Document-masked attention without materialising a [T, S] mask: cuDNN's packed layout with
    the smallest of PACKED_SEGMENT_TIERS that holds every row's documents (one document per row:
    plain cuDNN attention), else cuDNN with a boolean mask."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention as cudnn_attention

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tiers = tuple(sorted(PACKED_SEGMENT_TIERS))

    def packed(m):
        def run(q, k, v):
            if m == 1:  # every row is one run of equal ids: the segment mask removes nothing
                return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
            offsets, lengths, _ = segment_offsets(segment_ids_BxT, m)
            return cudnn_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                   kv_offsets=offsets, scale=scale,
                                   mask_type=MaskType.PADDING_CAUSAL if causal else MaskType.PADDING)
        return run

    # Rematerialised: otherwise the [B, 1, T, S] mask is a residual of the switch, which every
    # branch must then return (zero-filled), costing a write of that size per layer and step
    # even though this fallback almost never runs.
    @jax.checkpoint
    def masked(q, k, v):
        mask = attention_mask(q.shape[1], k.shape[1], causal=causal, q_segment_ids_BxT=segment_ids_BxT,
                              batch=q.shape[0])
        if not cudnn_mask_applies(q.shape[1], k.shape[1]):
            return masked_attention_reference(q, k, v, mask, scale=scale)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn")

    branch = packed_tier(segment_ids_BxT, tiers)
    return jax.lax.switch(branch, [packed(m) for m in tiers] + [masked], q, k, v)


def packed_tier(segment_ids_BxT: jax.Array, tiers: tuple[int, ...]) -> jax.Array:
    """Index of the smallest of the ascending ``tiers`` that is >= the most runs of equal segment
    ids in any row (padding counts as a run); ``len(tiers)`` when no tier holds them."""
    seg = segment_ids_BxT
    most_runs = jnp.max(1 + jnp.sum(seg[:, 1:] != seg[:, :-1], axis=1))
    return jnp.sum(most_runs > jnp.asarray(tiers)).astype(jnp.int32)

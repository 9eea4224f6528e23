"""cuDNN flash attention on NVIDIA GPUs (through ``jax.nn.dot_product_attention``).

* index masks: cuDNN's causal flag; packed documents use cuDNN's ragged (packed-sequence) layout
  at the smallest of :data:`PACKED_SEGMENT_TIERS` that holds every row's documents;
* position masks and mask patterns (``local:W``...): a dense boolean mask.

Every call runs per device under ``jax.shard_map`` when a mesh is set (see :func:`per_device`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxeff.ops.attention_mask import AttentionMask
from jaxeff.parallel import LOGICAL_RULES


def cudnn_unsupported(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask: AttentionMask) -> str | None:
    """Why cuDNN cannot compute this call (None: it can). jax 0.11.2's cuDNN path needs a GPU,
    bf16/fp16 inputs, a head dim that is a multiple of 8 and at most 256, and even query and key
    lengths (it rejects odd ones when training; gathered token subsets, e.g. MoR's top-k, can be
    odd)."""
    d, t, s = q_BxTxHxD.shape[-1], q_BxTxHxD.shape[1], k_BxSxKxD.shape[1]
    if jax.default_backend() != "gpu":
        return f"it needs a GPU (the backend is {jax.default_backend()!r})"
    if q_BxTxHxD.dtype not in (jnp.bfloat16, jnp.float16):
        return f"it needs bf16 or fp16 inputs, got {q_BxTxHxD.dtype}"
    if d % 8 or d > 256:
        return f"it needs head_dim % 8 == 0 and <= 256, got {d}"
    if t % 2 or s % 2:
        return f"it needs even query and key lengths, got {t} and {s}"
    return None


def _cudnn(q, k, v, mask: AttentionMask, scale):
    if mask.by_index and mask.pattern == "causal":
        if not mask.segmented:
            return per_device(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=mask.causal, implementation="cudnn"), q, k, v)
        seg = mask.q_segment_ids if mask.kv_segment_ids is None else None
        if seg is not None:
            return per_device(lambda q, k, v, s: _cudnn_packed(q, k, v, s, causal=mask.causal, scale=scale),
                              q, k, v, seg)
    h, kh = q.shape[2], k.shape[2]
    dense_BxKmxTxS = mask.dense(q.shape[0], q.shape[1], k.shape[1])
    return per_device(lambda q, k, v, m: _cudnn_masked(q, k, v, m, scale=scale), q, k, v,
                      dense_BxKmxTxS if dense_BxKmxTxS.shape[1] == 1 else jnp.repeat(dense_BxKmxTxS, h // kh, axis=1))


def _cudnn_masked(q, k, v, mask_BxNxTxS, *, scale):
    return jax.nn.dot_product_attention(q, k, v, mask=mask_BxNxTxS, scale=scale, implementation="cudnn")


def per_device(fn, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, extra=None):
    """Runs ``fn(q, k, v[, extra])`` on each device's own batch rows (and heads, under tensor
    parallelism) with ``jax.shard_map`` when a mesh is set. Attention is independent per row and
    head, so this is exact, and it keeps XLA's partitioner away from cuDNN's custom call, whose
    packed-sequence arguments it cannot split (jax 0.11.2). ``extra`` is batch-leading: segment
    ids [B, T] or a mask [B, N, T, S] (N = 1 or the query heads). The mesh axes come from the
    logical rules of ``batch`` and ``heads``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD) if extra is None else fn(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, extra)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_axes = tuple(a for a in LOGICAL_RULES["batch"] if sizes.get(a, 1) > 1)
    n_batch = 1
    for a in batch_axes:
        n_batch *= sizes[a]
    if q_BxTxHxD.shape[0] % n_batch:
        batch_axes = ()
    head_axes = [a for a in LOGICAL_RULES["heads"] if sizes.get(a, 1) > 1]
    head_axis = None
    if len(head_axes) == 1 and q_BxTxHxD.shape[2] % sizes[head_axes[0]] == 0 \
            and k_BxSxKxD.shape[2] % sizes[head_axes[0]] == 0:
        head_axis = head_axes[0]
    b_spec = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    x_spec = P(b_spec, None, head_axis, None)
    if extra is None:
        return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec,) * 3, out_specs=x_spec,
                             check_vma=False)(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD)
    if extra.ndim == 4:
        extra_spec = P(b_spec, head_axis if extra.shape[1] > 1 else None, None, None)
    else:
        extra_spec = P(b_spec, *([None] * (extra.ndim - 1)))
    return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec,) * 3 + (extra_spec,), out_specs=x_spec,
                         check_vma=False)(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, extra)


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
        mask = AttentionMask.training(segment_ids_BxT, causal=causal).dense(q.shape[0], q.shape[1], k.shape[1])
        return _cudnn_masked(q, k, v, mask, scale=scale)

    branch = packed_tier(segment_ids_BxT, tiers)
    return jax.lax.switch(branch, [packed(m) for m in tiers] + [masked], q, k, v)


def packed_tier(segment_ids_BxT: jax.Array, tiers: tuple[int, ...]) -> jax.Array:
    """Index of the smallest of the ascending ``tiers`` that is >= the most runs of equal segment
    ids in any row (padding counts as a run); ``len(tiers)`` when no tier holds them."""
    seg = segment_ids_BxT
    most_runs = jnp.max(1 + jnp.sum(seg[:, 1:] != seg[:, :-1], axis=1))
    return jnp.sum(most_runs > jnp.asarray(tiers)).astype(jnp.int32)


def _register() -> None:
    from jaxeff.ops.attention_registry import AttentionImpl, register_attention_impl

    register_attention_impl(AttentionImpl("cudnn", cudnn_unsupported, _cudnn), auto_before="xla")


_register()

"""Converting a pretrained vanilla Transformer into a (Relaxed) Recursive Transformer.

Relaxed Recursive Transformers (Bae et al., 2024, arXiv 2410.20672):

* section 3.1, "initialization of looped layers": each shared block starts from the pretrained
  layers it replaces, by ``stepwise`` selection, ``average`` of its tied layers, or the ``lower``
  layers of the stack;
* section 3.2, "SVD initialization of LoRA": recursion r of shared block j gets the best rank-k
  approximation of what tying removed, R = W_original(layer at (j, r)) - W_shared_j, so the
  relaxed model starts as close to the original as its LoRA rank allows (exactly equal at full
  rank, when tied layers also share their norm scales).

Everything here works on pure-dict params (``nnx.to_pure_dict(nnx.state(model))``) in numpy: the
conversion runs once, on the host, and float32 keeps the SVD well conditioned whatever the
param dtype. :func:`convert_transformer` wraps it for nnx models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.config import ModelConfig, RecursionConfig
from jaxeff.models.recursive import RecursiveTransformer, shared_depth, sharing_map

INITS = ("stepwise", "average", "lower")
LORA_INITS = ("svd", "zero")


# ------------------------------------------------------------------------------ layer selection
def tied_layers(strategy: str, n_layers: int, n_recursions: int) -> dict[tuple[int, int], int]:
    """Vanilla layer index replaced by shared block j at recursion r, keyed by (j, r).

    The ``middle_*`` strategies keep vanilla layers 0 and L-1 unique, so their shared unrolled
    layer i is vanilla layer i + 1."""
    offset = 1 if strategy.startswith("middle_") else 0
    return {jr: offset + i for i, jr in enumerate(sharing_map(strategy, n_layers, n_recursions))}


def source_layers(init: str, strategy: str, n_layers: int, n_recursions: int) -> list[list[int]]:
    """For each shared block j, the vanilla layers whose mean initialises it (Bae et al., 2024, §3.1).

    * ``stepwise``: layers at a regular interval over the shared stack, from its bottom to its
      top layer: block j <- round(linspace(first, last, U))[j], as the official MoR/RRT code does
      (``selection_initialize``); the paper describes it as "selecting intermediate layers at
      specific intervals".
    * ``average``: the mean of exactly the layers tied to block j.
    * ``lower``: the first U layers of the shared stack, block j <- offset + j.
    """
    if init not in INITS:
        raise ValueError(f"convert_from_vanilla: init must be one of {INITS}, got {init!r}")
    offset = 1 if strategy.startswith("middle_") else 0
    n_shared = shared_depth(strategy, n_layers) // n_recursions
    if init == "stepwise":
        top = offset + shared_depth(strategy, n_layers) - 1
        return [[int(i)] for i in np.round(np.linspace(offset, top, n_shared))]
    if init == "lower":
        return [[offset + j] for j in range(n_shared)]
    tied = tied_layers(strategy, n_layers, n_recursions)
    return [[tied[j, r] for r in range(n_recursions)] for j in range(n_shared)]


# ------------------------------------------------------------------------------------ LoRA / SVD
def svd_lora_factors(residual_IxO: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A [I, rank], B [rank, O])`` with A @ B the best rank-``rank`` approximation of the
    residual (Eckart-Young; Bae et al., 2024, §3.2). sqrt(S) goes to both factors so neither
    starts orders of magnitude larger than the other. Ranks beyond min(I, O) are zero-padded:
    they add nothing, and the residual is already reproduced exactly."""
    r_IxO = np.asarray(residual_IxO, np.float32)
    u_IxK, s_K, vt_KxO = np.linalg.svd(r_IxO, full_matrices=False)
    k = min(rank, s_K.shape[0])
    root_K = np.sqrt(s_K[:k])
    a_IxR = np.zeros((r_IxO.shape[0], rank), np.float32)
    b_RxO = np.zeros((rank, r_IxO.shape[1]), np.float32)
    a_IxR[:, :k] = u_IxK[:, :k] * root_K[None, :]
    b_RxO[:k] = root_K[:, None] * vt_KxO[:k]
    return a_IxR, b_RxO


def _weight(block: dict, name: str) -> np.ndarray:
    """A block's weight by name, from whichever of its modules (attn, mlp) holds it."""
    for module in block.values():
        if isinstance(module, dict) and name in module:
            return np.asarray(module[name], np.float32)
    raise KeyError(f"no weight {name!r} in the block (modules {sorted(block)})")


def lora_names(lora_params: dict) -> list[str]:
    """The weights a block's LoRA relaxes, in its parameter order (``{name}_a`` / ``{name}_b``)."""
    return [k[:-2] for k in lora_params if k.endswith("_a")]


def _lora_block(vanilla_blocks: dict, shared_block: dict, template_lora: dict, j: int,
                tied: dict[tuple[int, int], int], n_recursions: int, lora_init: str) -> dict:
    """Block j's LoRA factors: SVD of each recursion's residual, or zero B (delta 0)."""
    out = {}
    for name in lora_names(template_lora):
        a_tmpl, b_tmpl = template_lora[f"{name}_a"], template_lora[f"{name}_b"]
        if lora_init == "zero":
            out[f"{name}_a"], out[f"{name}_b"] = a_tmpl, jnp.zeros_like(b_tmpl)
            continue
        w_shared = _weight(shared_block, name)
        fan_in, rank, fan_out = a_tmpl.shape[1], a_tmpl.shape[2], b_tmpl.shape[2]
        a_NxIxR, b_NxRxO = [], []
        for r in range(n_recursions):
            residual = _weight(_layer(vanilla_blocks, tied[j, r]), name) - w_shared
            a, b = svd_lora_factors(residual.reshape(fan_in, fan_out), rank)
            a_NxIxR.append(a)
            b_NxRxO.append(b)
        out[f"{name}_a"] = jnp.asarray(np.stack(a_NxIxR), a_tmpl.dtype)
        out[f"{name}_b"] = jnp.asarray(np.stack(b_NxRxO), b_tmpl.dtype)
    return out


# ------------------------------------------------------------------------------------ validation
def _layer(blocks: dict, l: int) -> dict:
    # Pure dicts from nnx use int keys; restored checkpoints may carry them as strings.
    return blocks[l] if l in blocks else blocks[str(l)]


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_compatible(vanilla: dict, template: dict, cfg: ModelConfig, rcfg: RecursionConfig) -> None:
    """Raises ValueError naming the first thing that differs between the two models."""
    def fail(msg):
        raise ValueError(f"convert_from_vanilla: {msg}")

    n_vanilla = len(vanilla["blocks"])
    if n_vanilla != cfg.n_layers:
        fail(f"n_layers differs: the vanilla params have {n_vanilla} blocks, model_cfg.n_layers is {cfg.n_layers}")
    for which, table in (("vanilla", vanilla["embed"]["table"]), ("template", template["embed"]["table"])):
        vocab, d_model = np.shape(table)
        if vocab != cfg.vocab_size:
            fail(f"vocab_size differs: {which} embed table has {vocab} rows, model_cfg.vocab_size is {cfg.vocab_size}")
        if d_model != cfg.d_model:
            fail(f"d_model differs: {which} embed table has width {d_model}, model_cfg.d_model is {cfg.d_model}")
    if ("lm_head" in vanilla) != ("lm_head" in template):
        fail("tie_embeddings differs: only one of the vanilla and recursive params has an lm_head")
    n_shared = shared_depth(rcfg.strategy, cfg.n_layers) // rcfg.n_recursions
    if len(template["shared"]) != n_shared:
        fail(f"the template has {len(template['shared'])} shared blocks but {rcfg.strategy!r} with "
             f"n_recursions={rcfg.n_recursions} over {cfg.n_layers} layers needs {n_shared}")
    want = _shapes(template["shared"][0])
    for l in range(n_vanilla):
        got = _shapes(_layer(vanilla["blocks"], l))
        if got != want:
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            fail(f"block shapes differ (n_heads, n_kv_heads, head_dim or d_ff?): vanilla layer {l} vs shared "
                 f"block at {diff[0]}: {got.get(diff[0])} vs {want.get(diff[0])}")


# ------------------------------------------------------------------------------------ conversion
def _cast_like(tree_np, like):
    return jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), tree_np, like)


def convert_from_vanilla(vanilla_params: dict, template_params: dict, model_cfg: ModelConfig,
                         rcfg: RecursionConfig, init: str = "stepwise", lora_init: str = "svd") -> dict:
    """RecursiveTransformer params initialised from a vanilla Transformer's (Bae et al., 2024,
    arXiv 2410.20672, §3.1-3.2).

    ``template_params`` (a fresh RecursiveTransformer's pure dict) fixes the tree and dtypes and
    supplies everything without a pretrained counterpart (routers, LoRA A under ``'zero'``).
    Copied: embed, final_norm, lm_head, and for ``middle_*`` first <- layer 0, last <- layer L-1.
    Each shared block j, every leaf including norm scales, is the mean of
    :func:`source_layers` (``init``). If the template has LoRA, ``lora_init='svd'`` sets recursion
    r's factors to the truncated SVD of W_original(tied layer) - W_shared_j at the template's rank
    (:func:`svd_lora_factors`); ``'zero'`` keeps the template's A and zeroes B. LoRA does not
    touch the norms, so full-rank SVD reproduces the vanilla model only where tied layers share
    their norm scales (true at initialisation, not after pretraining).
    """
    if init not in INITS:
        raise ValueError(f"convert_from_vanilla: init must be one of {INITS}, got {init!r}")
    if lora_init not in LORA_INITS:
        raise ValueError(f"convert_from_vanilla: lora_init must be one of {LORA_INITS}, got {lora_init!r}")
    _check_compatible(vanilla_params, template_params, model_cfg, rcfg)
    strategy, n_r, n_layers = rcfg.strategy, rcfg.n_recursions, model_cfg.n_layers
    blocks = vanilla_params["blocks"]

    out = jax.tree.map(lambda x: x, template_params)  # fresh containers; the template is untouched
    for name in ("embed", "final_norm", "lm_head"):
        if name in template_params:
            out[name] = _cast_like(vanilla_params[name], template_params[name])
    if strategy.startswith("middle_"):
        out["first"] = _cast_like(_layer(blocks, 0), template_params["first"])
        out["last"] = _cast_like(_layer(blocks, n_layers - 1), template_params["last"])

    shared_np = {}
    for j, sources in enumerate(source_layers(init, strategy, n_layers, n_r)):
        layers = [_layer(blocks, l) for l in sources]
        shared_np[j] = jax.tree.map(lambda *ws: np.mean([np.asarray(w, np.float32) for w in ws], axis=0), *layers)
        out["shared"][j] = _cast_like(shared_np[j], template_params["shared"][j])

    if "lora" in template_params:
        tied = tied_layers(strategy, n_layers, n_r)
        for j in range(len(shared_np)):
            # The residual is taken against the shared weights as stored (cast to param dtype),
            # so W_shared + A B matches the original as well as the stored precision allows.
            stored = jax.tree.map(lambda x: np.asarray(x, np.float32), out["shared"][j])
            out["lora"][j] = _lora_block(blocks, stored, template_params["lora"][j], j, tied, n_r, lora_init)
    return out


def convert_transformer(vanilla_model, rcfg: RecursionConfig, *, init: str = "stepwise",
                        lora_init: str = "svd", seed: int = 0) -> RecursiveTransformer:
    """A RecursiveTransformer with ``vanilla_model``'s config, initialised from its weights by
    :func:`convert_from_vanilla`; parameters without a vanilla counterpart (routers) keep the
    fresh values drawn from ``seed``."""
    model = RecursiveTransformer(vanilla_model.cfg, rcfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model)
    converted = convert_from_vanilla(nnx.to_pure_dict(nnx.state(vanilla_model)), nnx.to_pure_dict(state),
                                     vanilla_model.cfg, rcfg, init=init, lora_init=lora_init)
    nnx.replace_by_pure_dict(state, converted)
    nnx.update(model, state)
    return model

"""The feed-forward layer of each block, chosen per layer by the config.

``make_ffn(cfg, layer_index, rngs)`` builds the FFN of layer ``layer_index``. Every FFN module
shares one contract, ``ffn(x_BxTxD, lora=None) -> (y_BxTxD, aux)``, where ``aux`` holds auxiliary
losses (keys ``loss/...``, added to the objective) and metrics that the model collects over its
layers (:func:`merge_layer_aux`). ``lora_targets()`` names the weights a per-recursion LoRA may
relax, and the registered ``matmul_params(cfg, layer_index)`` counts what FLOP accounting needs
(the parameters each token is multiplied by), so nothing outside assumes a SwiGLU.

New kinds (mixtures of experts) register a builder with :func:`register_ffn`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.nn.mlp import SwiGLU


@dataclasses.dataclass(frozen=True)
class FFNKind:
    build: Callable[[ModelConfig, int, nnx.Rngs], nnx.Module]
    matmul_params: Callable[[ModelConfig, int], float]  # per token, averaged over tokens for sparse FFNs


def residual_std(cfg: ModelConfig) -> float:
    """Init std of the projections that write into the residual stream (GPT-2: scaled by depth)."""
    return cfg.init_std / (2 * cfg.n_layers) ** 0.5


def _swiglu(cfg: ModelConfig, layer_index: int, rngs: nnx.Rngs) -> SwiGLU:
    return SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std, out_std=residual_std(cfg), dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, rngs=rngs, fuse_gate_up=cfg.swiglu_fused)


FFN_KINDS: dict[str, FFNKind] = {
    "swiglu": FFNKind(_swiglu, lambda cfg, layer: SwiGLU.matmul_params(cfg.d_model, cfg.d_ff)),
}


def register_ffn(kind: str, build: Callable[[ModelConfig, int, nnx.Rngs], nnx.Module],
                 matmul_params: Callable[[ModelConfig, int], float]) -> None:
    FFN_KINDS[kind] = FFNKind(build, matmul_params)


def ffn_kind(cfg: ModelConfig, layer_index: int) -> str:
    """The FFN kind of a layer: the dense SwiGLU, or ``cfg.moe.kind`` on the layers a mixture of
    experts replaces (all but ``cfg.moe.dense_layers``; the kinds register from ``jaxeff.moe``)."""
    kind = cfg.moe.layer_kind(layer_index)
    return "swiglu" if kind == "dense" else kind


def make_ffn(cfg: ModelConfig, layer_index: int, rngs: nnx.Rngs) -> nnx.Module:
    kind = ffn_kind(cfg, layer_index)
    if kind not in FFN_KINDS:
        raise ValueError(f"make_ffn: unknown FFN kind {kind!r} for layer {layer_index}; known: {sorted(FFN_KINDS)}")
    return FFN_KINDS[kind].build(cfg, layer_index, rngs)


def ffn_matmul_params(cfg: ModelConfig, layer_index: int) -> float:
    return FFN_KINDS[ffn_kind(cfg, layer_index)].matmul_params(cfg, layer_index)


def merge_layer_aux(layer_auxes: list[dict]) -> dict:
    """One aux dict for the model from its layers': ``loss/...`` terms are summed over the
    layers (each is already weighted), metrics averaged over the layers that report them."""
    out: dict = {}
    counts: dict[str, int] = {}
    for aux in layer_auxes:
        for k, v in aux.items():
            out[k] = out[k] + v if k in out else v
            counts[k] = counts.get(k, 0) + 1
    return {k: (v if k.startswith("loss/") else v / counts[k]) for k, v in out.items()}

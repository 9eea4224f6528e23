"""The moe section (``model.moe``): which FFN layers are mixtures of experts, and how they route
and regularise.

Kinds: ``dense`` (the SwiGLU everywhere), ``blockffn`` (BlockFFN: Song et al., 2025, arXiv
2507.08771: a ReLU + RMSNorm router, non-gated experts, the activation-locality and
chunk-sparsification losses), ``topk`` (softmax top-k with a load-balancing and router z-loss,
dropless or with a capacity factor) and ``remoe`` (ReMoE: Wang et al., 2024, arXiv 2412.14711: a
ReLU router with an adaptive L1 penalty). ``dense_layers`` keeps chosen layers dense (the first,
say). The defaults are the papers' settings.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from jaxeff.config._checks import _check_types, _fail, _positive

MoEKind = Literal["dense", "blockffn", "topk", "remoe"]
ExpertImpl = Literal["auto", "dense", "ragged", "tokamax"]
ChunkKernel = Literal["off", "auto", "reference", "portable", "mosaic_gpu"]
MOE_KINDS = typing.get_args(MoEKind)
EXPERT_IMPLS = typing.get_args(ExpertImpl)
CHUNK_KERNELS = typing.get_args(ChunkKernel)
SPARSE_KINDS = ("blockffn", "topk", "remoe")


def _parse_layers(value) -> tuple[int, ...]:
    """'0,3' (from --set or JSON), a list, or a tuple of integral numbers -> a tuple of ints."""
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            _fail("MoEConfig", "dense_layers", f"must be comma-separated layer indices, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        _fail("MoEConfig", "dense_layers", f"must be a tuple of layer indices, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 0:
            _fail("MoEConfig", "dense_layers", f"every entry must be a layer index >= 0, got {v!r}")
        out.append(int(v))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts FFN layers (``kind != 'dense'``); every layer not in ``dense_layers``
    uses ``kind``. ``expert_dim`` is the width of one expert (0: ``d_ff // n_experts``)."""

    kind: MoEKind = "dense"
    n_experts: int = 16
    expert_dim: int = 0
    dense_layers: tuple[int, ...] = ()
    gated_experts: bool = False  # ablation: SwiGLU experts (BlockFFN's are silu(x W_up) W_down)
    router_init_std: float = 0.0  # 0: the model's init_std
    expert_impl: ExpertImpl = "auto"  # top-k expert compute: dense reference, lax.ragged_dot, tokamax
    # softmax top-k
    top_k: int = 2
    capacity_factor: float = 0.0  # 0: dropless (grouped matmul); > 0: each expert takes ceil(cf * N k / E) tokens
    balance_coef: float = 1e-2  # Switch-style load-balancing loss, per layer
    z_loss_coef: float = 1e-3  # router z-loss (ST-MoE), per layer
    # ReMoE: L1 (load-balanced) on the ReLU router output, coefficient adapted towards a sparsity
    remoe_target_sparsity: float = 0.0  # 0: 1 - top_k / n_experts (the top-k model it matches)
    remoe_lambda0: float = 1e-8
    remoe_alpha: float = 1.2
    remoe_balance: bool = True  # weight each expert's L1 by its load (ReMoE's L_reg with balancing)
    # BlockFFN's CLS-aware objectives (section 3.3)
    al_coef: float = 2e-3  # lambda_al of the activation-locality loss (0: off)
    al_alpha: float = 100.0  # sharpness of the sigmoid that stands in for the activation pattern
    cs_coef: float = 5e-2  # lambda_cs, the chunk-sparsification loss' starting coefficient (0: off)
    cs_chunk_len: int = 64
    cs_adaptive: bool = True  # adapt lambda_cs to the loss' trend (the scheduler below)
    cs_hold_steps: int = 1000  # lambda_cs stays at its start for this many steps
    cs_window: int = 100  # then it moves every cs_window steps by the ratio of window means
    cs_max_factor: float = 4.0  # lambda_cs never exceeds cs_max_factor * cs_coef
    cs_min_increase: float = 1.025  # a rising loss raises lambda_cs by at least this factor
    # inference: the chunk-sparse kernel for the union of experts a chunk of tokens activates
    chunk_kernel: ChunkKernel = "off"
    chunk_len: int = 64  # tokens per chunk of the kernel when a call has more than this many

    def __post_init__(self):
        object.__setattr__(self, "dense_layers", _parse_layers(self.dense_layers))
        _check_types(self)
        _positive(self, "n_experts", "top_k", "cs_chunk_len", "cs_window", "chunk_len")
        if self.expert_dim < 0:
            _fail("MoEConfig", "expert_dim", f"must be >= 0 (0 means d_ff // n_experts), got {self.expert_dim}")
        if self.cs_hold_steps < 0:
            _fail("MoEConfig", "cs_hold_steps", f"must be >= 0, got {self.cs_hold_steps}")
        if self.kind == "topk" and self.top_k > self.n_experts:
            _fail("MoEConfig", "top_k", f"must be <= n_experts={self.n_experts}, got {self.top_k}")
        if self.kind == "remoe" and self.top_k > self.n_experts:
            _fail("MoEConfig", "top_k", f"sets ReMoE's target sparsity 1 - top_k / n_experts and must be <= "
                  f"n_experts={self.n_experts}, got {self.top_k}")
        for name in ("capacity_factor", "balance_coef", "z_loss_coef", "al_coef", "cs_coef", "router_init_std",
                     "remoe_lambda0"):
            if getattr(self, name) < 0:
                _fail("MoEConfig", name, f"must be >= 0, got {getattr(self, name)}")
        if 0 < self.capacity_factor < 1e-3:
            _fail("MoEConfig", "capacity_factor", f"must be 0 (dropless) or a useful factor such as 1.25, "
                  f"got {self.capacity_factor}")
        if not 0.0 <= self.remoe_target_sparsity < 1.0:
            _fail("MoEConfig", "remoe_target_sparsity", f"must be in [0, 1), got {self.remoe_target_sparsity}")
        if self.remoe_alpha <= 1.0:
            _fail("MoEConfig", "remoe_alpha", f"must be > 1, got {self.remoe_alpha}")
        if self.al_alpha <= 0:
            _fail("MoEConfig", "al_alpha", f"must be > 0, got {self.al_alpha}")
        if self.cs_max_factor < 1.0:
            _fail("MoEConfig", "cs_max_factor", f"must be >= 1, got {self.cs_max_factor}")
        if self.cs_min_increase < 1.0:
            _fail("MoEConfig", "cs_min_increase", f"must be >= 1, got {self.cs_min_increase}")
        if self.chunk_kernel != "off" and self.kind != "blockffn":
            _fail("MoEConfig", "chunk_kernel", f"applies to kind='blockffn' only, got kind={self.kind!r}")
        if self.chunk_kernel != "off" and self.gated_experts:
            _fail("MoEConfig", "chunk_kernel", "computes non-gated experts; set gated_experts=false")

    @property
    def enabled(self) -> bool:
        return self.kind != "dense"

    def resolved_expert_dim(self, d_ff: int) -> int:
        return self.expert_dim or max(1, d_ff // self.n_experts)

    @property
    def resolved_target_sparsity(self) -> float:
        return self.remoe_target_sparsity or 1.0 - self.top_k / self.n_experts

    def layer_kind(self, layer_index: int) -> str:
        """'dense' or this config's kind for one layer."""
        return "dense" if not self.enabled or layer_index in self.dense_layers else self.kind

    def check_layers(self, n_layers: int) -> None:
        bad = [i for i in self.dense_layers if i >= n_layers]
        if bad:
            _fail("MoEConfig", "dense_layers", f"layer {bad[0]} does not exist in a {n_layers}-layer model")

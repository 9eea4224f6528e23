"""Mixture of experts with chunk-level sparsity: BlockFFN (Song et al., 2025, arXiv 2507.08771),
softmax top-k and ReMoE baselines, their losses, sparsity and locality metrics, adaptive loss
coefficients and expert parallelism. Pure functions first (routers, experts, losses, metrics,
schedule, parallel); :mod:`jaxeff.moe.modules` holds the NNX FFN modules and registers the kinds
``blockffn``, ``topk`` and ``remoe`` with :func:`jaxeff.nn.register_ffn` on import (the model
package imports this one, so every model build sees them)."""

from jaxeff.moe import analysis, context, experts, losses, metrics, parallel, routers, schedule
from jaxeff.moe.losses import (activation_locality_loss, chunk_sparsification_loss, load_balancing_loss,
                               remoe_l1_loss, router_z_loss)
from jaxeff.moe.metrics import cls, cls_curve, reuse_ratio, sch, srp, tls
from jaxeff.moe.modules import BlockFFN, ReMoE, TopKMoE
from jaxeff.moe.schedule import ChunkSparsityCoefficient, ReMoECoefficient, loss_schedules

__all__ = ["BlockFFN", "analysis", "ChunkSparsityCoefficient", "ReMoE", "ReMoECoefficient", "TopKMoE",
           "activation_locality_loss", "chunk_sparsification_loss", "cls", "cls_curve", "context", "experts",
           "load_balancing_loss", "loss_schedules", "losses", "metrics", "parallel", "remoe_l1_loss", "reuse_ratio",
           "router_z_loss", "routers", "sch", "schedule", "srp", "tls"]

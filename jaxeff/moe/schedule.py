"""Adaptive loss coefficients as pure functions over a small state pytree (float32 scalars).

The train step keeps one state per schedule in ``state['schedules']`` (so it is checkpointed
and resumed exactly), gives the layers ``coef(state)`` for the step, and after the step calls
``update(state, metrics)`` with the step's metrics (means over gradient-accumulation
micro-batches and over layers). :func:`loss_schedules` names the schedules a model config needs.

* :class:`ChunkSparsityCoefficient` — BlockFFN's lambda_cs (Song et al., 2025, arXiv
  2507.08771, section 3.3; ``AdaptiveLinearScheduler`` of the official code): constant for the
  first ``hold`` steps; then after every ``window`` steps ``gamma`` = mean of L_cs over the window
  just ended / mean over the window before; ``lambda *= gamma`` if ``gamma <= 1``, else
  ``lambda *= max(min_increase, gamma)``; never above ``max_factor * lambda0``. (The official code
  ramps linearly to the new value over the next window; here it steps, as the paper states.)
* :class:`ReMoECoefficient` — ReMoE's L1 coefficient (Wang et al., 2024, arXiv 2412.14711):
  after every step ``lambda *= alpha`` if the measured sparsity is below the target, else
  ``lambda /= alpha``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxeff.config import ModelConfig

CS_SCHEDULE = "moe_cs"  # the layers' chunk-sparsification coefficient
REMOE_SCHEDULE = "remoe_l1"  # ReMoE's L1 coefficient
CS_METRIC = "moe/cs_loss"  # the raw L_cs, averaged over the BlockFFN layers
SPARSITY_METRIC = "moe/remoe_sparsity"  # ReMoE's token-level sparsity, averaged over its layers


@dataclasses.dataclass(frozen=True)
class ChunkSparsityCoefficient:
    lambda0: float = 5e-2
    hold: int = 1000
    window: int = 100
    max_factor: float = 4.0
    min_increase: float = 1.025
    metric: str = CS_METRIC

    def init(self) -> dict:
        z = jnp.zeros((), jnp.float32)
        return {"coef": jnp.full((), self.lambda0, jnp.float32), "step": z, "window_sum": z, "prev_mean": z}

    def coef(self, state: dict):
        return state["coef"]

    def update(self, state: dict, metrics: dict) -> dict:
        loss = jnp.asarray(metrics[self.metric], jnp.float32)
        step = state["step"] + 1.0
        total = state["window_sum"] + loss
        boundary = jnp.mod(step, float(self.window)) == 0
        mean = total / self.window
        have_prev = state["prev_mean"] > 0
        gamma = mean / jnp.where(have_prev, state["prev_mean"], 1.0)
        factor = jnp.where(gamma <= 1.0, gamma, jnp.maximum(self.min_increase, gamma))
        moved = jnp.minimum(state["coef"] * factor, self.max_factor * self.lambda0)
        move = boundary & (step >= self.hold) & have_prev
        return {"coef": jnp.where(move, moved, state["coef"]), "step": step,
                "window_sum": jnp.where(boundary, 0.0, total),
                "prev_mean": jnp.where(boundary, mean, state["prev_mean"])}


@dataclasses.dataclass(frozen=True)
class ReMoECoefficient:
    lambda0: float = 1e-8
    alpha: float = 1.2
    target: float = 0.875
    metric: str = SPARSITY_METRIC

    def init(self) -> dict:
        return {"coef": jnp.full((), self.lambda0, jnp.float32)}

    def coef(self, state: dict):
        return state["coef"]

    def update(self, state: dict, metrics: dict) -> dict:
        sparsity = jnp.asarray(metrics[self.metric], jnp.float32)
        factor = jnp.where(sparsity < self.target, self.alpha, 1.0 / self.alpha)
        return {"coef": state["coef"] * factor}


def loss_schedules(cfg: ModelConfig, n_layers: int | None = None) -> dict:
    """The schedules the MoE layers of ``cfg`` read (empty for a dense model): ``moe_cs`` when a
    BlockFFN layer has the chunk-sparsification loss on and adaptive, ``remoe_l1`` for ReMoE."""
    moe = cfg.moe
    kinds = {moe.layer_kind(i) for i in range(n_layers or cfg.n_layers)}
    out = {}
    if "blockffn" in kinds and moe.cs_coef > 0 and moe.cs_adaptive:
        out[CS_SCHEDULE] = ChunkSparsityCoefficient(moe.cs_coef, moe.cs_hold_steps, moe.cs_window,
                                                    moe.cs_max_factor, moe.cs_min_increase)
    if "remoe" in kinds:
        out[REMOE_SCHEDULE] = ReMoECoefficient(moe.remoe_lambda0, moe.remoe_alpha, moe.resolved_target_sparsity)
    return out

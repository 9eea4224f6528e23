"""AdamW with warm-up and a cosine or warmup-stable-decay (WSD) schedule, global-norm clipping and
a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxeff.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to ``lr``, then cosine (Loshchilov & Hutter, 2017) or WSD (Hu et al., 2024,
    MiniCPM: constant, then a linear decay over the last ``wsd_decay_fraction`` of the steps)
    down to ``min_lr_ratio * lr``; or constant after warm-up."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
    rest = cfg.steps - cfg.warmup_steps
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(rest, 1), alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        decay = max(1, int(round(cfg.wsd_decay_fraction * cfg.steps)))
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])
    else:
        after = optax.constant_schedule(peak)
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def weight_decay_mask(params: Any, cfg: TrainConfig) -> Any:
    """True where weight decay applies: matrices, but not norm scales or 1-d parameters, and not
    the embedding table unless ``decay_embeddings`` (decay pulls rare tokens' rows to zero)."""
    def decide(path, leaf) -> bool:
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if leaf.ndim < 2:
            return cfg.decay_norms
        if "embed" in names and "table" in names:
            return cfg.decay_embeddings
        return True
    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: TrainConfig, params: Any) -> optax.GradientTransformation:
    chain = []
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=1e-8,
                             weight_decay=cfg.weight_decay, mask=weight_decay_mask(params, cfg)))
    return optax.chain(*chain)

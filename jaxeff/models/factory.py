"""The model a run's config describes, built for real or only as shapes."""

from __future__ import annotations

import jax
from flax import nnx

from jaxeff.config import Config
from jaxeff.models.recursive import RecursiveTransformer
from jaxeff.models.transformer import Transformer


def build_model(cfg: Config, rngs: nnx.Rngs):
    """The model a config describes: dense, or recursive / Mixture-of-Recursions."""
    if cfg.recursion.enabled:
        return RecursiveTransformer(cfg.model, cfg.recursion, rngs=rngs)
    return Transformer(cfg.model, rngs=rngs)


def abstract_model(cfg: Config):
    """graphdef and abstract state of the model, without allocating parameters."""
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(cfg.train.seed))))


def count_params(cfg: Config) -> int:
    """Exact parameter count of the model a config describes (from shapes; nothing allocated)."""
    _, abstract = abstract_model(cfg)
    return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(abstract)))

"""A relaxed recursive / MoR model from a trained dense run directory (Relaxed Recursive
Transformers, Bae et al., 2024): reads the run's latest checkpoint and converts it with
:func:`jaxeff.models.recursive_convert.convert_transformer`. It lives with the training code
because it reads training runs; the conversion itself is pure and in ``jaxeff.models``."""

from __future__ import annotations

from flax import nnx

from jaxeff.config import RecursionConfig
from jaxeff.models.recursive import RecursiveTransformer
from jaxeff.models.recursive_convert import convert_transformer
from jaxeff.train.checkpoint import restore_run


def convert_run(run_dir: str, rcfg: RecursionConfig, *, init: str = "stepwise", lora_init: str = "svd",
                seed: int = 0) -> RecursiveTransformer:
    """A RecursiveTransformer initialised from the latest checkpoint of a trained dense run
    (``jaxeff train`` output): the relaxed recursive model of Bae et al. (2024) built from a
    vanilla checkpoint, ready to uptrain or evaluate."""
    cfg, graphdef, params, _ = restore_run(run_dir)
    if cfg.recursion.enabled:
        raise ValueError(f"convert_run: {run_dir} holds a recursive model already (recursion.strategy="
                         f"{cfg.recursion.strategy!r}); conversion starts from a dense run")
    rcfg.check_depth(cfg.model.n_layers)
    return convert_transformer(nnx.merge(graphdef, params), rcfg, init=init, lora_init=lora_init, seed=seed)

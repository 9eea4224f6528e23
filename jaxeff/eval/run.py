"""Evaluating a training run directory: its latest checkpoint on the run's held-out documents."""

from __future__ import annotations

import math
import os

import jax
from flax import nnx

from jaxeff.data import eval_batches, load_tokenizer, prepare_dataset
from jaxeff.train.checkpoint import TOKENIZER_DIR, restore_run
from jaxeff.train.loop import evaluate
from jaxeff.train.step import make_eval_step


def load_run(run_dir: str):
    """(config, model with the latest intact checkpoint's parameters, tokenizer, step)."""
    cfg, graphdef, params, step = restore_run(run_dir)
    tokenizer = load_tokenizer(os.path.join(run_dir, TOKENIZER_DIR))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"{run_dir}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{cfg.model.vocab_size} (model.vocab_size): the run directory mixes two runs")
    return cfg, nnx.merge(graphdef, params), tokenizer, step


def evaluate_run(run_dir: str, batches: int = 0) -> dict:
    """Validation loss of a run's latest checkpoint, as ``jaxeff train`` evaluates it (the same
    held-out documents and batches; ``batches=0``: the run's ``eval_batches``). Non-finite
    numbers come back as None (the dict is always valid JSON)."""
    cfg, model, _, step = load_run(run_dir)
    ds = prepare_dataset(cfg.data, cfg.train.seq_len, tokenizer_dir=os.path.join(run_dir, TOKENIZER_DIR))
    graphdef, state = nnx.split(model)
    fn = jax.jit(make_eval_step(graphdef, mask_documents=cfg.train.mask_documents))
    val = eval_batches(ds.val_tokens_NxS, ds.val_segment_ids_NxS, cfg.train.batch_size,
                       batches or cfg.train.eval_batches)
    res = evaluate(fn, nnx.to_pure_dict(state), val, None)
    loss = res["val_loss"]
    finite = math.isfinite(loss)
    out = {"run_dir": run_dir, "step": step, "val_loss": loss if finite else None,
           "val_ppl": (math.exp(loss) if loss < 700 else float("inf")) if finite else None,
           "val_bpb": loss / math.log(2) / ds.bytes_per_token if finite else None,
           "unigram_nats": ds.unigram_entropy_nats, "val_tokens": res["val_tokens"]}
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

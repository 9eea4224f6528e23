"""The functional training step (the Flax NNX performance-guide pattern).

The model lives as ``graphdef`` (static structure) plus a pure dict of parameters; the step is a
plain ``jax.jit`` function that merges them, computes the loss, and returns a new state with the
input buffers donated. A step whose loss, gradient, updated parameters or updated optimizer state
is not finite (a NaN batch, or a finite gradient times an overflowing learning rate) leaves the
parameters and optimizer untouched and records its step number in ``state['nonfinite_step']``,
so no NaN ever reaches a checkpoint and the loop can stop with the exact step.

Adaptive loss coefficients (``schedules``, e.g. :func:`jaxeff.moe.loss_schedules`) keep their
state in ``state['schedules']``: the step hands their coefficients to the layers
(:func:`jaxeff.moe.context.batch_context`, with the batch's segment ids) and updates them from
the step's metrics, so they are checkpointed and resume exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxeff.moe.context import batch_context
from jaxeff.ops import cross_entropy, next_token_mask

AUX_LOSS_PREFIX = "loss/"  # aux entries with this prefix are added to the training objective
STATE_DELTAS = "state_deltas"  # aux entry: a pytree of additions to parameters outside the gradient


def add_state_deltas(params: dict, deltas: dict) -> dict:
    """``params`` with each leaf of the nested dict ``deltas`` added at the same path (e.g. the
    loss-free balancing bias of a token-choice router, which no gradient moves)."""
    out = dict(params)
    for k, d in deltas.items():
        out[k] = add_state_deltas(params[k], d) if isinstance(d, dict) else params[k] + d.astype(params[k].dtype)
    return out


def init_state(params: Any, tx: optax.GradientTransformation, schedules: dict | None = None) -> dict:
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "nonfinite_step": jnp.full((), -1, jnp.int32)}
    if schedules:
        state["schedules"] = {name: s.init() for name, s in schedules.items()}
    return state


def all_finite(*trees) -> jax.Array:
    """One boolean: every floating-point leaf of ``trees`` is finite (one fused reduction)."""
    leaves = [x for t in trees for x in jax.tree.leaves(t)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def _split_batch(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    tokens_BxS, seg_BxS = batch["tokens"], batch["segment_ids"]
    return tokens_BxS[:, :-1], tokens_BxS[:, 1:], seg_BxS[:, :-1], next_token_mask(seg_BxS)


def model_loss(graphdef, params, batch: dict, *, mask_documents: bool, denominator: jax.Array | None = None,
               coefs: dict | None = None):
    """Summed next-token NLL (divided by ``denominator`` when given) plus aux losses, and metrics.
    ``coefs``: the scheduled loss coefficients of this step, for the layers that read them."""
    model = nnx.merge(graphdef, params)
    inputs_BxT, targets_BxT, seg_BxT, mask_BxT = _split_batch(batch)
    with batch_context(segment_ids=seg_BxT, coefs=coefs):
        logits_BxTxV, aux = model(inputs_BxT, segment_ids=seg_BxT if mask_documents else None)
    mean_nll, count = cross_entropy(logits_BxTxV, targets_BxT, mask_BxT)
    nll_sum = mean_nll * count
    loss = nll_sum / (count if denominator is None else denominator)
    for k, v in aux.items():
        if k.startswith(AUX_LOSS_PREFIX):
            loss = loss + v
    return loss, {"nll_sum": nll_sum, "tokens": count, **aux}


def make_train_step(graphdef, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    mask_documents: bool = True, schedules: dict | None = None
                    ) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Returns ``step(state, batch) -> (state, metrics)`` (not yet jitted). ``schedules``: name ->
    adaptive coefficient (``init()``, ``coef(s)``, ``update(s, metrics)``; the state must come from
    ``init_state(..., schedules)``); without them MoE layers use their starting coefficients."""
    schedules = dict(schedules or {})

    def step(state: dict, batch: dict):
        params = state["params"]
        coefs = {n: s.coef(state["schedules"][n]) for n, s in schedules.items()} or None
        total_tokens = jnp.maximum(next_token_mask(batch["segment_ids"]).sum().astype(jnp.float32), 1.0)
        grad_fn = jax.value_and_grad(model_loss, argnums=1, has_aux=True)
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(graphdef, params, batch, mask_documents=mask_documents,
                                             denominator=total_tokens, coefs=coefs)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(carry, mb):
                (l, m), g = grad_fn(graphdef, params, mb, mask_documents=mask_documents, denominator=total_tokens,
                                    coefs=coefs)
                acc_g, acc_l, acc_m = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + l,
                        jax.tree.map(jnp.add, acc_m, m)), None

            zeros_g = jax.tree.map(jnp.zeros_like, params)
            (_, m0_shape) = jax.eval_shape(lambda: grad_fn(graphdef, params, jax.tree.map(lambda x: x[0], micro),
                                                           mask_documents=mask_documents,
                                                           denominator=total_tokens, coefs=coefs))[0]
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0_shape)
            (grads, loss, metrics), _ = jax.lax.scan(body, (zeros_g, jnp.zeros((), jnp.float32), zeros_m), micro)
            # Aux losses were added once per micro-batch; report their mean, like the metrics.
            metrics = {k: (v if k in ("nll_sum", "tokens") else jax.tree.map(lambda x: x / grad_accum, v))
                       for k, v in metrics.items()}
        deltas = metrics.pop(STATE_DELTAS, None)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if deltas is not None:
            new_params = add_state_deltas(new_params, deltas)
        # The update itself is checked too: a finite gradient times an infinite (overflowed)
        # learning rate gives NaN parameters and Adam moments with a finite loss and gradient.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params, new_opt)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "nonfinite_step": jnp.where((state["nonfinite_step"] < 0) & ~ok, state["step"], state["nonfinite_step"]),
        }
        out = {"loss": metrics["nll_sum"] / jnp.maximum(metrics["tokens"], 1.0), "objective": loss,
               "grad_norm": grad_norm, "tokens": metrics["tokens"]}
        if schedules:
            missing = [f"{n!r} reads {s.metric!r}" for n, s in schedules.items() if s.metric not in metrics]
            if missing:
                raise ValueError(f"make_train_step: the model does not report what its schedules follow "
                                 f"({', '.join(missing)})")
            new_sched = {n: s.update(state["schedules"][n], metrics) for n, s in schedules.items()}
            new_state["schedules"] = keep(new_sched, state["schedules"])
            out.update({f"sched/{n}": c for n, c in coefs.items()})
        out.update({k: v for k, v in metrics.items() if k not in ("nll_sum", "tokens")})
        return new_state, out

    return step


def make_eval_step(graphdef, *, mask_documents: bool = True) -> Callable[[Any, dict], dict]:
    """Returns ``eval_step(params, batch) -> {'nll_sum', 'tokens'}`` (not yet jitted)."""

    def eval_step(params, batch):
        _, metrics = model_loss(graphdef, params, batch, mask_documents=mask_documents)
        return {"nll_sum": metrics["nll_sum"], "tokens": metrics["tokens"]}

    return eval_step

"""Mixture-of-Recursions routers (Bae et al., 2025, arXiv 2507.10524, section 2.2.1), as NNX
modules over the routing maths of :mod:`jaxeff.ops.routing`.

Expert-choice: recursion step r has its own linear router (no bias, N(0, init_std^2)); its gate is
``alpha * sigmoid(logit)`` (or tanh / softmax). In training each step keeps the top
``k_r = max(1, int(c_r T))`` of the tokens the previous step kept (hierarchical filtering);
that choice looks at the whole sequence, so an auxiliary BCE loss teaches the logits to predict
it, and at inference a token continues iff ``sigmoid(logit) >= 0.5`` (optionally the decision
comes from a separate router trained on stop-gradient inputs).

Token-choice: one router over the N_r depths at the start; token t runs ``argmax`` recursions,
balanced by a loss or by the loss-free bias update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig, RecursionConfig
from jaxeff.ops import routing


class ExpertChoiceRouter(nnx.Module):
    def __init__(self, cfg: ModelConfig, rcfg: RecursionConfig, *, rngs: nnx.Rngs):
        shape = (rcfg.n_recursions, cfg.d_model)
        std = cfg.init_std
        self.w = nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), logical_axes=(None, "embed"))
        self.aux_w = (nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                                logical_axes=(None, "embed")) if rcfg.aux_router else None)
        self.func, self.alpha = rcfg.router_func, rcfg.router_alpha

    def logits(self, step: int, x_BxNxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(gating logits, deciding logits): the same unless an auxiliary router decides, which
        reads stop-gradient inputs so that its training leaves the model untouched."""
        x = x_BxNxD.astype(jnp.float32)
        logit_BxN = jnp.einsum("bnd,d->bn", x, self.w[step])
        if self.aux_w is None:
            return logit_BxN, logit_BxN
        return logit_BxN, jnp.einsum("bnd,d->bn", jax.lax.stop_gradient(x), self.aux_w[step])

    def gate(self, logit_BxN: jax.Array) -> jax.Array:
        return routing.router_gate(logit_BxN, self.func, self.alpha)


class TokenChoiceRouter(nnx.Module):
    def __init__(self, cfg: ModelConfig, rcfg: RecursionConfig, *, rngs: nnx.Rngs):
        n = rcfg.n_recursions
        self.w = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, n), jnp.float32),
                           logical_axes=("embed", None))
        # Loss-free balancing (Wang et al., 2024): a bias that only moves the choice. It gets no
        # gradient (argmax) and is 1-d, so AdamW leaves it alone; the train step adds the update
        # the model reports under aux['state_deltas'].
        self.bias = nnx.Param(jnp.zeros((n,), jnp.float32), logical_axes=(None,))
        self.rcfg = rcfg

    def route(self, x_BxTxD: jax.Array, valid_BxT: jax.Array):
        """(depth [B, T] in 1..N_r, gate [B, T], aux dict)."""
        rc = self.rcfg
        logits_BxTxR = jnp.einsum("btd,dr->btr", x_BxTxD.astype(jnp.float32), self.w[...])
        bias = self.bias[...] if rc.balance == "loss_free" else None
        depth_BxT, gate_BxT, probs_BxTxR = routing.token_choice_route(logits_BxTxR, bias)
        load_R = routing.depth_load(depth_BxT, rc.n_recursions, valid_BxT)
        aux = {"mor/max_violation": routing.max_violation(load_R),
               "mor/assignment_entropy": routing.assignment_entropy(load_R)}
        for i in range(rc.n_recursions):
            aux[f"mor/load_depth{i + 1}"] = load_R[i]
        if rc.balance == "loss":
            bal = routing.balancing_loss(probs_BxTxR, depth_BxT, valid_BxT)
            aux["mor/balance_loss"] = bal
            aux["loss/balance"] = rc.balance_coef * bal
        else:
            aux["state_deltas"] = {"router": {"bias": routing.loss_free_bias_update(self.bias[...], load_R,
                                                                                     rc.bias_update_rate)}}
        if rc.z_loss_coef:
            lse_BxT = jax.nn.logsumexp(logits_BxTxR, axis=-1)
            z = jnp.where(valid_BxT, lse_BxT ** 2, 0.0).sum() / jnp.maximum(valid_BxT.sum(), 1)
            aux["mor/z_loss"] = z
            aux["loss/router_z"] = rc.z_loss_coef * z
        return depth_BxT, gate_BxT, aux


def expert_step_aux(step: int, logit_BxN, decide_logit_BxN, selected_BxN, valid_BxN, rcfg: RecursionConfig) -> dict:
    """Router losses and metrics of one expert-choice step whose top-k choice is ``selected``.

    The paper's two ways of making the top-k choice causal at inference are alternatives
    (section 2.2.1): the auxiliary router (``aux_router``: its own weights on stop-gradient
    inputs, trained with the BCE at weight 1; it decides at inference and leaves the model
    untouched), or the auxiliary loss on the gating router itself (BCE at ``aux_loss_coef``)."""
    aux = {f"mor/sampling_acc_r{step + 1}": routing.sampling_accuracy(decide_logit_BxN, selected_BxN,
                                                                         rcfg.router_func, valid_BxN)}
    if rcfg.aux_router:
        bce = routing.topk_bce_loss(decide_logit_BxN, selected_BxN, valid_BxN)
        aux[f"mor/router_bce_r{step + 1}"] = bce
        aux[f"loss/aux_router_r{step + 1}"] = bce
    elif rcfg.aux_loss_coef:
        bce = routing.topk_bce_loss(logit_BxN, selected_BxN, valid_BxN)
        aux[f"mor/router_bce_r{step + 1}"] = bce
        aux[f"loss/router_bce_r{step + 1}"] = rcfg.aux_loss_coef * bce
    if rcfg.z_loss_coef:
        z_BxN = jnp.where(valid_BxN, logit_BxN, 0.0) ** 2  # the mean runs over valid tokens, like the BCE
        aux[f"loss/router_z_r{step + 1}"] = rcfg.z_loss_coef * z_BxN.sum() / jnp.maximum(valid_BxN.sum(), 1)
    return aux

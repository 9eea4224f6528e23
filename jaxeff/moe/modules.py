"""The MoE FFN modules, drop-in replacements for the dense SwiGLU of any jaxeff model.

Each follows the FFN contract of :mod:`jaxeff.nn.ffn`, ``ffn(x_BxTxD, lora=None) -> (y, aux)``,
on the hidden state after the pre-FFN RMSNorm, and registers its kind with
:func:`jaxeff.nn.register_ffn` (``model.moe.kind`` picks it per layer). ``aux`` holds:

* ``loss/moe_*`` terms, already weighted, that the model sums over its layers: BlockFFN's
  activation-locality and chunk-sparsification losses and ReMoE's L1 are divided by the number
  of MoE layers (the official codes average them over layers); top-k's balance and z-losses
  are per layer (Switch / ST-MoE);
* metrics, averaged over the layers: ``moe/tls``, ``moe/cls8`` (of every kind), the raw losses
  (``moe/cs_loss``, which BlockFFN's adaptive coefficient follows; ``moe/remoe_sparsity``, which
  ReMoE's does), ``moe/dropped`` (capacity top-k); under ``batch_context(record=True)`` also the
  dense activations ``moe/act/<layer>`` ``[B, T, E]`` (top-k: its gates scattered over the experts).

The coefficients the train step adapts come from :func:`jaxeff.moe.context.coefficient`, and the
packed documents from :func:`jaxeff.moe.context.segment_ids`. With a mesh whose ``expert`` axis
is larger than one, the experts run expert-parallel (:mod:`jaxeff.moe.parallel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.moe import context, experts, losses, metrics, parallel, routers
from jaxeff.moe.schedule import CS_SCHEDULE, REMOE_SCHEDULE
from jaxeff.nn.ffn import register_ffn, residual_std
from jaxeff.nn.params import param


def n_moe_layers(cfg: ModelConfig) -> int:
    return max(1, sum(cfg.moe.layer_kind(i) != "dense" for i in range(cfg.n_layers)))


def matmul_params(cfg: ModelConfig, layer_index: int) -> float:
    """Multiply-accumulate parameters per token: the router plus ``top_k`` experts. For the ReLU
    routers (BlockFFN, ReMoE) ``top_k`` is the budget they are matched to; what they really
    activate is logged as ``moe/tls``."""
    moe = cfg.moe
    f = moe.resolved_expert_dim(cfg.d_ff)
    per_expert = (3 if moe.gated_experts else 2) * cfg.d_model * f
    return cfg.d_model * moe.n_experts + moe.top_k * per_expert


class _MoEFFN(nnx.Module):
    """Router weight ``w_router [D, E]`` and the expert weights ``w_up [E, D, F]``, ``w_down
    [E, F, D]`` (``w_gate`` too for gated experts), with the logical axes expert parallelism
    shards (``expert``)."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rngs: nnx.Rngs):
        moe = cfg.moe
        d, e, f = cfg.d_model, moe.n_experts, moe.resolved_expert_dim(cfg.d_ff)
        pd = cfg.param_dtype
        self.w_router = param(rngs, (d, e), ("embed", None), std=moe.router_init_std or cfg.init_std, dtype="float32")
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std=cfg.init_std, dtype=pd)
        self.w_gate = (param(rngs, (e, d, f), ("expert", "embed", "mlp"), std=cfg.init_std, dtype=pd)
                       if moe.gated_experts else None)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std=residual_std(cfg), dtype=pd)
        self.cfg, self.layer_index = cfg, layer_index

    def lora_targets(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """The router and the expert weights (an expert weight as the matrix of its first two dims)."""
        names = ("w_router", "w_up", "w_down") + (("w_gate",) if self.w_gate is not None else ())
        return {n: (getattr(self, n).shape, 1 if n == "w_router" else 2) for n in names}

    def weight(self, name: str, lora: dict | None = None) -> jax.Array | None:
        p = getattr(self, name)
        if p is None:
            return None
        w = p[...]
        if lora is not None and name in lora:
            w = w + lora[name].astype(w.dtype)
        return w if name == "w_router" else w.astype(jnp.dtype(self.cfg.dtype))

    def _batch(self, x_BxTxD):
        seg = context.segment_ids(x_BxTxD.shape[:2])
        return seg, (None if seg is None else seg != 0)

    def _dense_mixture(self, x_BxTxD, a_BxTxE, lora):
        """``sum_e a_e E_e(x)`` over all experts (expert-parallel under a mesh with an expert axis)."""
        w = [self.weight(n, lora) for n in ("w_up", "w_down", "w_gate")]
        if parallel.expert_axis_size() > 1:
            return parallel.ep_dense_experts(x_BxTxD, a_BxTxE, *w)
        b, t, d = x_BxTxD.shape
        return experts.dense_experts(x_BxTxD.reshape(b * t, d), a_BxTxE.reshape(b * t, -1), *w).reshape(b, t, d)

    def _metrics(self, a_BxTxE, valid_BxT) -> dict:
        a = jax.lax.stop_gradient(a_BxTxE)
        out = {"moe/tls": metrics.tls(a, valid_BxT), "moe/cls8": metrics.cls(a, 8, valid_BxT)}
        if context.recording():
            out[f"moe/act/{self.layer_index}"] = a.astype(jnp.float32)
        return out


class BlockFFN(_MoEFFN):
    """BlockFFN (Song et al., 2025, arXiv 2507.08771): the ReLU + RMSNorm router
    (:func:`jaxeff.moe.routers.blockffn_router`, per-expert gain ``router_gain [E]``), non-gated
    experts, ``y = sum_i A_i E_i(x)``, and the CLS-aware losses of section 3.3. With
    ``moe.chunk_kernel`` the experts run through the chunk-sparse kernel (each chunk of tokens
    computes the union of its experts; gradients from the dense path)."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rngs: nnx.Rngs):
        super().__init__(cfg, layer_index, rngs)
        self.router_gain = param(rngs, (cfg.moe.n_experts,), (None,), std=None, dtype="float32")

    def __call__(self, x_BxTxD: jax.Array, lora: dict | None = None) -> tuple[jax.Array, dict]:
        cfg, moe = self.cfg, self.cfg.moe
        dt = jnp.dtype(cfg.dtype)
        x = x_BxTxD.astype(dt)
        seg, valid = self._batch(x)
        a0, a1, a = routers.blockffn_router(x, self.weight("w_router", lora), self.router_gain[...], eps=cfg.norm_eps)
        if moe.chunk_kernel != "off" and parallel.expert_axis_size() == 1:
            y = experts.chunk_sparse_experts(x, a, self.weight("w_up", lora), self.weight("w_down", lora),
                                             chunk_len=moe.chunk_len, impl=moe.chunk_kernel)
        else:
            y = self._dense_mixture(x, a, lora)
        aux = self._metrics(a, valid)
        n = n_moe_layers(cfg)
        if moe.al_coef > 0:
            al = losses.activation_locality_loss(a0, segment_ids_BxT=seg, alpha=moe.al_alpha)
            aux["moe/al_loss"] = al
            aux["loss/moe_al"] = moe.al_coef * al / n
        if moe.cs_coef > 0:
            cs = losses.chunk_sparsification_loss(a1, chunk_len=moe.cs_chunk_len, valid_BxT=valid)
            coef = context.coefficient(CS_SCHEDULE, moe.cs_coef) if moe.cs_adaptive else moe.cs_coef
            aux["moe/cs_loss"] = cs
            aux["loss/moe_cs"] = jax.lax.stop_gradient(coef) * cs / n
        return y.astype(dt), aux


class TopKMoE(_MoEFFN):
    """Softmax top-k MoE with the Switch load-balancing loss and the router z-loss: dropless
    (grouped matmul over the experts' token groups: ``jax.lax.ragged_dot``, or tokamax's
    ``ragged_dot`` on a GPU when installed) or, with ``moe.capacity_factor > 0``, fixed expert
    buffers that drop the overflow. ``moe.expert_impl='dense'`` computes every expert (the
    reference)."""

    def __call__(self, x_BxTxD: jax.Array, lora: dict | None = None) -> tuple[jax.Array, dict]:
        cfg, moe = self.cfg, self.cfg.moe
        dt = jnp.dtype(cfg.dtype)
        x = x_BxTxD.astype(dt)
        b, t, d = x.shape
        _, valid = self._batch(x)
        logits = routers.router_logits(x, self.weight("w_router", lora))
        gates, chosen, probs = routers.topk_route(logits, moe.top_k)
        w = [self.weight(n, lora) for n in ("w_up", "w_down", "w_gate")]
        aux: dict = {}
        if parallel.expert_axis_size() > 1:
            y, kept = parallel.ep_topk_experts(x, gates, chosen, *w, capacity_factor=moe.capacity_factor)
            if moe.capacity_factor > 0:
                aux["moe/dropped"] = 1.0 - jnp.mean(kept.astype(jnp.float32))
        else:
            xf, g, c = x.reshape(b * t, d), gates.reshape(b * t, -1), chosen.reshape(b * t, -1)
            if moe.capacity_factor > 0:
                cap = experts.expert_capacity(b * t, moe.top_k, moe.n_experts, moe.capacity_factor)
                y, kept = experts.capacity_experts(xf, g, c, *w, capacity=cap)
                aux["moe/dropped"] = 1.0 - jnp.mean(kept.astype(jnp.float32))
            elif moe.expert_impl == "dense":
                y = experts.dense_experts(xf, routers.gates_to_dense(g, c, moe.n_experts), *w)
            else:
                y = experts.ragged_experts(xf, g, c, *w, impl=moe.expert_impl)
            y = y.reshape(b, t, d)
        flat_valid = None if valid is None else valid.reshape(-1)
        bal = losses.load_balancing_loss(probs.reshape(b * t, -1), chosen.reshape(b * t, -1), flat_valid)
        z = losses.router_z_loss(logits.reshape(b * t, -1), flat_valid)
        aux.update(self._metrics(routers.gates_to_dense(gates, chosen, moe.n_experts), valid))
        aux.update({"moe/balance_loss": bal, "moe/z_loss": z})
        if moe.balance_coef > 0:
            aux["loss/moe_balance"] = moe.balance_coef * bal
        if moe.z_loss_coef > 0:
            aux["loss/moe_z"] = moe.z_loss_coef * z
        return y.astype(dt), aux


class ReMoE(_MoEFFN):
    """ReMoE (Wang et al., 2024, arXiv 2412.14711): ``y = sum_e ReLU(x W_r)_e E_e(x)``, with the
    L1 penalty (load-balanced by default) whose coefficient the train step adapts towards the
    target sparsity ``1 - top_k / n_experts``."""

    def __call__(self, x_BxTxD: jax.Array, lora: dict | None = None) -> tuple[jax.Array, dict]:
        cfg, moe = self.cfg, self.cfg.moe
        dt = jnp.dtype(cfg.dtype)
        x = x_BxTxD.astype(dt)
        b, t, _ = x.shape
        _, valid = self._batch(x)
        _, gates = routers.remoe_router(x, self.weight("w_router", lora))
        y = self._dense_mixture(x, gates, lora)
        flat_valid = None if valid is None else valid.reshape(-1)
        l1 = losses.remoe_l1_loss(gates.reshape(b * t, -1), top_k=moe.top_k, balance=moe.remoe_balance,
                                  valid_N=flat_valid)
        coef = context.coefficient(REMOE_SCHEDULE, moe.remoe_lambda0)
        aux = self._metrics(gates, valid)
        aux.update({"moe/remoe_l1": l1, "moe/remoe_sparsity": aux["moe/tls"],
                    "loss/moe_remoe_l1": jax.lax.stop_gradient(coef) * l1 / n_moe_layers(cfg)})
        return y.astype(dt), aux


KINDS = {"blockffn": BlockFFN, "topk": TopKMoE, "remoe": ReMoE}

for _kind, _cls in KINDS.items():
    register_ffn(_kind, lambda cfg, layer, rngs, _cls=_cls: _cls(cfg, layer, rngs), matmul_params)

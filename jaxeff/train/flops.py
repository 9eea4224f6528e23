"""Model FLOPs per token and utilisation: achieved model FLOPs over the devices' peak dense
bf16 rate.

FLOPs follow the PaLM appendix-B convention: 6 x (matmul parameters each token passes
through, LM head included, input embedding excluded) plus 12 x n_heads x head_dim x seq_len
per layer for attention scores and values (no discount for the causal mask, as in PaLM and
MaxText's MFU). Each layer's FFN reports its own matmul parameters
(:func:`jaxeff.nn.ffn_matmul_params`), so sparse FFNs count what a token really uses.
"""

from __future__ import annotations

import jax

from jaxeff.config import Config, ModelConfig, RecursionConfig
from jaxeff.models.recursive import shared_block_layers
from jaxeff.nn.ffn import ffn_matmul_params

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' datasheets, in FLOP/s.
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM; PCIe parts are lower (756e12) and are named "H100 PCIe"
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPUs)."""
    device = device or jax.devices()[0]
    kind = device.device_kind
    best = None
    for name, peak in PEAK_BF16_FLOPS.items():
        if name in kind and (best is None or len(name) > len(best[0])):
            best = (name, peak)
    return None if best is None else best[1]


def mfu(flops_per_token: float, tokens_per_second: float, n_devices: int, peak: float | None) -> float | None:
    if peak is None:
        return None
    return flops_per_token * tokens_per_second / (peak * n_devices)


def _attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """(query + output, key + value) projection parameters of one layer."""
    d, hd = cfg.d_model, cfg.resolved_head_dim
    return 2 * d * cfg.n_heads * hd, 2 * d * cfg.n_kv_heads * hd


def dense_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the dense :class:`jaxeff.Transformer`."""
    qo, kv = _attention_params(cfg)
    matmul = sum(qo + kv + ffn_matmul_params(cfg, layer) for layer in range(cfg.n_layers))
    attn = 12.0 * cfg.n_heads * cfg.resolved_head_dim * seq_len
    return 6.0 * (matmul + cfg.d_model * cfg.vocab_size) + cfg.n_layers * attn


def recursive_flops_per_token(cfg: ModelConfig, rcfg: RecursionConfig, seq_len: int) -> float:
    """Training FLOPs per token of a recursive / MoR model, counting the work each token really
    gets: a shared layer at step r runs on the fraction c_r of the tokens, its attention among
    c_r T keys (c_r^2 overall), or the first step's c_1 T keys under KV sharing, which also skips
    the key and value projections after the first step. Token-choice is counted at its balanced
    load (the same fractions as the default capacities)."""
    if not rcfg.enabled:
        return dense_flops_per_token(cfg, seq_len)
    d = cfg.d_model
    qo, kv = _attention_params(cfg)
    attn = 12.0 * cfg.n_heads * cfg.resolved_head_dim * seq_len
    middle = rcfg.strategy.startswith("middle_")
    ffn = lambda layer: ffn_matmul_params(cfg, layer)
    shared_ffn = [ffn(layer) for layer in shared_block_layers(rcfg.strategy, cfg.n_layers, rcfg.n_recursions)]
    fracs = (rcfg.resolved_capacities if rcfg.routing == "expert" else
             tuple((rcfg.n_recursions - r) / rcfg.n_recursions for r in range(rcfg.n_recursions))
             if rcfg.routing == "token" else (1.0,) * rcfg.n_recursions)
    unique = [0, cfg.n_layers - 1] if middle else []
    total = sum(6.0 * (qo + kv + ffn(layer)) + attn for layer in unique) + 6.0 * d * cfg.vocab_size
    for r, c in enumerate(fracs):
        shared_kv = rcfg.kv_strategy == "share" and r > 0
        keys = fracs[0] if shared_kv else c
        total += sum(c * (6.0 * (qo + f + (0 if shared_kv else kv)) + attn * keys) for f in shared_ffn)
    if rcfg.routing == "expert":
        total += 6.0 * d * (1.0 + sum(fracs[:-1]))  # step r's router scores step r-1's survivors
    elif rcfg.routing == "token":
        total += 6.0 * d * rcfg.n_recursions
    return total


def model_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token of the model a run's config describes (what MFU and iso-FLOP
    budgets count)."""
    return recursive_flops_per_token(cfg.model, cfg.recursion, cfg.train.seq_len)

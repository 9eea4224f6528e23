"""FLOPs per token (jaxeff/train/flops.py): the dense closed form, recursive / MoR models whose
shared steps run on fractions of the tokens, and the FFN modules' own counts."""

import pytest

from jaxeff.config import ModelConfig, RecursionConfig
from jaxeff.train.flops import dense_flops_per_token, recursive_flops_per_token

BASE = dict(vocab_size=61, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128, init_std=0.1)


def _cfg(n_layers: int = 5, **kw) -> ModelConfig:
    return ModelConfig(**{**BASE, "n_layers": n_layers, **kw})


def test_dense_flops_per_token_formula():
    m = ModelConfig(vocab_size=100, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32)
    matmul = 2 * (16 * 8 * (2 * 2 + 2 * 1) + 3 * 16 * 32) + 16 * 100
    assert dense_flops_per_token(m, 64) == 6 * matmul + 12 * 2 * 2 * 8 * 64


def test_analytic_flops_per_token():
    cfg, seq = _cfg(6), 64
    for strategy in ("cycle", "sequence", "middle_cycle", "middle_sequence"):
        rc = RecursionConfig(strategy=strategy, n_recursions=1)
        assert recursive_flops_per_token(cfg, rc, seq) == pytest.approx(dense_flops_per_token(cfg, seq), rel=1e-12)
    assert recursive_flops_per_token(cfg, RecursionConfig(), seq) == dense_flops_per_token(cfg, seq)
    # Without routing, sharing changes no per-token work (same unrolled depth).
    assert recursive_flops_per_token(cfg, RecursionConfig(strategy="cycle", n_recursions=3), seq) == pytest.approx(
        dense_flops_per_token(cfg, seq), rel=1e-12)

    def expert(caps, kv="recursion"):
        return recursive_flops_per_token(cfg, RecursionConfig(strategy="cycle", n_recursions=3, routing="expert",
                                                    capacities=caps, kv_strategy=kv), seq)

    assert expert("1,0.5,0.25") < expert("1,0.5,0.5") < expert("1,1,1") < expert("1,1,1") + 1
    # Shared-stack work is linear in c_r for the matmuls and c_r^2 for attention (recursion-wise KV).
    d, h, kh, hd, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size
    layer_mm = 6.0 * (2 * d * h * hd + 2 * d * kh * hd + 3 * d * f)
    attn = 12.0 * h * hd * seq
    caps = (1.0, 0.5, 0.25)
    want = 6.0 * d * v + 2 * sum(c * layer_mm + c * c * attn for c in caps) + 6.0 * d * (1 + 1 + 0.5)
    assert expert("1,0.5,0.25") == pytest.approx(want, rel=1e-12)
    # KV sharing: later steps skip the key/value projections but attend to all c_1 T first-step keys.
    kv_mm = 6.0 * 2 * d * kh * hd
    want_share = want + 2 * sum(-kv_mm * c - c * c * attn + c * 1.0 * attn for c in caps[1:])
    assert expert("1,0.5,0.25", "share") == pytest.approx(want_share, rel=1e-12)
    token = recursive_flops_per_token(cfg, RecursionConfig(strategy="cycle", n_recursions=3, routing="token"), seq)
    assert token < recursive_flops_per_token(cfg, RecursionConfig(strategy="cycle", n_recursions=3), seq)


def test_analytic_flops_count_one_router_call_per_step():
    """At capacity 1 an expert-choice model does the unrouted model's work plus one router matmul
    (d -> 1, 6 d training FLOPs per token) per step. Fails for N_r = 1: ``recursive_flops_per_token`` adds
    ``6 d * sum(fracs)`` plus another ``6 d`` when there is a single step, counting its router twice."""
    cfg, seq = _cfg(6), 64
    for n_r in (3, 2, 1):
        plain = recursive_flops_per_token(cfg, RecursionConfig(strategy="cycle", n_recursions=n_r), seq)
        caps = ",".join(["1"] * n_r)
        routed = recursive_flops_per_token(cfg, RecursionConfig(strategy="cycle", n_recursions=n_r, routing="expert",
                                                      capacities=caps), seq)
        assert routed - plain == pytest.approx(6.0 * cfg.d_model * n_r), n_r

"""RoPE in both pairings against a numpy loop, its relative-position property, and the
interleaved -> half permutation used to load interleaved (Meta / GGUF) checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.ops import apply_rope, interleaved_to_half_permutation, rope_angles


def _np_rope(x, positions, base, style):
    """x [B, T, H, D] float64, positions [B, T]: rotate pair i by positions * base**(-2i/D)."""
    b, t, h, d = x.shape
    out = np.empty_like(x, dtype=np.float64)
    for i in range(d // 2):
        theta = positions.astype(np.float64) * base ** (-2.0 * i / d)  # [B, T]
        c, s = np.cos(theta)[:, :, None], np.sin(theta)[:, :, None]
        a, bb = (i, i + d // 2) if style == "half" else (2 * i, 2 * i + 1)
        out[..., a] = x[..., a] * c - x[..., bb] * s
        out[..., bb] = x[..., bb] * c + x[..., a] * s
    return out


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("base", [10_000.0, 500.0])
def test_apply_rope_matches_numpy(style, base):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 3, 100, 0, 31]], np.int32)
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions), base, style)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _np_rope(x.astype(np.float64), positions, base, style),
                               rtol=1e-5, atol=1e-5)


def test_rope_position_zero_is_identity_and_styles_differ():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 1, 8)), jnp.float32)
    zero = jnp.zeros((1, 2), jnp.int32)
    for style in ("half", "interleaved"):
        np.testing.assert_allclose(np.asarray(apply_rope(x, zero, style=style)), np.asarray(x), atol=1e-7)
    pos = jnp.ones((1, 2), jnp.int32)
    assert not np.allclose(np.asarray(apply_rope(x, pos, style="half")),
                           np.asarray(apply_rope(x, pos, style="interleaved")))


def test_rope_keeps_bf16_and_rejects_unknown_style():
    x = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
    assert apply_rope(x, jnp.zeros((1, 2), jnp.int32)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="style"):
        apply_rope(x, jnp.zeros((1, 2), jnp.int32), style="neox")


def test_rope_angles_shape_and_frequencies():
    cos, sin = rope_angles(jnp.asarray([[0, 1, 5]]), head_dim=8, base=10_000.0)
    assert cos.shape == sin.shape == (1, 3, 4)
    expected = 5 * 10_000.0 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(np.asarray(sin[0, 2]), np.sin(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_dot_product_depends_only_on_position_difference(style):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def dot(m, n):
        qm = apply_rope(q, jnp.asarray([[m]]), style=style)
        kn = apply_rope(k, jnp.asarray([[n]]), style=style)
        return float(jnp.sum(qm * kn))

    for m, n in [(3, 1), (10, 2), (0, 0), (5, 9)]:
        ref = dot(m, n)
        for shift in (1, 17, 250):
            assert dot(m + shift, n + shift) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    # ... and does depend on the difference (RoPE is not the identity).
    assert abs(dot(3, 1) - dot(1, 1)) > 1e-3
    # Rotations preserve norms.
    qm = apply_rope(q, jnp.asarray([[123]]), style=style)
    assert float(jnp.linalg.norm(qm)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)


@pytest.mark.parametrize("head_dim", [2, 8, 64])
def test_interleaved_to_half_permutation_identity(head_dim):
    perm = np.asarray(interleaved_to_half_permutation(head_dim))
    assert sorted(perm.tolist()) == list(range(head_dim))  # a permutation
    rng = np.random.default_rng(head_dim)
    q = jnp.asarray(rng.normal(size=(2, 6, 3, head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 6, 3, head_dim)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 1000, size=(2, 6)), jnp.int32)
    # Half-RoPE on permuted channels is interleaved-RoPE followed by the same permutation ...
    half_perm_q = apply_rope(q[..., perm], pos, style="half")
    inter_q = apply_rope(q, pos, style="interleaved")
    np.testing.assert_allclose(np.asarray(half_perm_q), np.asarray(inter_q)[..., perm], rtol=1e-6, atol=1e-6)
    # ... so q.k per position pair is unchanged.
    half_perm_k = apply_rope(k[..., perm], pos, style="half")
    inter_k = apply_rope(k, pos, style="interleaved")
    dots_half = jnp.einsum("bthd,bshd->bhts", half_perm_q, half_perm_k)
    dots_inter = jnp.einsum("bthd,bshd->bhts", inter_q, inter_k)
    np.testing.assert_allclose(np.asarray(dots_half), np.asarray(dots_inter), rtol=1e-5, atol=1e-5)
    # The docstring's weight form: new_W[:, j] = old_W[:, perm[j]] yields the permuted projection.
    x = rng.normal(size=(4, 5))
    w = rng.normal(size=(5, head_dim))
    np.testing.assert_allclose(x @ w[:, perm], (x @ w)[:, perm])


def test_permutation_hand_example():
    np.testing.assert_array_equal(np.asarray(interleaved_to_half_permutation(6)), [0, 2, 4, 1, 3, 5])

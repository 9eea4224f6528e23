"""The portable Pallas kernel in interpret mode against the reference, and as the cache read
of a model (``jaxeff.kv.with_decode_kernel``): decoding with it gives the reference path's logits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.decode_attention import portable
from pallas_kernels.decode_attention.common import Split

from .test_base import DecodeTestBase


class TestPortable(DecodeTestBase):
    def run(self, case, q, k, v, pos, q_pos, counts):
        return portable.decode_attention(q, k, v, pos, q_pos, counts, return_lse=True, interpret=True, block_c=16,
                                         n_splits=case.n_splits)


def test_split_plan():
    s = Split.make(600, 64)
    assert (s.n_splits, s.per_split, s.padded) == (2, 320, 640)
    assert Split.make(100, 64, n_splits=5).n_splits == 2  # never more splits than blocks


def test_model_decodes_through_the_kernel():
    from jaxeff import ModelConfig, Transformer
    from jaxeff.kv import KVCompression, compress_once, policy, with_decode_kernel
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                      init_std=0.2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 12)), jnp.int32)
    t = KVCompression(policy("h2o", recent=2), 5)

    def run(state, impl):
        m = nnx.merge(graphdef, state)
        _, cache, _ = compress_once(m, prompt, jnp.asarray([12, 12]), t, 16)  # per-head evicted cache
        if impl != "xla":
            cache = with_decode_kernel(cache, impl)
        logits = []
        for tok in (3, 9, 27):
            lg, cache, _ = m.extend(jnp.full((2, 1), tok, jnp.int32), cache)
            logits.append(lg[:, 0])
        return jnp.stack(logits, 1)

    plain = jax.jit(lambda s: run(s, "xla"))(state)
    kernel = jax.jit(lambda s: run(s, "portable"))(state)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_generate_with_a_decode_kernel_prefills_a_long_prompt_densely():
    """A prompt of T x G > 64 query rows per kv head goes through the dense attention (the
    kernels take one 64-row tile), its decode steps through the kernel: same tokens as XLA."""
    from jaxeff import ModelConfig, Transformer, generate
    from jaxeff.kv.decode import MAX_KERNEL_ROWS
    cfg = ModelConfig(vocab_size=40, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128,
                      init_std=0.2, dtype="float16")  # the Hopper kernel: fp16 or bf16, head_dim 64
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(1).integers(0, 40, (2, 40)).astype(np.int32)
    assert 40 * 2 > MAX_KERNEL_ROWS
    plain = generate(model, prompt, 6, temperature=0.0)
    kernel = generate(model, prompt, 6, temperature=0.0, decode_impl="mosaic_gpu")  # interpret mode on a CPU
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(plain))

"""Named presets: ``tiny`` (CPU), ``small`` (one GPU), ``1b`` (several GPUs)."""

from __future__ import annotations

from jaxeff.config.model import ModelConfig
from jaxeff.config.run import Config, DataConfig, MeshConfig, TrainConfig


PRESETS: dict[str, Config] = {
    # CPU, 2 cores, a few minutes: ~2.0M parameters on Shakespeare with a 2k BPE vocabulary.
    "tiny": Config(
        name="tiny",
        model=ModelConfig(vocab_size=2048, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512,
                          max_seq_len=256),
        data=DataConfig(corpus="shakespeare", tokenizer="bpe", bpe_vocab_size=2048),
        train=TrainConfig(steps=600, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50, eval_every=150,
                          eval_batches=8, ckpt_every=150, log_every=10),
    ),
    # One GPU: ~138M parameters, sequence 2048, bf16 compute with fp32 parameters.
    "small": Config(
        name="small",
        model=ModelConfig(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=3072,
                          max_seq_len=2048, dtype="bfloat16", param_dtype="float32"),
        data=DataConfig(corpus="shakespeare", tokenizer="bpe", bpe_vocab_size=32768),
        train=TrainConfig(steps=2000, batch_size=32, seq_len=2048, lr=6e-4, warmup_steps=100, eval_every=500,
                          eval_batches=4, ckpt_every=500, log_every=20),
    ),
    # Several GPUs: ~1.0B parameters (d 2048, 18 layers, head_dim 128), sequence 2048. The global
    # batch of 16 sequences is meant to be split over devices (mesh.fsdp / mesh.data); on one
    # 80 GB GPU use train.batch_size=8 or train.grad_accum=2.
    "1b": Config(
        name="1b",
        model=ModelConfig(vocab_size=32768, d_model=2048, n_layers=18, n_heads=16, n_kv_heads=16, d_ff=5632,
                          max_seq_len=2048, dtype="bfloat16", param_dtype="float32"),
        data=DataConfig(corpus="shakespeare", tokenizer="bpe", bpe_vocab_size=32768),
        train=TrainConfig(steps=2000, batch_size=16, seq_len=2048, lr=3e-4, warmup_steps=100, eval_every=500,
                          eval_batches=4, ckpt_every=500, log_every=20),
        mesh=MeshConfig(data=1, fsdp=-1),
    ),
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"--config {name!r}: unknown preset; available: {sorted(PRESETS)}")
    return PRESETS[name]

"""Shared fixtures. The environment is set here, before anything imports jax: pytest loads this
file first, and jax reads JAX_PLATFORMS / JAX_NUM_CPU_DEVICES when its backend starts.

8 simulated CPU devices let tests/test_parallel.py build real multi-axis meshes on a laptop.
``jax_numpy_rank_promotion='raise'`` is NOT enabled: the library relies on implicit rank
promotion in ``ops/norms.py`` (``x * scale_D``) and ``ops/rope.py`` (``positions[..., None] *
inv_freq``).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM -O0 for XLA:CPU: the tests compile dozens of tiny programs and this halves compile time.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from jaxeff.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig  # noqa: E402

# --- A small, deterministic English corpus --------------------------------------------------------

_SUBJECTS = ["The old sailor", "A quiet scholar", "My neighbour", "The young queen", "Every farmer",
             "The tired soldier", "Our teacher", "A curious child", "The merchant", "His sister"]
_VERBS = ["carried", "remembered", "painted", "sold", "discovered", "borrowed", "mended", "counted",
          "praised", "forgot"]
_OBJECTS = ["a lantern", "the silver key", "seven apples", "an empty boat", "the northern road",
            "a letter from Paris", "the broken clock", "twelve candles", "a song about rain", "the garden gate"]
_TAILS = ["before the storm arrived", "while the bells were ringing", "and nobody noticed",
          "in the middle of winter", "without saying a word", "because it was Tuesday",
          "near the harbour at dawn", "although the price was high", "as the river rose", "for the third time"]
_OPENERS = ["Yesterday,", "Later that evening,", "Of course,", "In the village,", "Once again,", "Strangely,"]


def make_corpus_text(seed: int, n_paragraphs: int) -> str:
    """Varied English prose: paragraphs of 3-5 sentences built from fixed phrase lists."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(rng.randint(3, 5)):
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
            if rng.random() < 0.3:
                s = f"{rng.choice(_OPENERS)} {s[0].lower()}{s[1:]}"
            if rng.random() < 0.15:
                s = s[:-1] + "?"
            sentences.append(s)
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="session")
def corpus_glob(tmp_path_factory) -> str:
    """A glob over 8 text files (one document each, about 7 KB in all), for ``data.corpus``."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (root / f"story_{i}.txt").write_text(make_corpus_text(seed=i, n_paragraphs=4), encoding="utf-8")
    return str(root / "*.txt")


# --- Config factories -----------------------------------------------------------------------------

TINY_MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)


@pytest.fixture
def tiny_model_cfg():
    """``tiny_model_cfg(**overrides) -> ModelConfig``: 2 layers, d_model 32, GQA 4/2, vocab 64."""
    def make(**overrides) -> ModelConfig:
        return ModelConfig(**{**TINY_MODEL, **overrides})
    return make


def tiny_train_config(run_dir: str | Path, corpus: str, *overrides: str) -> Config:
    """A whole run that trains in seconds on CPU: byte tokenizer (258 ids, vocab 260 for 4-way
    tensor splits), 1 layer, batch 8 of 32 tokens, 4 steps, logs every step, checkpoints and
    evaluates at the end. ``overrides`` are ``--set`` strings applied last."""
    cfg = Config(
        name="test",
        model=ModelConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                          max_seq_len=64),
        data=DataConfig(corpus=corpus, tokenizer="byte", val_fraction=0.2),
        train=TrainConfig(steps=4, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=1000,
                          eval_batches=1, log_every=1, ckpt_every=1000, keep_ckpts=3, sample_tokens=0),
        mesh=MeshConfig(),
        run_dir=str(run_dir),
    )
    return cfg.override(list(overrides))


@pytest.fixture(scope="session")
def run_config(corpus_glob):
    """``run_config(run_dir, *overrides) -> Config`` on the session corpus (for module-scoped runs)."""
    def make(run_dir: str | Path, *overrides: str) -> Config:
        return tiny_train_config(run_dir, corpus_glob, *overrides)
    return make


@pytest.fixture
def train_cfg(tmp_path, corpus_glob):
    """``train_cfg(*overrides, run_dir=None) -> Config`` writing into a fresh ``tmp_path/run``."""
    def make(*overrides: str, run_dir: str | Path | None = None) -> Config:
        return tiny_train_config(run_dir or tmp_path / "run", corpus_glob, *overrides)
    return make

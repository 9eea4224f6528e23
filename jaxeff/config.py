"""Frozen, self-validating configuration dataclasses and named presets.

Every config checks itself at construction and raises ``ValueError`` naming the field and the
problem, so a bad setting fails before any compilation or training work starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "block_sparse")
ROPE_STYLES = ("half", "interleaved")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "wsd", "constant")


MASK_KINDS = ("causal", "local", "chunked", "document", "custom")


def parse_mask(mask: str) -> tuple[str, int | str]:
    """A model mask description -> (kind, argument): 'causal' / 'document' -> (kind, 0),
    'local:W' / 'chunked:C' -> (kind, positive int), 'custom:NAME' -> ('custom', NAME)."""
    if not isinstance(mask, str):
        raise ValueError(f"must be a string such as 'causal', 'local:64', 'chunked:128', 'document' or "
                         f"'custom:NAME', got {mask!r}")
    kind, sep, arg = mask.partition(":")
    if kind in ("causal", "document", "") and not sep:
        return (kind or "causal"), 0
    if kind in ("local", "chunked") and arg.isdigit() and int(arg) >= 1:
        return kind, int(arg)
    if kind == "custom" and arg.isidentifier():
        return kind, arg
    raise ValueError(f"must be 'causal', 'local:W', 'chunked:C' (W, C positive integers), 'document' or "
                     f"'custom:NAME', got {mask!r}")


def _fail(cls: str, name: str, problem: str) -> None:
    raise ValueError(f"{cls}.{name}: {problem}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_types(obj: Any) -> None:
    """Every field of a config dataclass holds a value of its annotated type, and every float is
    finite (a NaN or infinite learning rate, say, would otherwise train into NaN parameters).
    Literal fields are checked by ``_choice``; integer ranges by each class."""
    cls = type(obj).__name__
    for f in dataclasses.fields(obj):
        typ, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        if typ is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                _fail(cls, f.name, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                _fail(cls, f.name, f"must be a finite number, got {value!r}")
        elif typ is int:
            if isinstance(value, bool) or not isinstance(value, int):
                _fail(cls, f.name, f"must be an integer, got {value!r}")
        elif typ is bool:
            if not isinstance(value, bool):
                _fail(cls, f.name, f"must be true or false, got {value!r}")
        elif typ is str or typing.get_origin(typ) is Literal:
            if not isinstance(value, str):
                _fail(cls, f.name, f"must be a string, got {value!r}")
        elif isinstance(typ, type) and dataclasses.is_dataclass(typ) and not isinstance(value, typ):
            _fail(cls, f.name, f"must be a {typ.__name__}, got {type(value).__name__}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(type(obj).__name__, name, f"must be a positive integer, got {value!r}")


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        _fail(type(obj).__name__, name, f"must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A dense pre-norm decoder (Llama-style): RMSNorm, RoPE, GQA attention, SwiGLU MLP."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0 means d_model // n_heads
    d_ff: int = 768
    max_seq_len: int = 1024
    rope_base: float = 10_000.0
    rope_style: Literal["half", "interleaved"] = "half"
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    attention_impl: Literal["auto", "xla", "cudnn", "block_sparse"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    init_std: float = 0.02
    remat: bool = False  # recompute each block in the backward pass (saves activation memory)
    swiglu_fused: bool = False  # gate and up projections as one matmul (jaxeff.ops.swiglu's fuse_gate_up)
    # Which keys a query sees, on top of causality and packed documents: 'causal', 'local:W' (the W
    # keys before it and itself), 'chunked:C' (causal inside chunks of C tokens), 'document' (the
    # same as causal: documents come from the data's segment ids), or 'custom:NAME' for a rule
    # registered in code with jaxeff.ops.register_mask_pattern.
    mask: str = "causal"
    attention_block: int = 128  # block size of attention_impl='block_sparse' (queries and keys)

    def __post_init__(self):
        _check_types(self)
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")
        if self.head_dim < 0:
            _fail("ModelConfig", "head_dim", f"must be >= 0 (0 means d_model // n_heads), got {self.head_dim}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            _fail("ModelConfig", "n_heads", f"must divide d_model={self.d_model} when head_dim is 0, got {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            _fail("ModelConfig", "n_kv_heads", f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        if self.resolved_head_dim % 2:
            _fail("ModelConfig", "head_dim", f"must be even for RoPE, got {self.resolved_head_dim}")
        if self.rope_base <= 1.0:
            _fail("ModelConfig", "rope_base", f"must be > 1, got {self.rope_base}")
        if self.norm_eps <= 0:
            _fail("ModelConfig", "norm_eps", f"must be > 0, got {self.norm_eps}")
        if self.init_std <= 0:
            _fail("ModelConfig", "init_std", f"must be > 0, got {self.init_std}")
        _choice(self, "rope_style", ROPE_STYLES)
        _choice(self, "attention_impl", ATTENTION_IMPLS)
        try:
            parse_mask(self.mask)
        except ValueError as e:
            _fail("ModelConfig", "mask", str(e))
        if self.attention_block < 16 or self.attention_block & (self.attention_block - 1):
            _fail("ModelConfig", "attention_block", f"must be a power of two >= 16, got {self.attention_block}")
        _choice(self, "dtype", DTYPES)
        _choice(self, "param_dtype", DTYPES)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def param_count(self) -> int:
        """Exact parameter count of :class:`jaxeff.Transformer` built from this config."""
        hd = self.resolved_head_dim
        attn = self.d_model * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.d_ff
        per_layer = attn + mlp + 2 * self.d_model
        head = 0 if self.tie_embeddings else self.d_model * self.vocab_size
        return self.vocab_size * self.d_model + self.n_layers * per_layer + self.d_model + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the PaLM appendix-B convention.

        6 x (matmul parameters, LM head included, input embedding excluded) plus
        12 x n_layers x n_heads x head_dim x seq_len for the attention scores and values
        (no discount for the causal mask, as in PaLM and MaxText's MFU).
        """
        hd = self.resolved_head_dim
        matmul_params = (
            self.n_layers * (self.d_model * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 3 * self.d_model * self.d_ff)
            + self.d_model * self.vocab_size
        )
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.n_heads * hd * seq_len


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is tokenized and packed."""

    corpus: str = "shakespeare"  # 'shakespeare', 'kjv', or comma-separated paths / globs
    tokenizer: Literal["byte", "bpe"] = "bpe"
    bpe_vocab_size: int = 2048
    val_fraction: float = 0.05  # fraction of documents held out for validation
    split_seed: int = 0

    def __post_init__(self):
        _check_types(self)
        if not self.corpus or not isinstance(self.corpus, str):
            _fail("DataConfig", "corpus", f"must be a non-empty string, got {self.corpus!r}")
        _choice(self, "tokenizer", ("byte", "bpe"))
        _positive(self, "bpe_vocab_size")
        if self.bpe_vocab_size < 260:
            _fail("DataConfig", "bpe_vocab_size", f"must be >= 260 (256 bytes plus special tokens), got {self.bpe_vocab_size}")
        if not 0.0 < self.val_fraction < 1.0:
            _fail("DataConfig", "val_fraction", f"must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, evaluation and checkpointing.

    Resuming a run directory that holds checkpoints: only the fields in
    ``RESUMABLE_TRAIN_FIELDS`` may differ from the saved ``config.json`` (``steps``,
    ``eval_every``, ``eval_batches``, ``log_every``, ``ckpt_every``, ``keep_ckpts``,
    ``sample_tokens``); any other change is refused with the fields named, since it would
    silently change the trajectory the checkpoints belong to. ``steps`` may not go below the
    latest checkpoint's step. When ``steps`` changes, the learning-rate schedule is recomputed
    over the new total: step ``k`` after the resume point uses ``learning_rate_schedule`` of the
    new config at ``k`` (the optimizer's step count continues). With ``schedule='constant'``
    (after warm-up) that equals an uninterrupted run of the new length; with ``'wsd'`` it does as
    long as the resume point lies before the old run's decay; with ``'cosine'`` the lr jumps to
    the longer cosine's value. ``config.json`` is rewritten to the new settings.
    """

    steps: int = 1000
    batch_size: int = 16  # global batch, in sequences
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step; batch_size must be divisible by it
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    wsd_decay_fraction: float = 0.2  # WSD: share of steps spent in the final linear decay
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    decay_norms: bool = False
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    mask_documents: bool = True  # attention stays inside each packed document
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 200
    keep_ckpts: int = 3
    sample_tokens: int = 200

    def __post_init__(self):
        _check_types(self)
        _positive(self, "steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                  "log_every", "ckpt_every", "keep_ckpts")
        if self.batch_size % self.grad_accum:
            _fail("TrainConfig", "grad_accum", f"must divide batch_size={self.batch_size}, got {self.grad_accum}")
        if self.lr <= 0:
            _fail("TrainConfig", "lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("TrainConfig", "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            _fail("TrainConfig", "warmup_steps", f"must be in [0, steps={self.steps}), got {self.warmup_steps}")
        _choice(self, "schedule", SCHEDULES)
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            _fail("TrainConfig", "wsd_decay_fraction", f"must be in (0, 1], got {self.wsd_decay_fraction}")
        if self.weight_decay < 0:
            _fail("TrainConfig", "weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.clip_norm < 0:
            _fail("TrainConfig", "clip_norm", f"must be >= 0 (0 disables clipping), got {self.clip_norm}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail("TrainConfig", name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.sample_tokens < 0:
            _fail("TrainConfig", "sample_tokens", f"must be >= 0, got {self.sample_tokens}")


# What may change when a run directory with checkpoints is resumed (see TrainConfig).
RESUMABLE_TRAIN_FIELDS = ("steps", "eval_every", "eval_batches", "log_every", "ckpt_every", "keep_ckpts",
                          "sample_tokens")

SHARING_STRATEGIES = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTINGS = ("none", "expert", "token")
ROUTER_FUNCS = ("sigmoid", "tanh", "softmax")
KV_STRATEGIES = ("recursion", "share")


@dataclass(frozen=True)
class RecursionConfig:
    """Parameter sharing across depth and Mixture-of-Recursions routing (Bae et al., 2025,
    arXiv 2507.10524; Relaxed Recursive Transformers, Bae et al., 2024, arXiv 2410.20672).

    ``strategy='none'`` is the dense model. Otherwise the ``model.n_layers`` unrolled layers reuse
    a stack of shared blocks ``n_recursions`` times: ``cycle`` (layer l uses block l mod U),
    ``sequence`` (block l // n_recursions), and the ``middle_`` variants, which keep the first and
    last layers unique and share the middle L - 2. ``routing`` picks per-token depth: ``expert``
    (one router per recursion step, top-k with hierarchical filtering) or ``token`` (one router
    over the depths).

    ``kv_strategy='share'`` makes every recursion step attend to the first step's keys and values;
    with ``kv_share_update`` the tokens a later step selects first overwrite their own entries (as
    the official code's ``update_cache``). Training computes each step in parallel, so a token
    sees earlier tokens' entries as of the current step; token-by-token decoding sees them as of
    their deepest step. The two agree without updates (tested), not with them.
    """

    strategy: Literal["none", "cycle", "sequence", "middle_cycle", "middle_sequence"] = "none"
    n_recursions: int = 1
    lora_rank: int = 0  # per-recursion LoRA on the shared projections (0: off)
    routing: Literal["none", "expert", "token"] = "none"
    capacities: str = ""  # expert-choice, comma-separated per step; empty: (N_r - r + 1) / N_r
    router_func: Literal["sigmoid", "tanh", "softmax"] = "sigmoid"
    router_alpha: float = 0.1
    aux_router: bool = False  # expert-choice: a separate router on stop-gradient inputs decides at inference
    aux_loss_coef: float = 1e-3  # BCE of router logits against the top-k choice (0: off)
    balance: Literal["loss", "loss_free"] = "loss"  # token-choice balancing
    balance_coef: float = 0.1
    bias_update_rate: float = 1e-3  # token-choice loss-free bias step
    z_loss_coef: float = 0.0
    kv_strategy: Literal["recursion", "share"] = "recursion"
    kv_share_update: bool = False  # share: tokens selected at a later step overwrite their shared keys/values
    capacity_warmup_steps: int = 0  # expert-choice: cosine warm-up of the capacities from 1.0 (0: off)
    capacity_warmup_phases: int = 8  # the warm-up moves in this many steps (each compiles its own train step)
    init_from: str = ""  # a dense run directory to convert and uptrain from (Relaxed Recursive Transformers)
    init_method: Literal["stepwise", "average", "lower"] = "stepwise"  # how shared blocks start from its layers
    lora_init: Literal["svd", "zero"] = "svd"  # LoRA start: truncated SVD of (original - shared), or zero

    def __post_init__(self):
        _check_types(self)
        _choice(self, "strategy", SHARING_STRATEGIES)
        _choice(self, "routing", ROUTINGS)
        _choice(self, "router_func", ROUTER_FUNCS)
        _choice(self, "kv_strategy", KV_STRATEGIES)
        _choice(self, "balance", ("loss", "loss_free"))
        _positive(self, "n_recursions")
        for name in ("lora_rank", "capacity_warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                _fail("RecursionConfig", name, f"must be an integer >= 0, got {getattr(self, name)!r}")
        _positive(self, "capacity_warmup_phases")
        _choice(self, "init_method", ("stepwise", "average", "lower"))
        _choice(self, "lora_init", ("svd", "zero"))
        if self.init_from and self.strategy == "none":
            _fail("RecursionConfig", "init_from", "converts a dense run into a recursive one; set a sharing strategy")
        if self.kv_share_update and self.kv_strategy != "share":
            _fail("RecursionConfig", "kv_share_update", "applies to kv_strategy='share' only")
        if self.capacity_warmup_steps and self.routing != "expert":
            _fail("RecursionConfig", "capacity_warmup_steps", "applies to expert-choice routing only")
        for name in ("aux_loss_coef", "balance_coef", "bias_update_rate", "z_loss_coef"):
            if getattr(self, name) < 0:
                _fail("RecursionConfig", name, f"must be >= 0, got {getattr(self, name)}")
        if self.router_alpha <= 0:
            _fail("RecursionConfig", "router_alpha", f"must be > 0, got {self.router_alpha}")
        if self.strategy == "none":
            if self.routing != "none" or self.n_recursions != 1 or self.lora_rank:
                _fail("RecursionConfig", "strategy", "is 'none' (dense model) but n_recursions, lora_rank or "
                      "routing is set; choose a sharing strategy such as 'middle_cycle'")
        if self.routing != "none" and self.strategy not in ("cycle", "middle_cycle"):
            _fail("RecursionConfig", "routing", f"{self.routing!r} routes whole passes over the shared stack, which "
                  f"needs strategy 'cycle' or 'middle_cycle', got {self.strategy!r}")
        if self.routing == "token" and self.n_recursions < 2:
            _fail("RecursionConfig", "n_recursions", "token-choice routing needs at least 2 depths to choose from")
        self.resolved_capacities  # validates the capacity schedule

    @property
    def resolved_capacities(self) -> tuple[float, ...]:
        """Per-step capacity c_r (fraction of the sequence selected at step r)."""
        n = self.n_recursions
        if not self.capacities.strip():
            return tuple((n - r) / n for r in range(n))
        try:
            caps = tuple(float(c) for c in self.capacities.split(","))
        except ValueError:
            _fail("RecursionConfig", "capacities", f"must be comma-separated numbers, got {self.capacities!r}")
        if len(caps) != n:
            _fail("RecursionConfig", "capacities", f"needs one value per recursion step ({n}), got {len(caps)}")
        if any(not 0.0 < c <= 1.0 for c in caps):
            _fail("RecursionConfig", "capacities", f"every value must be in (0, 1], got {caps}")
        if any(b > a for a, b in zip(caps, caps[1:])):
            _fail("RecursionConfig", "capacities", f"must be descending (non-increasing) over the steps, got {caps}")
        return caps

    def check_depth(self, n_layers: int) -> None:
        """Raises unless ``n_recursions`` divides the shared depth of an ``n_layers`` model."""
        if self.strategy == "none":
            return
        middle = self.strategy.startswith("middle_")
        shared = n_layers - 2 if middle else n_layers
        if shared < self.n_recursions or shared % self.n_recursions:
            what = f"the middle depth n_layers - 2 = {shared}" if middle else f"n_layers = {shared}"
            _fail("RecursionConfig", "n_recursions", f"must divide {what} (strategy {self.strategy!r}), "
                  f"got {self.n_recursions}")

    def check_lora_rank(self, model: ModelConfig) -> None:
        """Raises unless ``lora_rank`` fits the shared projections of ``model``: a rank above the
        smaller side of a matrix adds parameters without adding expressiveness."""
        if not self.lora_rank:
            return
        hd = model.resolved_head_dim
        sides = {"d_model": model.d_model, "n_heads x head_dim": model.n_heads * hd,
                 "n_kv_heads x head_dim": model.n_kv_heads * hd, "d_ff": model.d_ff}
        bound = min(sides.values())
        if self.lora_rank > bound:
            detail = ", ".join(f"{k} {v}" for k, v in sides.items())
            _fail("RecursionConfig", "lora_rank", f"must be <= {bound}, the smallest side of the matrices it "
                  f"adapts ({detail}), got {self.lora_rank}")

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. -1 on one axis means 'all remaining devices'."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        _check_types(self)
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if sum(v == -1 for v in sizes.values()) > 1:
            _fail("MeshConfig", "data", "at most one axis may be -1 (the rest of the devices)")
        for name, v in sizes.items():
            if not isinstance(v, int) or (v < 1 and v != -1):
                _fail("MeshConfig", name, f"must be a positive integer or -1, got {v!r}")

    def resolve(self, n_devices: int) -> dict[str, int]:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        fixed = 1
        for v in sizes.values():
            if v != -1:
                fixed *= v
        if n_devices % fixed:
            raise ValueError(f"MeshConfig: axes {sizes} do not divide the {n_devices} available devices")
        sizes = {k: (n_devices // fixed if v == -1 else v) for k, v in sizes.items()}
        if sizes["data"] * sizes["fsdp"] * sizes["tensor"] != n_devices:
            raise ValueError(f"MeshConfig: axes {sizes} use {sizes['data'] * sizes['fsdp'] * sizes['tensor']} "
                             f"devices but {n_devices} are available")
        return sizes


@dataclass(frozen=True)
class Config:
    """A whole run: model, data, training and mesh."""

    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    recursion: RecursionConfig = field(default_factory=RecursionConfig)
    run_dir: str = ""  # empty: runs/<name>

    def __post_init__(self):
        _check_types(self)
        self.recursion.check_depth(self.model.n_layers)
        self.recursion.check_lora_rank(self.model)
        if self.train.seq_len > self.model.max_seq_len:
            _fail("Config", "train.seq_len", f"{self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """The inverse of :meth:`to_dict`; missing sections and fields take their defaults, unknown
        ones raise ``ValueError`` naming them (as does every invalid value)."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        scalars = {f.name for f in dataclasses.fields(cls)} - set(SECTIONS)
        unknown = sorted(set(d) - scalars - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)} "
                             f"(and the fields {', '.join(sorted(scalars))})")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise ValueError(f"section {name!r} must be an object of fields, got {values!r}")
            fields = {f.name for f in dataclasses.fields(section_cls)}
            extra = sorted(set(values) - fields)
            if extra:
                raise ValueError(f"{section_cls.__name__} has no field {extra[0]!r}; fields are {sorted(fields)}")
            sections[name] = section_cls(**values)
        return cls(**{k: d[k] for k in scalars if k in d}, **sections)

    def override(self, assignments: list[str]) -> "Config":
        """Applies ``section.field=value`` strings (as given to ``--set``) and re-validates."""
        d = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"--set {item!r}: expected key=value, for example train.steps=100")
            key, raw = item.split("=", 1)
            parts = key.strip().split(".")
            target, cls = d, Config
            for p in parts[:-1]:
                if p not in target or not isinstance(target[p], dict):
                    raise ValueError(f"--set {item!r}: unknown section {p!r}; sections are model, data, train, mesh, "
                                     f"recursion")
                target = target[p]
                cls = _section_class(p)
            leaf = parts[-1]
            if leaf not in target:
                raise ValueError(f"--set {item!r}: {cls.__name__} has no field {leaf!r}; "
                                 f"fields are {sorted(target)}")
            if isinstance(target[leaf], dict):
                raise ValueError(f"--set {item!r}: {leaf!r} is a section, not a field; set one of its fields, "
                                 f"for example {leaf}.{sorted(target[leaf])[0]}=...")
            target[leaf] = _parse_value(raw, _field_type(cls, leaf), item)
        return Config.from_dict(d)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig,
                             "recursion": RecursionConfig}


def _section_class(name: str) -> type:
    return SECTIONS[name]


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _parse_value(raw: str, typ: Any, item: str) -> Any:
    raw = raw.strip()
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"--set {item!r}: cannot read {raw!r} as {typ.__name__}") from None
    return raw


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

"""A whole run: the data, train and mesh sections, and :class:`Config`, which holds every section,
reads and writes JSON and applies ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Literal

from jaxeff.config._checks import _check_types, _fail, _positive
from jaxeff.config.model import ModelConfig
from jaxeff.config.overrides import parse_value
from jaxeff.config.recursion import RecursionConfig

TokenizerKind = Literal["byte", "bpe"]
Schedule = Literal["cosine", "wsd", "constant"]
SCHEDULES = typing.get_args(Schedule)


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is tokenized and packed."""

    corpus: str = "shakespeare"  # 'shakespeare', 'kjv', or comma-separated paths / globs
    tokenizer: TokenizerKind = "bpe"
    bpe_vocab_size: int = 2048
    val_fraction: float = 0.05  # fraction of documents held out for validation
    split_seed: int = 0

    def __post_init__(self):
        _check_types(self)
        if not self.corpus or not isinstance(self.corpus, str):
            _fail("DataConfig", "corpus", f"must be a non-empty string, got {self.corpus!r}")
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
    schedule: Schedule = "cosine"
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


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape, one field per mesh axis (:data:`jaxeff.parallel.MESH_AXES`): ``data``
    (split batch, replicated parameters), ``fsdp`` (split batch and parameters), ``expert``
    (split experts of mixture-of-experts layers; the batch is split over it too) and ``tensor``
    (split heads / MLP hidden / vocabulary). -1 on one axis means 'all remaining devices'."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    @property
    def sizes(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __post_init__(self):
        _check_types(self)
        sizes = self.sizes
        if sum(v == -1 for v in sizes.values()) > 1:
            _fail("MeshConfig", "data", "at most one axis may be -1 (the rest of the devices)")
        for name, v in sizes.items():
            if not isinstance(v, int) or (v < 1 and v != -1):
                _fail("MeshConfig", name, f"must be a positive integer or -1, got {v!r}")

    def resolve(self, n_devices: int) -> dict[str, int]:
        sizes = self.sizes
        fixed = 1
        for v in sizes.values():
            if v != -1:
                fixed *= v
        if n_devices % fixed:
            raise ValueError(f"MeshConfig: axes {sizes} do not divide the {n_devices} available devices")
        sizes = {k: (n_devices // fixed if v == -1 else v) for k, v in sizes.items()}
        used = 1
        for v in sizes.values():
            used *= v
        if used != n_devices:
            raise ValueError(f"MeshConfig: axes {sizes} use {used} devices but {n_devices} are available")
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
            if parts[0] in NESTED_ALIASES:  # moe.kind is model.moe.kind
                parts = [*NESTED_ALIASES[parts[0]], *parts[1:]]
            target, cls = d, Config
            for p in parts[:-1]:
                if p not in target or not isinstance(target[p], dict):
                    raise ValueError(f"--set {item!r}: unknown section {p!r}; sections are "
                                     f"{', '.join([*SECTIONS, *NESTED_ALIASES])}")
                target = target[p]
                cls = SECTIONS[p] if cls is Config else typing.get_type_hints(cls)[p]
            leaf = parts[-1]
            if leaf not in target:
                raise ValueError(f"--set {item!r}: {cls.__name__} has no field {leaf!r}; "
                                 f"fields are {sorted(target)}")
            if isinstance(target[leaf], dict):
                raise ValueError(f"--set {item!r}: {leaf!r} is a section, not a field; set one of its fields, "
                                 f"for example {leaf}.{sorted(target[leaf])[0]}=...")
            target[leaf] = parse_value(raw, typing.get_type_hints(cls)[leaf], item)
        return Config.from_dict(d)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig,
                             "recursion": RecursionConfig}
# Sections nested inside another, reachable by their own name in --set (moe.kind=... is model.moe.kind=...).
NESTED_ALIASES: dict[str, tuple[str, ...]] = {"moe": ("model", "moe")}

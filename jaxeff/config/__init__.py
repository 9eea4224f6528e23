"""Frozen, self-validating configuration dataclasses and named presets, one module per concept:
``model`` (:class:`ModelConfig`, with its ``moe`` section :class:`MoEConfig`), ``recursion`` (:class:`RecursionConfig`), ``run`` (the data,
train and mesh sections and :class:`Config`), ``overrides`` (``--set`` values), ``presets``.

Every config checks itself at construction and raises ``ValueError`` naming the field and the
problem, so a bad setting fails before any compilation or training work starts. Choice lists
are the ``Literal`` types of the fields, defined once (``ATTENTION_IMPLS`` and the like are read
from them).
"""

from jaxeff.config.model import (ATTENTION_IMPLS, DTYPES, MASK_KINDS, ROPE_STYLES, ModelConfig, parse_mask)
from jaxeff.config.moe import CHUNK_KERNELS, EXPERT_IMPLS, MOE_KINDS, SPARSE_KINDS, MoEConfig
from jaxeff.config.presets import PRESETS, get_preset
from jaxeff.config.recursion import (INIT_METHODS, KV_STRATEGIES, LORA_INITS, ROUTER_FUNCS, ROUTINGS,
                                     SHARING_STRATEGIES, RecursionConfig)
from jaxeff.config.run import (RESUMABLE_TRAIN_FIELDS, SCHEDULES, SECTIONS, Config, DataConfig, MeshConfig,
                               TrainConfig)

__all__ = ["ATTENTION_IMPLS", "CHUNK_KERNELS", "Config", "DTYPES", "DataConfig", "EXPERT_IMPLS", "INIT_METHODS",
           "KV_STRATEGIES", "LORA_INITS", "MASK_KINDS", "MOE_KINDS", "MeshConfig", "MoEConfig", "ModelConfig",
           "PRESETS", "RESUMABLE_TRAIN_FIELDS", "ROPE_STYLES", "ROUTER_FUNCS", "ROUTINGS", "RecursionConfig",
           "SCHEDULES", "SECTIONS", "SHARING_STRATEGIES", "SPARSE_KINDS", "TrainConfig", "get_preset", "parse_mask"]

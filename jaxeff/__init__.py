"""jaxeff: efficient transformers in JAX.

Public API; everything not re-exported here may change.
"""

from jaxeff.config import (Config, DataConfig, MeshConfig, ModelConfig, PRESETS, RecursionConfig, TrainConfig,
                            get_preset)
from jaxeff.generate import generate
from jaxeff.kv import KVCache, RecursiveCache
from jaxeff.models import RecursiveTransformer, Transformer

__version__ = "0.1.0"

__all__ = ["Config", "DataConfig", "MeshConfig", "ModelConfig", "TrainConfig", "get_preset", "PRESETS", "generate",
           "KVCache", "RecursionConfig", "RecursiveCache", "RecursiveTransformer", "Transformer"]

"""jaxeff: efficient transformers in JAX.

Public API; everything not re-exported here may change.
"""

from jaxeff.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig, get_preset, PRESETS
from jaxeff.generate import generate
from jaxeff.kv import KVCache
from jaxeff.models import Transformer

__version__ = "0.1.0"

__all__ = ["Config", "DataConfig", "MeshConfig", "ModelConfig", "TrainConfig", "get_preset", "PRESETS", "generate",
           "KVCache", "Transformer"]

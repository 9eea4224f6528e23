"""KV caches for decoding, and the transforms applied to them inside the decode loop."""

from jaxeff.kv.cache import KVCache, LayerKV
from jaxeff.kv.recursive_cache import RecursiveCache
from jaxeff.kv.transform import CacheTransform, IdentityTransform

__all__ = ["CacheTransform", "IdentityTransform", "KVCache", "LayerKV", "RecursiveCache"]

"""KV caches for decoding."""

from jaxeff.kv.cache import KVCache, write_rows
from jaxeff.kv.recursive_cache import RecursiveCache

__all__ = ["KVCache", "RecursiveCache", "write_rows"]

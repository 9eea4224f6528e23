"""KV caches for decoding."""

from jaxeff.kv.cache import KVCache, write_rows

__all__ = ["KVCache", "write_rows"]

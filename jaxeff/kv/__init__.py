"""KV caches for decoding, and the transforms applied to them inside the decode loop: eviction,
merging, read-time selection and quantisation policies (:mod:`jaxeff.kv.policies`), built by
name with :func:`policy` and run by :func:`jaxeff.generate` (``kv_policy=``, ``kv_budget=``,
``compress_every=``) through :class:`KVCompression`."""

from jaxeff.kv.budget import Budget
from jaxeff.kv.cache import KVCache, LayerKV
from jaxeff.kv.compress import KVCompression, compress_once, kept_slots
from jaxeff.kv.decode import with_decode_kernel
from jaxeff.kv.observe import Observation, group_mean, key_norms, window_probs
from jaxeff.kv.policies import Policy, ScoringPolicy
from jaxeff.kv.quantized import BFPLayerKV, KIVILayerKV, bytes_per_token, ksort_permutation
from jaxeff.kv.recursive_cache import RecursiveCache
from jaxeff.kv.registry import POLICIES, policy, policy_names
from jaxeff.kv.rope_cache import RopeLayerKV, pre_rope_cache
from jaxeff.kv.transform import CacheTransform, IdentityTransform

__all__ = ["BFPLayerKV", "Budget", "CacheTransform", "IdentityTransform", "KIVILayerKV", "KVCache", "KVCompression",
           "LayerKV", "Observation", "POLICIES", "Policy", "RecursiveCache", "RopeLayerKV", "ScoringPolicy",
           "bytes_per_token", "compress_once", "group_mean", "kept_slots", "key_norms", "ksort_permutation", "policy",
           "policy_names", "pre_rope_cache", "window_probs", "with_decode_kernel"]

"""KV-cache policies, one file per paper: eviction (StreamingLLM, H2O, SnapKV, PyramidKV, TOVA,
KNorm, LazyEviction, random), merging (D2O, Elastic Cache), read-time selection (Quest) and
quantisation (KIVI, block floating point with K-sort). :func:`jaxeff.kv.policy` builds one by
name."""

from jaxeff.kv.policies.base import Policy, ScoringPolicy
from jaxeff.kv.policies.bfp import BFPKSort
from jaxeff.kv.policies.d2o import D2O
from jaxeff.kv.policies.elastic import ElasticCache
from jaxeff.kv.policies.h2o import H2O
from jaxeff.kv.policies.kivi import KIVI
from jaxeff.kv.policies.knorm import KNorm
from jaxeff.kv.policies.lazy import LazyEviction
from jaxeff.kv.policies.pyramidkv import PyramidKV
from jaxeff.kv.policies.quest import Quest, QuestLayerKV
from jaxeff.kv.policies.random_policy import RandomEviction
from jaxeff.kv.policies.snapkv import SnapKV
from jaxeff.kv.policies.streaming import StreamingLLM
from jaxeff.kv.policies.tova import TOVA

__all__ = ["BFPKSort", "D2O", "ElasticCache", "H2O", "KIVI", "KNorm", "LazyEviction", "Policy", "PyramidKV", "Quest",
           "QuestLayerKV", "RandomEviction", "ScoringPolicy", "SnapKV", "StreamingLLM", "TOVA"]

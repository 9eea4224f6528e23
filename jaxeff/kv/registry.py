"""Policies by name: ``jaxeff.kv.policy("snapkv", window=32, kernel=5)``."""

from __future__ import annotations

import dataclasses

from jaxeff.kv import policies as P

POLICIES: dict[str, type] = {cls.name: cls for cls in (
    P.StreamingLLM, P.H2O, P.SnapKV, P.PyramidKV, P.TOVA, P.KNorm, P.Quest, P.LazyEviction, P.D2O, P.ElasticCache,
    P.KIVI, P.BFPKSort, P.RandomEviction)}
ALIASES = {"streamingllm": "streaming_llm", "streaming": "streaming_llm", "lazyeviction": "lazy_eviction",
           "lazy": "lazy_eviction", "elastic": "elastic_cache", "elasticcache": "elastic_cache", "bfp": "bfp_ksort",
           "ksort": "bfp_ksort", "pyramid": "pyramidkv"}


def policy_names() -> list[str]:
    return sorted(POLICIES)


def policy(name, **options):
    """The policy registered as ``name`` (or an alias) with ``options`` (its dataclass fields).
    A policy object passes through (without options). Unknown names and options raise
    ``ValueError`` listing the known ones."""
    if isinstance(name, P.Policy):
        if options:
            raise ValueError(f"policy: options {sorted(options)} given with a policy object; use dataclasses.replace")
        return name
    if not isinstance(name, str):
        raise ValueError(f"policy: expected a policy name or object, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in POLICIES:
        raise ValueError(f"policy: unknown policy {name!r}; known policies: {', '.join(policy_names())}")
    cls = POLICIES[key]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"policy {key!r}: unknown option(s) {unknown}; its options: {sorted(fields) or 'none'}")
    return cls(**options)


def parse_options(items) -> dict:
    """``["window=32", "pooling=max", "position_shift=true"]`` -> typed options (int, float, bool,
    comma tuple of ints, else str), for command lines."""
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"policy option must be NAME=VALUE, got {item!r}")
        out[key.strip()] = _value(raw.strip())
    return out


def _value(raw: str):
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    if "," in raw:
        try:
            return tuple(int(x) for x in raw.split(","))
        except ValueError:
            pass
    return raw

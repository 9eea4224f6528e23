"""The training loop: data -> sharded jitted steps -> validation, checkpoints, logs, a sample."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxeff.config import Config, RecursionConfig
from jaxeff.data import batch_at, eval_batches, prepare_dataset
from jaxeff.models.factory import abstract_model, build_model
from jaxeff.moe.parallel import check_expert_split
from jaxeff.moe.schedule import loss_schedules
from jaxeff.ops.routing import warmup_capacity
from jaxeff.parallel import LOGICAL_RULES, batch_sharding, make_mesh, state_shardings
from jaxeff.train.checkpoint import Checkpointer, RunLock, check_run_config
from jaxeff.train.flops import device_peak_flops, mfu, model_flops_per_token
from jaxeff.train.metrics import MetricsLog, progress
from jaxeff.train.optimizer import learning_rate_schedule, make_optimizer
from jaxeff.train.step import init_state, make_eval_step, make_train_step

log = logging.getLogger("jaxeff.train")


class NonFiniteLossError(FloatingPointError):
    pass


def capacities_at(rcfg: RecursionConfig, step: int) -> tuple[float, ...]:
    """Expert-choice capacities of the train step at global step ``step`` (0-based).

    MoR (Bae et al., 2025, arXiv 2507.10524; the official code's ``cap_warmup_step``) warms the
    capacities up with a cosine from 1.0 down to the targets. Each capacity fixes a static top-k size,
    i.e. a compiled step, so the cosine is taken in ``P = capacity_warmup_phases`` stairs: phase
    p = min(P, floor(step * P / W)) uses its value at step p * W / P; phase P is the targets.
    """
    caps, w, n = rcfg.resolved_capacities, rcfg.capacity_warmup_steps, rcfg.capacity_warmup_phases
    phase = min(n, step * n // w) if w else n
    if phase == n:
        return caps
    # min(): c + (1 - c) may round one ulp above 1.0, which the config rejects.
    return tuple(min(1.0, warmup_capacity(c, phase * w / n, w)) for c in caps)


def init_params(cfg: Config, mesh) -> tuple[Any, Any, Any]:
    """(graphdef, params, shardings): parameters created directly in their shards."""
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh)
    # The key is an argument, not a constant: with nothing to read, XLA's GPU compiler tries to
    # constant-fold the whole random initialisation (minutes for a 1B model).
    make = jax.jit(lambda key: nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(key)))),
                   out_shardings=shardings)
    return graphdef, make(jax.random.key(cfg.train.seed)), shardings


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Places a global numpy batch on the mesh; each process contributes only its own rows."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    n, i = jax.process_count(), jax.process_index()
    out = {}
    for k, v in batch.items():
        rows = v.shape[0] // n
        out[k] = jax.make_array_from_process_local_data(sharding, v[i * rows:(i + 1) * rows], v.shape)
    return out


def evaluate(eval_fn, params, batches: list[dict], sharding) -> dict[str, float]:
    nll, tokens = 0.0, 0.0
    for b in batches:
        m = jax.device_get(eval_fn(params, to_global(b, sharding)))
        nll += float(m["nll_sum"])
        tokens += float(m["tokens"])
    loss = nll / max(tokens, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}


def check_mesh(cfg: Config):
    """The mesh of ``cfg`` on this host's devices, after checking that it fits them and the batch
    (before any data or tokenizer work starts)."""
    mesh = make_mesh(cfg.mesh)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    split = 1
    for axis in LOGICAL_RULES["batch"]:
        split *= sizes[axis]
    tc = cfg.train
    if tc.batch_size % split:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the mesh's "
                         f"{' x '.join(LOGICAL_RULES['batch'])} = {split} devices it is split over (mesh {sizes}); "
                         f"change train.batch_size or mesh.*")
    if cfg.model.moe.enabled:
        check_expert_split(cfg.model.moe.n_experts, sizes["expert"])
    return mesh


def train(cfg: Config, *, verbose: bool = True) -> dict:
    """Trains (or resumes) the run described by ``cfg``; returns a summary dict.

    The mesh is checked first, then the run directory is locked (:class:`RunLock`, process 0
    only) for the whole run, so a second process on the same directory fails at once."""
    mesh = check_mesh(cfg)
    lock = RunLock(cfg.resolved_run_dir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train(cfg, mesh, verbose=verbose)


def _train(cfg: Config, mesh, *, verbose: bool) -> dict:
    tc = cfg.train
    run_dir = cfg.resolved_run_dir
    changes = check_run_config(run_dir, cfg.to_dict())
    say = print if (verbose and jax.process_index() == 0) else (lambda *a, **k: None)

    init_from = cfg.recursion.init_from
    if init_from:  # uptraining a converted dense run: it must read the text with the same tokenizer
        if not os.path.isdir(os.path.join(init_from, "tokenizer")):
            raise FileNotFoundError(f"recursion.init_from={init_from!r}: not a jaxeff run directory "
                                    f"(no tokenizer/ inside)")
        if not os.path.isdir(os.path.join(run_dir, "tokenizer")):
            shutil.copytree(os.path.join(init_from, "tokenizer"), os.path.join(run_dir, "tokenizer"),
                            dirs_exist_ok=True)
    ds = prepare_dataset(cfg.data, tc.seq_len, tokenizer_dir=os.path.join(run_dir, "tokenizer"))
    if ds.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                         f"({ds.tokenizer.vocab_size}); raise model.vocab_size")
    say(f"[data] {cfg.data.corpus}: {ds.train_tokens_NxS.shape[0]} train / {ds.val_tokens_NxS.shape[0]} val sequences of "
        f"{tc.seq_len} tokens, tokenizer {cfg.data.tokenizer} ({ds.tokenizer.vocab_size} tokens); "
        f"unigram baseline {ds.unigram_entropy_nats:.3f} nats/token")
    if tc.batch_size > ds.train_tokens_NxS.shape[0]:
        raise ValueError(f"train.batch_size={tc.batch_size} exceeds the {ds.train_tokens_NxS.shape[0]} training "
                         f"sequences of the corpus; lower it or train.seq_len")

    with jax.set_mesh(mesh):
        graphdef, params, param_sh = init_params(cfg, mesh)
        tx = make_optimizer(tc, params)
        schedule = learning_rate_schedule(tc)
        loss_scheds = loss_schedules(cfg.model)  # adaptive MoE loss coefficients, kept in the state
        state = jax.jit(lambda p: init_state(p, tx, loss_scheds))(params)
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        del params
        ckpt = Checkpointer(run_dir, keep=tc.keep_ckpts)
        start, restored = ckpt.restore_latest(state, quarantine=True)
        if start:
            state = restored
            say(f"[resume] step {start} from {ckpt.directory}")
            if "train.steps" in changes:
                old_steps = changes["train.steps"][0]
                try:
                    old_lr = float(learning_rate_schedule(dataclasses.replace(tc, steps=old_steps))(start))
                except (ValueError, TypeError):
                    old_lr = float("nan")
                say(f"[resume] train.steps {old_steps} -> {tc.steps}: the learning-rate schedule is recomputed "
                    f"over {tc.steps} steps; step {start + 1} uses lr {float(schedule(start)):.3g} "
                    f"(the {old_steps}-step schedule gave {old_lr:.3g})")
        elif init_from:  # a fresh run starts from the converted dense weights (Adam's moments are zero anyway)
            from jaxeff.train.convert import convert_run

            rc = cfg.recursion
            converted = nnx.to_pure_dict(nnx.state(convert_run(init_from, rc, init=rc.init_method,
                                                               lora_init=rc.lora_init, seed=tc.seed)))
            place = lambda new, old: jax.make_array_from_callback(  # every process holds the whole array
                old.shape, old.sharding, lambda idx, a=np.asarray(new, old.dtype): a[idx])
            state["params"] = jax.tree.map(place, converted, state["params"])
            say(f"[init] converted the dense run {init_from} ({rc.init_method} init, LoRA {rc.lora_init})")
        batch_sh = batch_sharding(mesh)
        rcfg = cfg.recursion
        target_caps = rcfg.resolved_capacities
        param_like = jax.tree.map(lambda x: (x.shape, x.dtype), state["params"])
        step_fns: dict[tuple[float, ...], Any] = {}  # one jitted step per capacity phase, built when first used

        def step_fn_for(caps: tuple[float, ...]):
            if caps not in step_fns:
                gd = graphdef
                if caps != target_caps:
                    phase_rcfg = dataclasses.replace(rcfg, capacities=caps)
                    gd, abstract = abstract_model(dataclasses.replace(cfg, recursion=phase_rcfg))
                    # the capacities live in the graphdef only: every phase trains the same state
                    assert jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(abstract)) == param_like, \
                        f"capacities {caps} changed the parameters"
                step_fns[caps] = jax.jit(
                    make_train_step(gd, tx, grad_accum=tc.grad_accum, mask_documents=tc.mask_documents,
                                    schedules=loss_scheds),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
            return step_fns[caps]

        eval_fn = jax.jit(make_eval_step(graphdef, mask_documents=tc.mask_documents),
                          in_shardings=(state_sh["params"], batch_sh))
        val_batches = eval_batches(ds.val_tokens_NxS, ds.val_segment_ids_NxS, tc.batch_size, tc.eval_batches)
        metrics_log = MetricsLog(run_dir)
        # Steps after the resume point are trained again: their records from the run that stopped
        # (after its last checkpoint) are dropped, so every step is logged once.
        metrics_log.rollback(start)
        flops_tok = model_flops_per_token(cfg)
        peak = device_peak_flops()
        n_dev = mesh.size
        say(f"[model] {n_params / 1e6:.2f}M parameters, {flops_tok / 1e6:.1f} MFLOP/token, mesh "
            f"{dict(zip(mesh.axis_names, mesh.devices.shape))} on {n_dev} x {jax.devices()[0].device_kind}")

        tokens_per_step = tc.batch_size * tc.seq_len
        summary: dict[str, Any] = {"params": n_params, "unigram_nats": ds.unigram_entropy_nats,
                                   "bytes_per_token": ds.bytes_per_token, "start_step": start}
        bar = progress(tc.steps, start, cfg.name, enabled=verbose)
        t_mark, steps_since = time.perf_counter(), 0
        compile_s = None
        rates: list[tuple[float, bool]] = []  # (tokens/s, whether a capacity phase compiled in that interval)
        recompiled = False
        put = lambda i: to_global(batch_at(ds.train_tokens_NxS, ds.train_segment_ids_NxS, i, tc.batch_size, tc.seed),
                                  batch_sh)
        next_batch = put(start) if start < tc.steps else None
        for step in range(start, tc.steps):
            caps = capacities_at(rcfg, step)  # of the global step, so a resumed run picks the same phase
            recompiled |= compile_s is not None and caps not in step_fns
            state, m = step_fn_for(caps)(state, next_batch)
            # The next batch goes to the devices while this step runs (dispatch is asynchronous).
            next_batch = put(step + 1) if step + 1 < tc.steps else None
            steps_since += 1
            if compile_s is None:
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t_mark
                t_mark, steps_since = time.perf_counter(), 0
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                m = jax.device_get(m)
                _check_finite(state)
                now = time.perf_counter()
                tok_s = tokens_per_step * steps_since / max(now - t_mark, 1e-9) if steps_since else float("nan")
                if steps_since:
                    rates.append((tok_s, not recompiled))
                t_mark, steps_since, recompiled = now, 0, False
                util = mfu(flops_tok, tok_s, n_dev, peak)
                rec = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                       "lr": float(schedule(done)), "tokens_per_s": tok_s, "mfu": util}
                rec.update({k: float(np.mean(v)) for k, v in m.items() if k not in rec and k != "objective"
                            and np.ndim(v) == 0})
                if rcfg.capacity_warmup_steps:
                    rec.update({f"mor/capacity_r{r + 1}": c for r, c in enumerate(caps)})
                metrics_log.write(rec)
                post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{tok_s:,.0f}"}
                if caps != target_caps:
                    post["cap"] = f"{caps[-1]:.2f}"
                if util is not None:
                    post["mfu"] = f"{100 * util:.1f}%"
                bar.set_postfix(post, refresh=False)
            bar.update(1)
            if done % tc.eval_every == 0 or done == tc.steps:
                val = evaluate(eval_fn, state["params"], val_batches, batch_sh)
                val["val_bpb"] = val["val_loss"] / math.log(2) / ds.bytes_per_token
                metrics_log.write({"step": done, **val})
                summary.update(val)
                bar.write(f"[eval] step {done}: val loss {val['val_loss']:.4f} (ppl {val['val_ppl']:.2f}, "
                          f"{val['val_bpb']:.3f} bits/byte; unigram {ds.unigram_entropy_nats:.4f})") \
                    if jax.process_index() == 0 and verbose else None
            if done % tc.ckpt_every == 0 or done == tc.steps:
                _check_finite(state)
                ckpt.save(done, state)
        bar.close()
        ckpt.close()
        if "val_loss" not in summary:  # resumed a finished run: report its validation loss anyway
            summary.update(evaluate(eval_fn, state["params"], val_batches, batch_sh))
            summary["val_bpb"] = summary["val_loss"] / math.log(2) / ds.bytes_per_token
        # Intervals that compiled a new capacity phase are slow for that reason only: leave them out.
        rates = [r for r, clean in rates if clean] or [r for r, _ in rates]
        steady = rates[1:] if len(rates) > 2 else rates
        tok_s = float(np.median(steady)) if steady else float("nan")
        summary.update({"steps": tc.steps, "tokens_per_s": tok_s, "compile_s": compile_s,
                        "mfu": mfu(flops_tok, tok_s, n_dev, peak), "device": jax.devices()[0].device_kind,
                        "n_devices": n_dev, "final_params": state["params"], "graphdef": graphdef,
                        "tokenizer": ds.tokenizer})
    return summary


def _check_finite(state) -> None:
    bad = int(jax.device_get(state["nonfinite_step"]))
    if bad >= 0:
        # state counts steps from 0; metrics and checkpoints number them from 1.
        raise NonFiniteLossError(f"training stopped: the loss, gradient or parameter update became non-finite at "
                                 f"step {bad + 1}; its update was not applied, parameters were kept from before it "
                                 f"and no checkpoint was written with it. Lower train.lr or check the data.")

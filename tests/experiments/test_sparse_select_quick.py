"""experiments/sparse_select end to end: the reduced quick mode (``--smoke``: every method and
code path, fewer training steps and settings) trains the video model, evaluates every selector
on it and on SmolLM2's prefill, and writes the JSON and pictures. The full quick mode (the
committed results) is the slow test."""

import json

import pytest

from .loader import load_experiment

VIDEO_METHODS = {"local_window", "svg2", "paro", "adaspa", "efficient_vdit", "xattention"}
LLM_METHODS = {"local_window", "xattention", "minference", "adaspa", "svg2"}


def _load():
    return load_experiment("sparse_select", "run.py", name="sparse_select_run")


def check_report(out, mode):
    report = json.load(open(out / "results.json"))
    assert report["mode"].startswith(mode) and "CPU" in report["hardware"] or "x" in report["hardware"]
    video, llm = report["video"], report["llm"]
    assert {r["method"] for r in video["results"]} == VIDEO_METHODS
    assert {r["method"] for r in llm["results"]} == LLM_METHODS
    for part, task in ((video, "mse"), (llm, "nll_prefill")):
        for r in part["results"]:
            assert 0 < r["density"] <= 2.0 and 0 <= r["recall"] <= 1.0 + 1e-6, r["method"]
            assert r["rel_error"] >= 0 and r[task] > 0 and r["select_seconds"] >= 0, r["method"]
            assert len(r["per_layer"]) > 0 and r["mask_layer1_head0"]
        assert part["vs_local_window"] and all("beats_window" in c for c in part["vs_local_window"])
    # every method: more density, no more error than dense (error 0) and recall at most 1
    mapping = video["svg2_block_mapping"][0]
    assert mapping["variable"] <= mapping["cover"] + 1e-6  # the block cover never computes less
    assert set(video["reuse_across_steps"]) >= {"adaspa_every_step", "adaspa_step0_only", "svg2_warm_2iters"}
    for name in ("video_curves.png", "video_masks.png", "llm_curves.png", "llm_masks.png"):
        assert (out / name).stat().st_size > 10_000, name
    return report


@pytest.mark.slow
def test_quick_mode_smoke_end_to_end(tmp_path):
    run = _load()
    assert run.main(["--mode", "quick", "--smoke", "--out", str(tmp_path), "--quiet"]) == 0
    report = check_report(tmp_path, "quick")
    assert report["llm"]["dense"]["nll_prefill"] < 6.0  # SmolLM2 reads Shakespeare


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    run = _load()
    assert run.main(["--mode", "quick", "--out", str(tmp_path), "--quiet"]) == 0
    report = check_report(tmp_path, "quick")
    dense = report["video"]["dense"]["mse"]
    assert dense < 0.05  # the video model learned the task

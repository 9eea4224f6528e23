"""experiments/sparse_select's run bookkeeping: a part run alone (the video part on a GPU, the LLM
part elsewhere) joins the parts already in ``results.json`` of the same mode, a different mode
replaces them, and the training loop's prefetch yields every batch in order."""

import json
import threading

from .loader import load_experiment


def _load():
    return load_experiment("sparse_select", "run.py", name="sparse_select_run")


def test_a_part_run_alone_keeps_the_other_parts_of_its_mode(tmp_path):
    run = _load()
    run.save_report(str(tmp_path), {"mode": "full", "hardware": "GPU", "video": {"rows": 1}})
    run.save_report(str(tmp_path), {"mode": "full", "hardware": "CPU", "llm": {"rows": 2}})
    report = json.load(open(tmp_path / "results.json"))
    assert report["video"] == {"rows": 1} and report["llm"] == {"rows": 2} and report["hardware"] == "CPU"
    run.save_report(str(tmp_path), {"mode": "quick", "llm": {"rows": 3}})
    assert json.load(open(tmp_path / "results.json")) == {"mode": "quick", "llm": {"rows": 3}}


def test_prefetch_yields_every_item_in_order_from_worker_threads():
    run = _load()
    threads = set()

    def make(k):
        threads.add(threading.get_ident())
        return k * k

    assert list(run.video_model.prefetch(make, range(20), ahead=3, workers=2)) == [k * k for k in range(20)]
    assert threading.get_ident() not in threads
    assert list(run.video_model.prefetch(make, [])) == []

"""experiments/scaling.py: layouts parse, and every mesh layout reproduces its one-device loss curve."""

import json

import pytest

from .loader import load_experiment


def _load(name):
    return load_experiment(f"{name}.py", name=name)


def test_parse_layout():
    mod = _load("scaling")
    assert mod.parse_layout("4:data=2,tensor=2") == (4, {"data": 2, "fsdp": 1, "expert": 1, "tensor": 2}, None)
    assert mod.parse_layout("2:fsdp=2@32") == (2, {"data": 1, "fsdp": 2, "expert": 1, "tensor": 1}, 32)
    with pytest.raises(ValueError, match="must multiply to N=4"):
        mod.parse_layout("4:data=2")
    with pytest.raises(ValueError, match="unknown mesh axis 'pipe'"):
        mod.parse_layout("2:pipe=2")
    with pytest.raises(ValueError, match="expected N:axis=size"):
        mod.parse_layout("four")


@pytest.mark.slow
def test_layouts_match_one_device_loss_curves(tmp_path):
    mod = _load("scaling")
    out = tmp_path / "scaling.json"
    assert mod.main(["--preset", "tiny", "--set", "data.tokenizer=byte", "--set", "model.n_layers=2",
                     "--per-device-batch", "2", "--layout", "1:data=1", "--layout", "2:data=2",
                     "--layout", "4:fsdp=2,tensor=2@4", "--loss-steps", "3", "--timed-steps", "1",
                     "--tokenizer-dir", str(tmp_path / "tok"), "--out", str(out)]) == 0
    r = json.load(open(out))
    runs = {x["layout"]: x for x in r["runs"]}
    assert set(runs) == {"1:data=1", "2:data=2", "4:fsdp=2,tensor=2@4"}
    assert runs["2:data=2"]["global_batch"] == 4 and runs["4:fsdp=2,tensor=2@4"]["global_batch"] == 4
    assert r["references"]["4"]["from"].startswith("1 device, grad_accum=2")
    for x in runs.values():
        assert len(x["losses"]) == 3 and x["tokens_per_s"] > 0
        assert x["max_loss_diff"] < 1e-4, x["layout"]  # float32 tiny model: same maths, any layout
    assert runs["2:data=2"]["per_device_efficiency"] > 0  # against 1:data=1, the same batch per device
    plot = _load("plot_scaling")
    assert plot.main([str(out), "--out", str(tmp_path / "scaling.png")]) == 0
    assert (tmp_path / "scaling.png").stat().st_size > 10_000

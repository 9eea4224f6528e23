"""The colab/ notebooks run top to bottom (code cells only, shell and magic lines dropped), on
the CPU with few training steps, and each matches its py:percent twin (scripts/sync_notebooks.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
# what each notebook prints when it ran to the end
EXPECTED = {"mor_quickstart.ipynb": ("validation loss", "KV entries of the recursion blocks"),
            "block_sparse_attention.ipynb": ("max |kernel - dense|", "validation loss", "attention error vs dense"),
            "kv_eviction.ipynb": ("kept tokens per policy", "perplexity vs budget", "generated with a 12-slot H2O cache"),
            "blockffn.ipynb": ("validation loss", "expert activations", "CLS_8", "CLS_L:", "chunk-sparse kernel")}


def notebook_source(path: Path) -> str:
    nb = json.loads(path.read_text())
    lines = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for line in "".join(cell["source"]).splitlines():
            lines.append("" if line.lstrip().startswith(("!", "%")) else line)
        lines.append("")
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text("import matplotlib\nmatplotlib.use('Agg')\n" + notebook_source(path))
    env = {**os.environ, "JAXEFF_NOTEBOOK_STEPS": "30", "JAX_NUM_CPU_DEVICES": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for marker in EXPECTED[path.name]:
        assert marker in proc.stdout, (marker, proc.stdout[-3000:])


def test_notebooks_exist_and_match_their_py_percent_twins():
    assert NOTEBOOKS, "colab/ holds no notebook"
    assert {p.name for p in NOTEBOOKS} == set(EXPECTED)
    for nb in NOTEBOOKS:
        assert nb.with_suffix(".py").exists(), f"{nb.name} has no py:percent twin"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_notebooks.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout

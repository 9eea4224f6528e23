"""Keeps each ``colab/*.ipynb`` in step with its py:percent twin ``colab/*.py`` (the file that is
edited and reviewed). ``python scripts/sync_notebooks.py`` rewrites the notebooks from the twins;
``--check`` only reports differences (tests/test_notebooks.py runs it).

py:percent: ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose lines carry a
``# `` prefix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def percent_to_cells(text: str) -> list[dict]:
    cells, kind, lines = [], None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines())
            cells.append({"cell_type": "markdown", "metadata": {}, "source": _source(body)})
        else:
            cells.append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                          "source": _source(body)})

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def _source(body: str) -> list[str]:
    parts = body.split("\n")
    return [p + "\n" for p in parts[:-1]] + [parts[-1]]


def notebook(cells: list[dict]) -> dict:
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                       "name": "python3"},
                                        "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def twins() -> list[tuple[Path, Path]]:
    return [(p, p.with_suffix(".ipynb")) for p in sorted((ROOT / "colab").glob("*.py"))]


def main(argv: list[str]) -> int:
    stale = []
    for py, ipynb in twins():
        want = json.dumps(notebook(percent_to_cells(py.read_text())), indent=1, ensure_ascii=False) + "\n"
        if not ipynb.exists() or ipynb.read_text() != want:
            stale.append(ipynb.name)
            if "--check" not in argv:
                ipynb.write_text(want)
    if stale and "--check" in argv:
        print("out of date with their py:percent twins: " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

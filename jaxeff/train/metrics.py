"""Run logging: a JSONL file of metrics and a console progress bar."""

from __future__ import annotations

import json
import math
import os
import time

import jax
from tqdm.auto import tqdm


class MetricsLog:
    """Appends one JSON object per line to ``<run_dir>/metrics.jsonl`` (process 0 only)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0

    def rollback(self, step: int) -> int:
        """Drops the records of steps after ``step`` (those a resumed run trains again) and any
        line a crash cut short; returns how many lines were dropped. The file is replaced
        atomically."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                kept.append(line)
        if len(kept) == len(lines):
            return 0
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        return len(lines) - len(kept)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
                 for k, v in record.items()}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        clean["time"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def progress(total: int, initial: int, desc: str, *, enabled: bool = True):
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0, mininterval=1.0)

"""Checkpoints through orbax: periodic saves, keep the last N, resume from the latest complete one.

orbax writes each checkpoint into a temporary directory and renames it only when complete, so a
run killed during a save leaves the previous checkpoint as the latest; the temporary directory is
ignored. A checkpoint that fails to restore, or a run directory written by an incompatible
configuration, raises :class:`CheckpointError` and is left untouched.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"  # where train() saves the tokenizer and the token caches


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, run_dir: str, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """Restores ``step`` into the structure, dtypes and shardings of ``like`` (arrays or
        ``jax.ShapeDtypeStruct``s)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types; all mean the same to the user
            raise CheckpointError(
                f"checkpoint at step {step} in {self.directory} could not be restored "
                f"({type(e).__name__}: {str(e)[:300]}). It was left untouched: move that step's directory away to "
                f"resume from an earlier checkpoint, or train into a new run directory.") from e

    def close(self) -> None:
        self._manager.close()


def _has_checkpoint(run_dir: str) -> bool:
    """Whether a completed checkpoint step directory (named by its step number) exists."""
    directory = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _write_config(run_dir: str, config_dict: dict) -> None:
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, CONFIG_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def check_run_config(run_dir: str, config_dict: dict, *, sections: tuple[str, ...] = ("model", "data")) -> None:
    """Writes the run's config on first use; on resume, refuses a config whose ``sections``
    differ from the one the checkpoints were written with.

    A run that stopped before its first checkpoint (a bad setting, a missing corpus) has nothing
    to resume, so its saved config is replaced, unless the data settings changed and a tokenizer
    built from the old ones was already saved in ``<run_dir>/tokenizer`` (it would be reused)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        _write_config(run_dir, config_dict)
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the run directory looks corrupted") from e
    diffs: dict[str, dict] = {}
    for section in sections:
        old, new = saved.get(section, {}), config_dict.get(section, {})
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        if diff:
            diffs[section] = diff
    if not diffs:
        return
    detail = ", ".join(f"{section}.{k}: saved {a!r} vs now {b!r}"
                       for section, diff in diffs.items() for k, (a, b) in diff.items())
    if _has_checkpoint(run_dir):
        held = "checkpoints"
    elif "data" in diffs and os.path.isdir(os.path.join(run_dir, TOKENIZER_DIR)):
        held = "a tokenizer"
    else:
        _write_config(run_dir, config_dict)
        return
    raise CheckpointError(f"run directory {run_dir} holds {held} of a different configuration "
                          f"({detail}); use a new run directory (--set run_dir=...) or the saved settings")


def load_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a jaxeff run directory: {CONFIG_FILE} is missing")
    with open(path) as f:
        return json.load(f)

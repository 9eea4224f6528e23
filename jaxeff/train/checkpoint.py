"""Checkpoints through orbax, verified by checksums; the run directory's lock and config guard.

* orbax writes each checkpoint into a temporary directory and renames it only when complete, so
  a run killed during a save leaves the previous checkpoint as the latest; the temporary
  directory is ignored.
* After the rename, :class:`Checkpointer` writes ``<step>/jaxeff_checksum.json`` (atomically):
  the SHA-256 of every file of the step. A step is *intact* when its files match. Before the first
  checksummed save into a directory, ``checkpoints/jaxeff_integrity.json`` records the step from
  which every step must carry a checksum, so a step of this version without one (the process died
  between orbax's rename and the checksum write) is not trusted, while steps an older jaxeff wrote
  without checksums still restore, unverified.
* Restoring takes the latest intact step: a damaged or unverifiable one is reported with a
  warning naming it, and the previous step is used. ``train`` moves damaged steps to
  ``<run_dir>/bad_checkpoints/`` (never deletes them) so that it can save those steps again;
  ``eval`` / ``generate`` only read.
* :class:`RunLock` makes a run directory exclusive to one training process (``fcntl.flock``:
  the kernel releases it when the holder exits or is killed, so a stale lock file never blocks).
* :func:`check_run_config` refuses to resume with settings that would change what the
  checkpoints mean (see ``TrainConfig``'s docstring for the policy) and keeps ``config.json``
  equal to the settings the run continues with.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flax import nnx

from jaxeff.config import RESUMABLE_TRAIN_FIELDS, SECTIONS, Config
from jaxeff.models.factory import abstract_model
from jaxeff.moe.schedule import loss_schedules
from jaxeff.train.optimizer import make_optimizer
from jaxeff.train.step import init_state

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"  # where train() saves the tokenizer and the token caches
LOCK_FILE = ".lock"
CHECKSUM_FILE = "jaxeff_checksum.json"  # inside each step directory
INTEGRITY_FILE = "jaxeff_integrity.json"  # inside checkpoints/: from which step checksums are required
BAD_DIR = "bad_checkpoints"  # where train() moves damaged steps
PARAMETER_SECTIONS = ("model", "recursion")  # config sections that shape the parameter tree
FREE_SECTIONS = ("mesh",)  # may change freely on resume (the checkpoint is resharded on restore)

log = logging.getLogger("jaxeff.train")


class CheckpointError(RuntimeError):
    pass


class RunDirLockedError(CheckpointError):
    pass


# --- checksums ------------------------------------------------------------------------------------

def _step_files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != CHECKSUM_FILE:
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def step_checksums(step_dir: str) -> dict[str, dict]:
    """``{relative path: {'size', 'sha256'}}`` of every file of a step directory (hashed in
    threads: hashlib releases the GIL, so large checkpoints hash at disk speed)."""
    files = _step_files(step_dir)
    paths = [os.path.join(step_dir, f) for f in files]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_sha256, paths))
    return {f: {"size": os.path.getsize(p), "sha256": d} for f, p, d in zip(files, paths, digests)}


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class Checkpointer:
    """Saves and restores training states, one directory per step under ``<run_dir>/checkpoints``.

    ``create=False`` (what the read-only commands use) never creates the directory."""

    def __init__(self, run_dir: str, keep: int = 3, *, create: bool = True):
        self.run_dir = os.path.abspath(run_dir)
        self.directory = os.path.join(self.run_dir, "checkpoints")
        # The handler is named up front so that a manager which has not saved yet (a resumed run,
        # eval) can read a step's metadata (the parameter tree checked by restore()).
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False),
            item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        """The latest step orbax finished, intact or not (see :meth:`latest_intact_step`)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # --- saving -----------------------------------------------------------------------------------

    def _checksummed_from(self) -> int | None:
        try:
            with open(os.path.join(self.directory, INTEGRITY_FILE)) as f:
                return int(json.load(f)["checksummed_from"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return 0  # unreadable: trust nothing without a checksum

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` as ``step``; once orbax has renamed it into place, process 0 writes its
        checksum file (a crash in between leaves a step that :meth:`verify` does not trust)."""
        if jax.process_index() == 0 and self._checksummed_from() is None:
            os.makedirs(self.directory, exist_ok=True)
            _write_json_atomic(os.path.join(self.directory, INTEGRITY_FILE),
                               {"format": 1, "checksummed_from": int(step),
                                "note": "every step >= checksummed_from has a jaxeff_checksum.json"})
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            self._write_checksum(step)

    def _write_checksum(self, step: int) -> None:
        step_dir = self.step_dir(step)
        _write_json_atomic(os.path.join(step_dir, CHECKSUM_FILE),
                           {"format": 1, "step": int(step), "algorithm": "sha256", "files": step_checksums(step_dir)})

    # --- verifying --------------------------------------------------------------------------------

    def verify(self, step: int) -> tuple[bool, str | None]:
        """``(verified, problem)``: ``problem`` is None for a step that may be restored; ``verified``
        says whether its checksum was checked (False for a step an older jaxeff wrote)."""
        step_dir = self.step_dir(step)
        path = os.path.join(step_dir, CHECKSUM_FILE)
        if not os.path.exists(path):
            since = self._checksummed_from()
            if since is not None and step >= since:
                return False, (f"it has no {CHECKSUM_FILE}: its save did not finish (the process stopped between "
                               f"writing the step and its checksum)")
            return False, None
        try:
            with open(path) as f:
                expected = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return False, f"its {CHECKSUM_FILE} is unreadable ({type(e).__name__})"
        found = _step_files(step_dir)
        missing = sorted(set(expected) - set(found))
        if missing:
            return True, f"{missing[0]} is missing ({len(missing)} file(s) in all)"
        extra = sorted(set(found) - set(expected))
        if extra:
            return True, f"{extra[0]} was not part of the saved step"
        for rel in found:
            if os.path.getsize(os.path.join(step_dir, rel)) != expected[rel]["size"]:
                return True, f"{rel} does not match its checksum (size changed)"
        actual = step_checksums(step_dir)
        for rel in found:
            if actual[rel]["sha256"] != expected[rel]["sha256"]:
                return True, f"{rel} does not match its checksum"
        return True, None

    def _choose(self) -> tuple[int | None, list[tuple[int, str]], bool]:
        """(latest restorable step or None, [(damaged step, problem)] newer than it, verified)."""
        bad: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            verified, problem = self.verify(step)
            if problem is None:
                return step, bad, verified
            log.warning("checkpoint step %d in %s is damaged: %s; falling back to the previous step",
                        step, self.directory, problem)
            bad.append((step, problem))
        return None, bad, False

    def latest_intact_step(self) -> int | None:
        return self._choose()[0]

    # --- restoring --------------------------------------------------------------------------------

    def restore(self, step: int, like: Any, *, verified: bool | None = None) -> Any:
        """Restores ``step`` into the structure, dtypes and shardings of ``like`` (arrays or
        ``jax.ShapeDtypeStruct``s). A parameter tree that differs from the checkpoint's is reported
        as a configuration change; any other failure as one sentence naming the exception type."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        if step not in self.all_steps():
            raise CheckpointError(f"checkpoint at step {step} in {self.directory} does not exist "
                                  f"(steps: {sorted(self.all_steps())})")
        mismatch = self._tree_mismatch(step, abstract)
        if mismatch:
            raise CheckpointError(
                f"checkpoint at step {step} in {self.directory} could not be restored: it holds a different parameter "
                f"tree than this run's configuration builds ({mismatch}). This is a configuration change, not a "
                f"damaged checkpoint: resume with the settings the run was trained with, or train into a new run "
                f"directory.")
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types; all mean the same to the user
            log.debug("restoring step %d failed", step, exc_info=True)
            if verified is None:
                verified = os.path.exists(os.path.join(self.step_dir(step), CHECKSUM_FILE))
            if verified:
                raise CheckpointError(
                    f"checkpoint at step {step} in {self.directory} could not be restored ({type(e).__name__}). Its "
                    f"files match their checksums, so the jaxeff or orbax version or the configuration differs from "
                    f"the one that wrote it: use that version, or train into a new run directory.") from e
            raise CheckpointError(
                f"checkpoint at step {step} in {self.directory} could not be restored ({type(e).__name__}). It was "
                f"left untouched: move that step's directory away to resume from an earlier checkpoint, or train "
                f"into a new run directory.") from e

    def _tree_mismatch(self, step: int, abstract: Any) -> str | None:
        """The first difference between the saved parameters' paths / shapes / dtypes and those of
        ``abstract['params']``, or None (also when the metadata cannot be read)."""
        if not isinstance(abstract, dict) or "params" not in abstract:
            return None
        try:
            meta = self._manager.item_metadata(step)
            saved_tree = getattr(meta, "tree", meta)["params"]
        except Exception:  # unreadable metadata: the restore itself will report it
            return None

        def flat(tree, leaf):
            out = {}
            for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)[0]:
                key = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
                out[key] = (tuple(x.shape), np.dtype(x.dtype).name)
            return out

        saved = flat(saved_tree, lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
        now = flat(abstract["params"], None)
        for key in sorted(set(saved) | set(now)):
            a, b = saved.get(key), now.get(key)
            if a != b:
                show = lambda v: "absent" if v is None else f"{v[0]} {v[1]}"  # noqa: E731
                return f"params.{key}: saved {show(a)}, now {show(b)}"
        return None

    def restore_latest(self, like: Any, *, quarantine: bool = False) -> tuple[int, Any]:
        """``(step, state)`` of the latest intact step (``(0, None)`` when there is no step).

        Damaged steps newer than it are named in a warning; with ``quarantine`` they are moved to
        ``<run_dir>/bad_checkpoints/`` so that training can save those steps again. In a
        multi-process run process 0 decides and the others follow."""
        multi = jax.process_count() > 1
        if not multi or jax.process_index() == 0:
            step, bad, verified = self._choose()
        else:
            step, bad, verified = None, [], False
        if multi:
            from jax.experimental import multihost_utils

            decided = multihost_utils.broadcast_one_to_all(
                np.asarray([-1 if step is None else step, len(bad), int(verified)], np.int64))
            step = None if int(decided[0]) < 0 else int(decided[0])
            n_bad, verified = int(decided[1]), bool(decided[2])
        else:
            n_bad = len(bad)
        if step is None and n_bad:
            names = ", ".join(f"{s} ({p})" for s, p in bad) if bad else f"{n_bad} step(s)"
            raise CheckpointError(f"no intact checkpoint in {self.directory}: every step is damaged: {names}. Nothing "
                                  f"was changed; train into a new run directory, or move the damaged steps away to "
                                  f"start this one afresh.")
        if quarantine and n_bad:
            if jax.process_index() == 0:
                for s, _ in bad:
                    self._quarantine(s)
            if multi:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("jaxeff_checkpoint_quarantine")
            self._manager.reload()
        if step is None:
            return 0, None
        return step, self.restore(step, like, verified=verified)

    def _quarantine(self, step: int) -> str:
        dest_root = os.path.join(self.run_dir, BAD_DIR)
        os.makedirs(dest_root, exist_ok=True)
        dest = os.path.join(dest_root, str(step))
        if os.path.exists(dest):
            dest = f"{dest}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
        os.replace(self.step_dir(step), dest)
        log.warning("moved the damaged checkpoint step %d to %s", step, dest)
        return dest

    def close(self) -> None:
        self._manager.close()


def _checkpoint_steps(run_dir: str) -> list[int]:
    """Completed checkpoint step directories (named by their step number)."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _has_checkpoint(run_dir: str) -> bool:
    return bool(_checkpoint_steps(run_dir))


# --- the run directory's lock -----------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run directory: ``fcntl.flock`` on ``<run_dir>/.lock``.

    The holder writes its pid, host and start time into the file; a second process (or a second
    lock in the same process) fails at once with :class:`RunDirLockedError` naming the holder. The
    kernel releases a flock when its process exits, however it exits (``kill -9`` included), so a
    lock file left behind never blocks a later run. Use as a context manager."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _describe_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirLockedError(f"run directory {self.run_dir} is in use by another jaxeff training process "
                                    f"({holder}); wait for it to finish or stop it, or train into another run "
                                    f"directory (--set run_dir=...)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        text = f"pid {int(info['pid'])}"
        if info.get("host") and info["host"] != socket.gethostname():
            text += f" on host {info['host']}"
        if info.get("started"):
            text += f", started {info['started']}"
        return text
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not written yet"


# --- the run's configuration --------------------------------------------------------------------------

def _write_config(run_dir: str, config_dict: dict) -> None:
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, CONFIG_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def _section_diff(saved: dict, new: dict, section: str) -> dict[str, tuple]:
    old_values, new_values = saved.get(section), new.get(section)
    if old_values is None and new_values is None:
        return {}
    if section in SECTIONS:
        # A section an older jaxeff did not write (recursion: the dense model) held its defaults.
        defaults = dataclasses.asdict(SECTIONS[section]())
        old_values = defaults if old_values is None else old_values
        new_values = defaults if new_values is None else new_values
    if not isinstance(old_values, dict) or not isinstance(new_values, dict):
        return {"": (old_values, new_values)} if old_values != new_values else {}
    return {k: (old_values.get(k), new_values.get(k)) for k in sorted(set(old_values) | set(new_values))
            if old_values.get(k) != new_values.get(k)}


def _as_written_now(config_dict: dict) -> dict:
    """A config dict as this version writes it: fields added since take their defaults, older
    spellings (``recursion.capacities`` as a string) are normalised. One that does not parse is
    compared as written (the difference is then reported)."""
    if not all(isinstance(config_dict.get(s), dict) for s in SECTIONS):
        return config_dict
    try:
        return Config.from_dict(config_dict).to_dict()
    except ValueError:
        return config_dict


def check_run_config(run_dir: str, config_dict: dict) -> dict[str, tuple]:
    """Writes the run's config on first use; on resume, refuses a config that changes what the
    checkpoints mean, and returns the allowed changes ``{'train.steps': (old, new), ...}``.

    With checkpoints, every section is compared except ``mesh``: ``model`` and ``recursion``
    change the parameter tree (reported as a configuration change, not a damaged checkpoint),
    ``data`` the tokens, and in ``train`` only ``RESUMABLE_TRAIN_FIELDS`` may change (``steps``
    not below the latest checkpoint's step). After an allowed change ``config.json`` is rewritten.

    A run that stopped before its first checkpoint (a bad setting, a missing corpus) has nothing
    to resume, so its saved config is replaced, unless the data settings changed and a tokenizer
    built from the old ones was already saved in ``<run_dir>/tokenizer`` (it would be reused)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        _write_config(run_dir, config_dict)
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the run directory looks corrupted") from e
    saved = _as_written_now(saved)
    steps = _checkpoint_steps(run_dir)
    sections = [s for s in dict.fromkeys([*saved, *config_dict])
                if s not in FREE_SECTIONS and (isinstance(saved.get(s), dict) or isinstance(config_dict.get(s), dict)
                                               or s in SECTIONS)]
    refused: dict[str, tuple] = {}
    allowed: dict[str, tuple] = {}
    for section in sections:
        for k, change in _section_diff(saved, config_dict, section).items():
            key = f"{section}.{k}" if k else section
            if section == "train" and k in RESUMABLE_TRAIN_FIELDS:
                allowed[key] = change
            else:
                refused[key] = change
    if saved == config_dict:
        return {}
    detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in refused.items())
    if steps:
        if refused:
            why = []
            if any(k.split(".")[0] in PARAMETER_SECTIONS for k in refused):
                why.append("model and recursion settings shape the parameters, so this is a configuration change, "
                           "not a damaged checkpoint")
            if any(k.startswith("train.") for k in refused):
                why.append(f"on resume only these train fields may change: {', '.join(RESUMABLE_TRAIN_FIELDS)}")
            raise CheckpointError(f"run directory {run_dir} holds checkpoints of a different configuration ({detail})"
                                  + (f"; {'; '.join(why)}" if why else "")
                                  + "; use a new run directory (--set run_dir=...) or the saved settings")
        new_steps = (config_dict.get("train") or {}).get("steps")
        if "train.steps" in allowed and isinstance(new_steps, int) and new_steps < steps[-1]:
            raise CheckpointError(f"train.steps={new_steps} is below the step of the latest checkpoint in {run_dir} "
                                  f"(step {steps[-1]}): a run cannot be shortened past its checkpoints; use "
                                  f"train.steps >= {steps[-1]} or a new run directory")
    else:
        data_refused = {k: v for k, v in refused.items() if k.startswith("data.") or k == "data"}
        if data_refused and os.path.isdir(os.path.join(run_dir, TOKENIZER_DIR)):
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in data_refused.items())
            raise CheckpointError(f"run directory {run_dir} holds a tokenizer of a different configuration "
                                  f"({detail}); use a new run directory (--set run_dir=...) or the saved settings")
    _write_config(run_dir, config_dict)
    return allowed


def load_run_config(run_dir: str) -> dict:
    """The saved ``config.json`` of a run directory; errors name the file."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a jaxeff run directory: {CONFIG_FILE} is missing")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a config must be a JSON object, got {type(d).__name__}")
    return d


def restore_run(run_dir: str) -> tuple[Config, Any, Any, int]:
    """(config, graphdef, params, step) of a run directory's latest intact checkpoint, on one
    device."""
    try:
        cfg = Config.from_dict(load_run_config(run_dir))
    except ValueError as e:
        path = os.path.join(run_dir, CONFIG_FILE)
        raise ValueError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):  # read-only: never create it
        raise FileNotFoundError(f"{run_dir}: no checkpoint found (there is no {directory})")
    ckpt = Checkpointer(run_dir, create=False)
    try:
        if not ckpt.all_steps():
            raise FileNotFoundError(f"{run_dir}: no checkpoint found under {ckpt.directory}")
        graphdef, abstract = abstract_model(cfg)
        params_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract))
        tx = make_optimizer(cfg.train, params_like)
        like = jax.eval_shape(lambda p: init_state(p, tx, loss_schedules(cfg.model)), params_like)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), like)
        step, state = ckpt.restore_latest(like)
    finally:
        ckpt.close()
    return cfg, graphdef, state["params"], step

"""Loading an experiment script (experiments/ is not a package) as a module for its test."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_experiment(*parts: str, name: str | None = None):
    """The module of ``experiments/<parts...>`` (e.g. ``load_experiment("mor", "run.py")``), loaded
    as running the script would see it: its folder on ``sys.path`` (for its sibling modules) and
    the module in ``sys.modules`` under ``name`` (dataclasses look their module up)."""
    path = os.path.join(ROOT, "experiments", *parts)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name or "_".join(parts).removesuffix(".py"), path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod

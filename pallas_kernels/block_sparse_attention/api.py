"""Which implementation of block-sparse attention runs (tokamax-style registry).

Every implementation has the same entry point
``fn(q, k, v, layout, element_mask, *, scale, score_mod, return_lse, interpret) -> (o, lse | None)``
and an ``applies(...) -> (bool, reason)``. ``impl="auto"`` picks ``mosaic_gpu`` on Hopper GPUs
(compute capability 9.x) when it applies, ``splash`` on TPU, and the ``reference`` otherwise;
interpret-mode kernels run only when asked for by name (on CPU, ``impl="pallas"`` and
``impl="splash"`` run in interpret mode). A named implementation that does not apply raises
``ValueError`` with the reason. The choice is logged at debug level (logger
``pallas_kernels.block_sparse_attention``) and :func:`which_impl` answers it without running.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Callable

import jax

from pallas_kernels.block_sparse_attention.common import ElementMask, SparseLayout, check_inputs

logger = logging.getLogger("pallas_kernels.block_sparse_attention")

_PKG = "pallas_kernels.block_sparse_attention"


@dataclasses.dataclass(frozen=True)
class Implementation:
    """``module`` holds ``block_sparse_attention`` (the entry point) and may hold ``applies``
    (extra conditions, called as ``applies(q, k, v, layout, element_mask, score_mod=..,
    interpret=..)``); ``backend_ok(interpret)`` is the device check done here."""
    name: str
    module: str
    backend_ok: Callable[[bool], tuple[bool, str]]

    def load(self):
        return importlib.import_module(f"{_PKG}.{self.module}")

    def applies(self, q, k, v, layout, element_mask, *, score_mod=None, interpret=False) -> tuple[bool, str]:
        ok, why = self.backend_ok(interpret)
        if not ok:
            return False, why
        try:
            mod = self.load()
        except Exception as e:  # noqa: BLE001 - a module that does not import is a reason, not a crash
            return False, f"{_PKG}.{self.module} cannot be imported ({type(e).__name__}: {e})"
        if hasattr(mod, "applies"):
            return mod.applies(q, k, v, layout, element_mask, score_mod=score_mod, interpret=interpret)
        return True, "ok"


def _backend() -> str:
    return jax.default_backend()


def _is_hopper() -> tuple[bool, str]:
    if _backend() != "gpu":
        return False, f"needs an NVIDIA Hopper GPU (compute capability 9.x); the backend is {_backend()}"
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    if not cc.startswith("9"):
        return False, f"needs an NVIDIA Hopper GPU (compute capability 9.x), found compute capability {cc}"
    return True, "ok"


def _anywhere(interpret: bool) -> tuple[bool, str]:
    return True, "ok"


def _pallas_backend(interpret: bool) -> tuple[bool, str]:
    if interpret or _backend() == "gpu":
        return True, "ok"
    return False, f"the portable kernel runs on GPU, or in interpret mode (backend {_backend()})"


def _mosaic_backend(interpret: bool) -> tuple[bool, str]:
    return (True, "ok") if interpret else _is_hopper()


def _splash_backend(interpret: bool) -> tuple[bool, str]:
    if interpret or _backend() == "tpu":
        return True, "ok"
    return False, f"splash runs on TPU (backend {_backend()}); interpret=True runs it on CPU"


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation("reference", "reference", _anywhere),
    "pallas": Implementation("pallas", "portable", _pallas_backend),
    "mosaic_gpu": Implementation("mosaic_gpu", "mosaic_gpu", _mosaic_backend),
    "splash": Implementation("splash", "splash", _splash_backend),
}
NAMES = ("auto", *IMPLEMENTATIONS)


def _check_impl(impl) -> None:
    if impl not in NAMES:
        raise ValueError(f"block_sparse_attention: unknown impl {impl!r}; known: {', '.join(NAMES)}")


def _interpret_for(name: str, interpret: bool | None) -> bool:
    """Named kernels on CPU run in interpret mode; elsewhere compiled unless asked."""
    if interpret is not None:
        return bool(interpret)
    return name != "reference" and _backend() == "cpu"


def choose(q, k, v, layout: SparseLayout, element_mask: ElementMask, *, impl: str = "auto", score_mod=None,
           interpret: bool | None = None) -> tuple[str, bool, str]:
    """(name, interpret, why) of the implementation that runs. ``q``/``k``/``v`` may be
    ``jax.ShapeDtypeStruct``s."""
    _check_impl(impl)
    check_inputs(q, k, v, layout)
    if impl != "auto":
        interp = _interpret_for(impl, interpret)
        ok, why = IMPLEMENTATIONS[impl].applies(q, k, v, layout, element_mask, score_mod=score_mod, interpret=interp)
        if not ok:
            raise ValueError(f"block_sparse_attention: impl={impl!r} does not apply: {why}")
        return impl, interp, "asked for"
    interp = bool(interpret)
    skipped = []
    backend = _backend()
    if backend == "gpu" and _is_hopper()[0]:
        ok, why = IMPLEMENTATIONS["mosaic_gpu"].applies(q, k, v, layout, element_mask, score_mod=score_mod,
                                                       interpret=interp)
        if ok:
            return "mosaic_gpu", interp, "Hopper GPU"
        skipped.append(f"mosaic_gpu: {why}")
    if backend == "tpu":
        ok, why = IMPLEMENTATIONS["splash"].applies(q, k, v, layout, element_mask, score_mod=score_mod,
                                                   interpret=interp)
        if ok:
            return "splash", interp, "TPU"
        from pallas_kernels.block_sparse_attention import splash
        if splash.traced_mask(layout, element_mask):
            raise ValueError(f"block_sparse_attention on TPU: {why}. Build the mask outside jit, use structured "
                             "masks with (traced) segment ids, or pass impl='reference'.")
        skipped.append(f"splash: {why}")
        logger.warning("block_sparse_attention: splash does not apply (%s); running the dense reference", why)
    return "reference", False, "fallback" + (f" ({'; '.join(skipped)})" if skipped else "")


def which_impl(q, k, v, layout: SparseLayout, element_mask: ElementMask | None = None, *, impl: str = "auto",
               score_mod=None, interpret: bool | None = None) -> str:
    """The name of the implementation ``block_sparse_attention`` would run for these inputs
    (arrays or ``jax.ShapeDtypeStruct``), without running it."""
    return choose(q, k, v, layout, element_mask or ElementMask(), impl=impl, score_mod=score_mod,
                  interpret=interpret)[0]


def block_sparse_attention(q, k, v, layout: SparseLayout, element_mask: ElementMask | None = None, *,
                           scale: float | None = None, score_mod=None, impl: str = "auto", return_lse: bool = False,
                           interpret: bool | None = None):
    """Dispatches to an implementation; returns (o [B, T, H, D], LSE [B, H, T] float32 or None)."""
    em = element_mask or ElementMask()
    name, interp, why = choose(q, k, v, layout, em, impl=impl, score_mod=score_mod, interpret=interpret)
    logger.debug("block_sparse_attention: impl=%s (%s) interpret=%s q=%s%s k=%s blocks=%dx%d", name, why, interp,
                 q.dtype, tuple(q.shape), tuple(k.shape), layout.block_q, layout.block_kv)
    fn = IMPLEMENTATIONS[name].load().block_sparse_attention
    return fn(q, k, v, layout, em, scale=scale, score_mod=score_mod, return_lse=return_lse, interpret=interp)

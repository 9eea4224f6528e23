"""The implementation registry: automatic choice per backend, forced implementations, errors,
``which_impl`` and the debug log line."""

from __future__ import annotations

import ast
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import api
from pallas_kernels.block_sparse_attention.common import ElementMask

from .test_base import causal_fn, layout_from_dense

T = 128


def _inputs(dtype=jnp.float32, d=32, h=2, kh=1):
    return (jax.ShapeDtypeStruct((1, T, h, d), dtype), jax.ShapeDtypeStruct((1, T, kh, d), dtype),
            jax.ShapeDtypeStruct((1, T, kh, d), dtype))


def _layout(bq=64, bk=128):
    return layout_from_dense(np.tril(np.ones((T, T), bool))[None, None], bq, bk)


EM = ElementMask(index_fn=causal_fn)


class _FakeImpl:
    """Stands in for an implementation whose ``applies`` we choose."""
    def __init__(self, ok):
        self.ok = ok

    def applies(self, *args, **kwargs):
        return (True, "ok") if self.ok else (False, "fake says no")


def test_auto_on_cpu_is_the_reference():
    assert jax.default_backend() == "cpu"
    assert api.which_impl(*_inputs(), _layout(), EM) == "reference"


@pytest.mark.parametrize("impl", ["reference", "pallas", "splash"])
def test_named_impls_apply_on_cpu_in_interpret_mode(impl):
    name, interpret, _ = api.choose(*_inputs(), _layout(), EM, impl=impl)
    assert name == impl and interpret == (impl != "reference")


def test_auto_on_tpu_picks_splash(monkeypatch):
    monkeypatch.setattr(api, "_backend", lambda: "tpu")
    assert api.which_impl(*_inputs(), _layout(), EM) == "splash"


def test_auto_on_tpu_falls_back_when_splash_does_not_apply(monkeypatch, caplog):
    monkeypatch.setattr(api, "_backend", lambda: "tpu")
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.block_sparse_attention"):
        assert api.which_impl(*_inputs(), _layout(bk=64), EM) == "reference"
    assert "block_kv" in caplog.text


def test_auto_on_tpu_traced_dense_mask_raises(monkeypatch):
    monkeypatch.setattr(api, "_backend", lambda: "tpu")
    layout = _layout()

    @jax.jit
    def f(dense):
        with pytest.raises(ValueError, match="TPU.*static"):
            api.which_impl(*_inputs(), layout, ElementMask(dense=dense))
        return dense

    f(jnp.ones((1, 1, T, T), bool))


def test_auto_on_hopper_picks_mosaic_gpu_when_it_applies(monkeypatch):
    monkeypatch.setattr(api, "_backend", lambda: "gpu")
    monkeypatch.setattr(api, "_is_hopper", lambda: (True, "ok"))
    monkeypatch.setitem(api.IMPLEMENTATIONS, "mosaic_gpu", _FakeImpl(True))
    assert api.which_impl(*_inputs(), _layout(), EM) == "mosaic_gpu"
    monkeypatch.setitem(api.IMPLEMENTATIONS, "mosaic_gpu", _FakeImpl(False))
    assert api.which_impl(*_inputs(), _layout(), EM) == "reference"


def test_auto_on_other_gpus_is_the_reference(monkeypatch):
    monkeypatch.setattr(api, "_backend", lambda: "gpu")
    monkeypatch.setattr(api, "_is_hopper", lambda: (False, "compute capability 8.0"))
    monkeypatch.setitem(api.IMPLEMENTATIONS, "mosaic_gpu", _FakeImpl(True))
    assert api.which_impl(*_inputs(), _layout(), EM) == "reference"


def test_mosaic_gpu_is_imported_lazily_and_a_missing_module_is_a_reason(monkeypatch):
    impl = api.Implementation("mosaic_gpu", "no_such_module_here", lambda interpret: (True, "ok"))
    ok, why = impl.applies(*_inputs(), _layout(), EM, interpret=True)
    assert not ok and "cannot be imported" in why
    monkeypatch.setitem(api.IMPLEMENTATIONS, "mosaic_gpu", impl)
    with pytest.raises(ValueError, match="impl='mosaic_gpu' does not apply.*cannot be imported"):
        api.which_impl(*_inputs(), _layout(), EM, impl="mosaic_gpu")


def test_forced_impl_that_does_not_apply_raises_with_the_reason():
    with pytest.raises(ValueError, match="impl='splash' does not apply: splash needs block_kv a multiple of 128"):
        api.which_impl(*_inputs(), _layout(bk=64), EM, impl="splash")
    with pytest.raises(ValueError, match="impl='splash' does not apply: splash runs on TPU"):
        api.which_impl(*_inputs(), _layout(), EM, impl="splash", interpret=False)


def test_unknown_impl_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown impl 'triton'; known: auto, reference, pallas, mosaic_gpu, splash"):
        api.which_impl(*_inputs(), _layout(), EM, impl="triton")


def test_debug_log_names_the_implementation(caplog):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, T, 2, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, T, 1, 32)), jnp.float32)
    with caplog.at_level(logging.DEBUG, logger="pallas_kernels.block_sparse_attention"):
        o, lse = api.block_sparse_attention(q, k, k, _layout(), EM)
    assert lse is None and o.shape == q.shape
    assert "impl=reference" in caplog.text


def test_bad_shapes_raise_naming_the_argument():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="heads"):
        api.which_impl(q, jax.ShapeDtypeStruct((1, T, 3, 32), jnp.float32),
                       jax.ShapeDtypeStruct((1, T, 3, 32), jnp.float32), _layout(), EM)
    with pytest.raises(ValueError, match="lengths"):
        api.which_impl(q, k, v, layout_from_dense(np.ones((1, 1, 64, 64), bool), 32, 32), EM)


def test_kernels_do_not_import_jaxeff():
    """pallas_kernels sits below jaxeff: no module of the op may import it."""
    root = pathlib.Path(api.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "jaxeff" or n.startswith("jaxeff.") for n in names), path.name

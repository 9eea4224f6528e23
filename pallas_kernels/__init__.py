"""Pallas kernels for jaxeff, one folder per op: ``api.py`` dispatches by backend,
``reference.py`` is the plain-jnp oracle, and one file per backend holds the kernel.
Kernels never import jaxeff models."""

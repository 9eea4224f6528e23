"""Dynamic block selection and token reordering for block-sparse attention: every method returns
a ``BlockMask`` (and, where it reorders tokens, a ``Permutation``) that
``jaxeff.sparse.block_sparse_attention`` consumes. ``select`` is the common interface
(``api.py``); one file per paper: ``svg2``, ``paro``, ``adaspa``, ``efficient_vdit``,
``xattention``, ``minference``; shared helpers in ``common``."""

from jaxeff.sparse.select.adaspa import AdaSpaState, adaspa, adaspa_mass
from jaxeff.sparse.select.api import METHODS, attend, init_state, select
from jaxeff.sparse.select.common import Permutation, invert, permute, unpermute
from jaxeff.sparse.select.efficient_vdit import efficient_vdit
from jaxeff.sparse.select.minference import minference
from jaxeff.sparse.select.paro import PAROState, paro, paro_calibrate
from jaxeff.sparse.select.svg2 import SVG2State, kmeans, svg2, svg2_clusters
from jaxeff.sparse.select.xattention import xattention

__all__ = ["METHODS", "AdaSpaState", "PAROState", "Permutation", "SVG2State", "adaspa", "adaspa_mass", "attend",
           "efficient_vdit", "init_state", "invert", "kmeans", "minference", "paro", "paro_calibrate", "permute",
           "select", "svg2", "svg2_clusters", "unpermute", "xattention"]

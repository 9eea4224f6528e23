"""Block-sparse attention over FlexAttention-style block lists: ``api.py`` picks an implementation
(``reference``, ``pallas`` = portable.py, ``mosaic_gpu``, ``splash``); ``common.py`` is the
kernel-side interface (``SparseLayout``, ``ElementMask``) they all take."""

"""Chunk-sparse FFN (BlockFFN's kernel, Song et al., 2025, arXiv 2507.08771, section 4): for a
chunk of tokens, the up and down projections run only over the union of the experts the chunk
activates. ``api.chunk_sparse_ffn`` dispatches."""

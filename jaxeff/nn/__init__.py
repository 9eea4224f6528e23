"""Flax NNX modules: they own parameters and call the ops in jaxeff.ops."""

from jaxeff.nn.attention import Attention, cache_attend, position_impl, self_attend
from jaxeff.nn.block import Block, make_attention
from jaxeff.nn.embedding import Embedding, LMHead
from jaxeff.nn.ffn import FFN_KINDS, ffn_matmul_params, make_ffn, merge_layer_aux, register_ffn
from jaxeff.nn.mlp import SwiGLU
from jaxeff.nn.norm import RMSNorm

__all__ = ["Attention", "Block", "Embedding", "FFN_KINDS", "LMHead", "RMSNorm", "SwiGLU", "cache_attend",
           "ffn_matmul_params", "make_attention", "make_ffn", "merge_layer_aux", "position_impl", "register_ffn",
           "self_attend"]

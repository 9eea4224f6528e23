"""Flax NNX modules: they own parameters and call the ops in jaxeff.ops."""

from jaxeff.nn.attention import Attention
from jaxeff.nn.block import Block
from jaxeff.nn.embedding import Embedding, LMHead
from jaxeff.nn.mlp import SwiGLU
from jaxeff.nn.norm import RMSNorm

__all__ = ["Attention", "Block", "Embedding", "LMHead", "SwiGLU", "RMSNorm"]

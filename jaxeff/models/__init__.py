"""Models composed from jaxeff.nn modules."""

from jaxeff.models.recursive import RecursiveTransformer, layer_sources, sharing_map
from jaxeff.models.recursive_convert import convert_from_vanilla, convert_run, convert_transformer
from jaxeff.models.transformer import Transformer

__all__ = ["RecursiveTransformer", "Transformer", "convert_from_vanilla", "convert_run", "convert_transformer", "layer_sources",
           "sharing_map"]

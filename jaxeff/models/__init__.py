"""Models composed from jaxeff.nn modules."""

import jaxeff.moe  # noqa: F401 - registers the mixture-of-experts FFN kinds every model build may use
from jaxeff.models.decoder import Decoder
from jaxeff.models.factory import abstract_model, build_model, count_params
from jaxeff.models.recursive import RecursiveTransformer, layer_sources, sharing_map
from jaxeff.models.recursive_convert import convert_from_vanilla, convert_transformer
from jaxeff.models.transformer import Transformer

__all__ = ["Decoder", "RecursiveTransformer", "Transformer", "abstract_model", "build_model", "convert_from_vanilla",
           "convert_transformer", "count_params", "layer_sources", "sharing_map"]

"""Models composed from jaxeff.nn modules."""

from jaxeff.models.transformer import Transformer

__all__ = ["Transformer"]

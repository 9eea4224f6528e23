"""Decoding schedulers over the :class:`~jaxeff.models.decoder.Decoder` interface, beside the
one-jit loop of :func:`jaxeff.generate`."""

from jaxeff.decode.depthwise import DepthwiseDecoder, Layout, depthwise_generate

__all__ = ["DepthwiseDecoder", "Layout", "depthwise_generate"]

"""The model: one decoder for every family."""

from moekit.models.moe import Routing, route
from moekit.models.transformer import MoEDecoder

__all__ = ["MoEDecoder", "Routing", "route"]

"""The model: one decoder for every family."""

from moekit.kernels.reference import route
from moekit.models.moe import Routing
from moekit.models.transformer import MoEDecoder

__all__ = ["MoEDecoder", "Routing", "route"]

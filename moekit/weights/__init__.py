"""Checkpoints in and out: each family's Hugging Face layout."""

from moekit.weights.io import CheckpointError
from moekit.weights.load import load, materialize, read_config
from moekit.weights.save import save

__all__ = ["CheckpointError", "load", "materialize", "read_config", "save"]

"""Generation: KV cache, sampling, the batched engine, text streaming and the user-facing API."""

from moekit.engine.engine import Completion, Engine, Stream, TokenEvent
from moekit.engine.kv_cache import KVCache
from moekit.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "KVCache", "SamplingParams", "Stream", "TokenEvent"]

from moekit.engine.api import CausalLM  # noqa: E402
from moekit.engine.text import TextCompletion, TextEvent, TextGenerator  # noqa: E402

__all__ += ["CausalLM", "TextCompletion", "TextEvent", "TextGenerator"]

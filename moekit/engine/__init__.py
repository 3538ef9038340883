"""Generation: paged KV cache, scheduler, sampling, the continuous-batching engine (sync and asyncio),
text streaming and the user-facing API."""

from moekit.engine.async_engine import AsyncEngine
from moekit.engine.engine import Completion, Engine, EngineStats, Stream, TokenEvent, TokenLogprob
from moekit.engine.kv_cache import KVCache, PagedKVCache
from moekit.engine.sampling import SamplingParams

__all__ = ["AsyncEngine", "Completion", "Engine", "EngineStats", "KVCache", "PagedKVCache", "SamplingParams",
           "Stream", "TokenEvent", "TokenLogprob"]

from moekit.engine.api import CausalLM  # noqa: E402
from moekit.engine.text import TextCompletion, TextEvent, TextGenerator  # noqa: E402

__all__ += ["CausalLM", "TextCompletion", "TextEvent", "TextGenerator"]

"""Running the server: the engine with the user's knobs, the app, uvicorn, and a clean exit on SIGTERM."""

from __future__ import annotations

import signal
import sys

import uvicorn

from moekit.engine import AsyncEngine, CausalLM, Engine
from moekit.errors import MoekitError
from moekit.server.app import create_app


def serve(lm: CausalLM, name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_num_seqs: int = 64, max_num_batched_tokens: int = 512, kv_cache_bytes: int | None = None,
          max_model_len: int | None = None) -> None:
    """Serve ``lm`` as ``name`` until SIGTERM or Ctrl-C: stop accepting, let in-flight requests finish (10 s),
    stop the engine, return."""
    cfg = lm.model.config
    if max_model_len is not None:
        if max_model_len > cfg.max_position_embeddings:
            raise MoekitError(f"--max-model-len {max_model_len}: the model's context is {cfg.max_position_embeddings}")
        lm.model.config = cfg = cfg.replace(max_position_embeddings=max_model_len)
    lm.engine = Engine(lm.model, eos_token_ids=lm.eos_token_ids, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, kv_cache_bytes=kv_cache_bytes)
    engine = AsyncEngine(lm.engine)
    app = create_app(lm, engine, name, api_key=api_key)
    pool = lm.engine.pool
    print(f"{lm.model.kernels.describe()[0]}; KV pool {pool.num_blocks - 1} blocks of {pool.block_size} tokens, "
          f"context {cfg.max_position_embeddings}; serving {name!r} on http://{host}:{port} "
          f"(web chat at /, OpenAI API at /v1)", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    # uvicorn re-raises the signal it stopped on once it is done; a SIGTERM handler of ours makes that a
    # return (exit status 0) rather than a kill by the signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        engine.shutdown()

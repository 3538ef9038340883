"""Running the server: the engine with the user's knobs, the app, uvicorn, and a clean exit on SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading

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
    # The engine steps in this (the main) thread and uvicorn's event loop runs in a background one: every
    # OpenMP region then starts from the thread that loaded the model (see AsyncEngine.run_here). uvicorn
    # installs no signal handlers off the main thread; ours ask it to shut down gracefully (stop accepting,
    # let in-flight requests finish for up to 10 s) while the engine keeps stepping for them.
    stopped_by: list[int] = []
    failed: list[BaseException] = []

    def stop(signum, _frame) -> None:
        if server.should_exit:  # a second signal: do not wait for in-flight requests
            server.force_exit = True
        stopped_by.append(signum)
        server.should_exit = True

    def web() -> None:
        try:
            server.run()
        except BaseException as e:  # e.g. uvicorn's sys.exit(1) when the port is taken: reported by the main thread
            failed.append(e)
        finally:
            engine.wake()  # the engine loop sees the server gone

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=web, name="moekit-http", daemon=True)
    thread.start()
    try:
        engine.run_here(until=lambda: not thread.is_alive())
        thread.join()
    finally:
        engine.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
    if failed:
        if isinstance(failed[0], SystemExit) and not server.started:
            raise MoekitError(f"cannot serve on http://{host}:{port} (uvicorn's message above says why)")
        raise failed[0]
    if signal.SIGINT in stopped_by:
        raise KeyboardInterrupt  # Ctrl-C: the CLI exits 130 as for any interrupted command

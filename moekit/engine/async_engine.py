"""An asyncio front for the engine: one background loop steps it, each request reads its own queue.

    engine = AsyncEngine(Engine(model))
    async for ev in engine.generate(prompt_ids, SamplingParams(max_new_tokens=64)):
        print(ev.token_id, ev.finish_reason)

``Engine.step`` runs in one worker thread so the event loop stays free while the model
computes: a background thread started with the first request, or the caller's own thread in
``run_here`` (``moekit serve`` steps the engine in the main thread and runs the event loop in a
background one: OpenMP regions started from a second thread, next to the team the main thread
made while loading, run with throttled spinning, about 15% slower per token on 2 cores). Requests are validated at once (errors reach the caller), then handed to the worker,
which applies additions and aborts between steps: the engine is only ever touched by that
thread. A consumer that stops reading (client gone, task cancelled) aborts its request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from moekit.engine.engine import Engine, TokenEvent
from moekit.engine.sampling import SamplingParams


class AsyncEngine:
    """Serve many concurrent ``generate`` calls from one :class:`Engine`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", args) / ("abort", id), applied by the worker
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _queues and the ids handed out
        self.error: BaseException | None = None

    def alive(self) -> bool:
        """False once the worker has died (it starts with the first request) or was shut down."""
        return not self._stop and (self._thread is None or self._thread.is_alive())

    def run_here(self, until) -> None:
        """Step the engine in the calling thread (instead of a background one) until ``until()`` is true."""
        self._thread = threading.current_thread()
        self._work(until)

    def wake(self) -> None:
        """Make an idle worker (or ``run_here`` loop) look at its inbox and stop condition now."""
        self._wake.set()

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="moekit-engine", daemon=True)
            self._thread.start()

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(),
                       priority: int = 0) -> AsyncIterator[TokenEvent]:
        """The request's events as they are produced (the last has ``finish_reason`` set)."""
        prompt = self.engine.check_request(prompt_ids, params)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            rid = self.engine.new_request_id()
            self._queues[rid] = (loop, q)
        self._inbox.put(("add", (prompt, params, priority, rid)))
        self._ensure_worker()
        self._wake.set()
        done = False
        try:
            while True:
                ev = await q.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev.finish_reason is not None:
                    done = True
                    return
        finally:
            with self._lock:
                self._queues.pop(rid, None)
            if not done:
                self._inbox.put(("abort", rid))
                self._wake.set()

    def abort(self, request_id: int) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def _deliver(self, rid: int, item) -> None:
        with self._lock:
            target = self._queues.get(rid)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _work(self, until=lambda: False) -> None:
        engine = self.engine
        while not self._stop and not until():
            self._wake.clear()  # before draining: a later set() is seen by the wait below
            while True:
                try:
                    kind, arg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    prompt, params, priority, rid = arg
                    with self._lock:
                        wanted = rid in self._queues
                    if wanted:  # not already abandoned
                        try:
                            engine.add_request(prompt, params, priority, request_id=rid)
                        except Exception as e:  # e.g. an id clash: the caller hears of it
                            self._deliver(rid, e)
                else:
                    engine.abort(arg)
            if not engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                continue
            try:
                events = engine.step()
            except Exception as e:  # the step failed: every request in flight hears of it and ends
                self.error = e
                for rid in list(engine.requests):
                    engine.abort(rid)
                    self._deliver(rid, e)
                continue
            for ev in events:
                self._deliver(ev.index, ev)

    def shutdown(self) -> None:
        """Stop the worker (requests in flight are abandoned)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

"""What the server tests share: the default model for exact comparisons, the app on uvicorn in a thread,
``moekit serve`` as a process, and waiting for the engine to settle."""

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import moekit
from moekit.engine import AsyncEngine

try:  # re-exported for the server tests
    import httpx2 as httpx  # what openai>=3 ships with
except ImportError:
    import httpx  # noqa: F401

MODEL = "moekit-default"
HI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
      {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Write a verse."}]


def load_default():
    """The default model in float32 on the reference kernels: a request's tokens are then the same whatever
    shares its batch (tests/test_engine_serving.py), so server answers can be compared token for token."""
    return moekit.CausalLM.from_pretrained(moekit.default_model_path(), dtype="float32", kernels="reference")


@contextlib.contextmanager
def serving(app):
    """``app`` on uvicorn in a background thread on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def settled(engine: AsyncEngine, timeout: float = 10.0) -> bool:
    """Wait until the engine holds no request and no KV block (aborts reach its worker between steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.engine.has_unfinished() and engine.engine.pool.in_use() == 0:
            return True
        time.sleep(0.02)
    return False


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """Full-recompute logprobs [T, V] of ``ids``: no cache, no batching."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def serve_process(log_path: Path, *extra: str, preexec_fn=None):
    """``moekit serve`` on a free loopback port, logging to ``log_path``; yields (process, base URL) once
    /health answers 200, and stops it (SIGTERM, then kill) if it still runs at the end."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moekit.cli", "serve", "--port", str(port), *extra],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moekit serve exited with {proc.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(OSError):
                if http_get(url + "/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"moekit serve did not answer /health within 60 s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""``moekit serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and a web chat page over the engine."""

from moekit.server.app import create_app

__all__ = ["create_app"]

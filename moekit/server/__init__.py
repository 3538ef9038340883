"""``moekit serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and a web chat page over the engine."""

__all__ = ["create_app"]


def __getattr__(name: str):
    """``create_app`` on first use: the command line imports ``moekit.server.command`` without FastAPI."""
    if name == "create_app":
        from moekit.server.app import create_app

        return create_app
    raise AttributeError(f"module 'moekit.server' has no attribute {name!r}")

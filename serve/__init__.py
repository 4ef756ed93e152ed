"""vlm-serve: an OpenAI-compatible local server over the lean runtime.

    vlm-serve ARTIFACT [--host 127.0.0.1] [--port 8000] [--workers N]

    from vlmedge.serve import create_app        # a FastAPI app (the `serve` extra)
    app = create_app("demo-onnx-fp32", workers=2)

Modules: `requests` (OpenAI chat request -> a runtime request, errors in
OpenAI's JSON), `images` (image_url: data URLs, local files under allowed
folders, http(s) only when allowed), `workers` (N sessions behind a bounded
queue), `metrics` (Prometheus text), `app` (the routes), `cli`.
FastAPI and uvicorn are imported only here, never by vlmedge.runtime.
"""
from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(name)

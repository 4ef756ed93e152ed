"""The FastAPI app: OpenAI's chat completions over a WorkerPool, plus
/v1/models, /health, /metrics and a browser page at /.

Limits: the request body (--max-body-mb, read incrementally), the image's
bytes and pixels, max_tokens, the bounded queue (429 + Retry-After when
full), a per-request timeout (504), and the prompt through the context
length (400 context_length_exceeded). With an API key, /v1/* and /metrics
need `Authorization: Bearer KEY` (401 otherwise). Every error is OpenAI's
JSON. A streaming client that disconnects cancels its generation between
tokens; a waiting one is cancelled before a worker takes it.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from vlmedge.lazy import require

fastapi = require("fastapi", "vlm-serve (pip install 'vlmedge[serve]')")
from fastapi import Request  # noqa: E402  (route annotations resolve in this module)

from .images import check_pixels, image_bytes
from .metrics import Metrics
from .requests import OpenAIError, parse_chat
from .workers import Job, WorkerPool


# Which process answered: a replica behind Ray Serve (or any load balancer)
# is told apart by host and pid in /health and in each answer.
REPLICA = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class ServeOptions:
    workers: int = 1
    queue_size: int = 16
    timeout_s: float = 120.0
    api_key: str | None = None
    allow_remote_images: bool = False
    allow_dirs: list[Path] = field(default_factory=list)
    max_body_bytes: int = 20 << 20
    max_image_bytes: int = 16 << 20
    max_pixels: int = 40_000_000
    default_max_tokens: int = 64
    max_tokens_limit: int = 4096
    threads: int | None = None
    provider: str = "auto"


def create_app(artifact, options: ServeOptions | None = None, **kw):
    """The app for one artifact; keyword arguments are ServeOptions fields."""
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, \
        StreamingResponse

    o = options or ServeOptions(**kw)
    metrics = Metrics()
    pool = WorkerPool(artifact, o.workers, o.queue_size, o.threads, o.provider, metrics)
    model_id = Path(artifact).name

    @asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()  # workers finish their job and stop

    app = fastapi.FastAPI(title="vlmedge", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.pool, app.state.metrics, app.state.options = pool, metrics, o

    @app.exception_handler(OpenAIError)
    async def openai_error(request, e: OpenAIError):
        metrics.count(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(404)
    async def not_found(request, e):
        return await openai_error(request, OpenAIError(404, f"no route {request.url.path}"))

    def authorize(request) -> None:
        if o.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {o.api_key}".encode()):
            raise OpenAIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                              code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (resources.files("vlmedge.serve") / "static" / "index.html").read_text()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "replica": REPLICA,
                "workers": len(pool.sessions),
                "busy": pool.busy, "queue_depth": pool.depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(request: Request):
        authorize(request)
        return PlainTextResponse(metrics.render(pool.depth, pool.busy, len(pool.sessions)),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        m = pool.manifest
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": 0, "owned_by": "vlmedge",
            "family": m.family, "precision": m.precision,
            "context_length": m.decoder.context_length}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body = await _read_json(request, o.max_body_bytes)
        req = parse_chat(body, default_max_tokens=o.default_max_tokens,
                         max_tokens_limit=o.max_tokens_limit)
        images = []
        for url in req.image_urls:  # each checked before the job is queued
            images.append(image_bytes(url, max_bytes=o.max_image_bytes, allow_dirs=o.allow_dirs,
                                      allow_remote=o.allow_remote_images))
            check_pixels(images[-1], o.max_pixels)
        # One image goes alone (the one-image path); several as the session's list.
        image = (images[0] if len(images) == 1 else images) if images else None
        job = Job(req, image, asyncio.get_running_loop(), time.monotonic() + o.timeout_s)
        pool.submit(job)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            # The first event decides the status: an error before any token (a bad
            # image, a context overflow) is an HTTP error, as OpenAI answers it.
            first = await _until(job.pieces.get, job, request, o.timeout_s)
            if first[0] == "error":
                raise first[1]
            metrics.count(200)
            return StreamingResponse(_sse(job, cid, created, model_id, body, first),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await _until(lambda: asyncio.shield(job.future), job, request, o.timeout_s)
        metrics.count(200)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "finish_reason": _finish(result.stop_reason),
                             "message": {"role": "assistant", "content": result.text}}],
                "usage": {"prompt_tokens": result.prompt_tokens,
                          "completion_tokens": len(result.token_ids),
                          "total_tokens": result.prompt_tokens + len(result.token_ids)},
                "vlmedge": {"timings": _public(result.timings), "value": result.value,
                            "replica": REPLICA}}

    return app


async def _read_json(request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"the request body is larger than this server's limit of "
                          f"{limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(413, f"the request body is larger than this server's limit of "
                              f"{limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise OpenAIError(400, "the request body is not valid JSON") from None


async def _until(next_value, job: Job, request, timeout_s: float):
    """Awaits next_value() in half-second slices; a client that disconnects
    (499) or a timeout (504) cancels the job. The result of a non-streaming
    job (next_value = the shielded future) or a stream's first event."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await asyncio.wait_for(next_value(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise OpenAIError(499, "the client closed the request") from None
            if time.monotonic() > deadline:
                job.cancelled.set()
                raise OpenAIError(504, "the request timed out", code="timeout") from None


async def _sse(job: Job, cid: str, created: int, model: str, body: dict, first):
    def chunk(delta: dict, finish=None, **extra) -> str:
        d = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(d)}\n\n"

    usage = isinstance(body.get("stream_options"), dict) and \
        body["stream_options"].get("include_usage")
    try:
        yield chunk({"role": "assistant", "content": ""})
        pending = [first]
        while True:
            kind, value = pending.pop() if pending else await job.pieces.get()
            if kind == "piece":
                yield chunk({"content": value})
            elif kind == "done":
                yield chunk({}, _finish(value.get("stop_reason")),
                            vlmedge={"timings": _public(value)})
                if usage:
                    p, c = value.get("prompt_tokens", 0), value.get("new_tokens", 0)
                    yield ("data: " + json.dumps({
                        "id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [], "usage": {
                            "prompt_tokens": p, "completion_tokens": c,
                            "total_tokens": p + c}}) + "\n\n")
                break
            else:  # an error after the stream started: OpenAI's error object, then the end
                yield f"data: {json.dumps(value.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away stops the generation between tokens


def _finish(stop_reason: str | None) -> str:
    return "length" if stop_reason == "max_new_tokens" else "stop"


_PUBLIC_TIMINGS = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "total_ms",
                   "tokens_per_s", "image_reused", "prefix_reused", "stop_reason")


def _public(timings: dict) -> dict:
    """The timings a client sees (not the per-token list or the logits)."""
    return {k: timings[k] for k in _PUBLIC_TIMINGS if k in timings}

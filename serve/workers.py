"""N worker threads, one VLMSession each, behind a bounded queue.

A request becomes a Job; `submit` puts it on the queue or, when the queue is
full, refuses it at once (429 with Retry-After) instead of letting latency
grow without bound. A worker answers a job with VLMSession.generate, or
streams it piece by piece into the job's asyncio queue; a job whose client
went away or whose deadline passed is cancelled between tokens.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

from vlmedge.errors import (ArtifactError, ContextOverflowError, IncompleteAnswerError,
                            UserInputError, VlmedgeError)

from .requests import ChatRequest, OpenAIError

log = logging.getLogger("vlmedge.serve")


class Job:
    def __init__(self, request: ChatRequest, image: bytes | list[bytes] | None,
                 loop: asyncio.AbstractEventLoop, deadline: float):
        self.request, self.image, self.loop, self.deadline = request, image, loop, deadline
        self.cancelled = threading.Event()
        self.future: asyncio.Future = loop.create_future()
        self.pieces: asyncio.Queue = asyncio.Queue()  # ("piece", str) | ("done", info) | ("error", e)
        self.enqueued = time.monotonic()

    def _call(self, fn, *args) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def resolve(self, value) -> None:
        self._call(lambda: self.future.done() or self.future.set_result(value))

    def fail(self, error: Exception) -> None:
        self._call(lambda: self.future.done() or self.future.set_exception(error))

    def emit(self, kind: str, value: Any) -> None:
        self._call(self.pieces.put_nowait, (kind, value))


def to_openai(e: VlmedgeError) -> OpenAIError:
    """A runtime error -> the HTTP status and OpenAI error it answers as."""
    if isinstance(e, ContextOverflowError):
        return OpenAIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, IncompleteAnswerError):
        return OpenAIError(400, str(e), param="max_tokens", code="incomplete_structured_answer")
    if isinstance(e, UserInputError):
        return OpenAIError(400, str(e))
    if isinstance(e, ArtifactError):
        return OpenAIError(500, str(e), code="artifact_error")
    return OpenAIError(500, str(e))


class WorkerPool:
    def __init__(self, artifact, workers: int, queue_size: int, threads: int | None,
                 provider: str, metrics):
        from vlmedge.runtime import VLMSession

        self.sessions = [VLMSession(artifact, provider=provider, threads=threads,
                                    allow_fallback=provider == "auto") for _ in range(workers)]
        self.manifest = self.sessions[0].manifest
        self.metrics = metrics
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.busy = 0
        self._threads = [threading.Thread(target=self._work, args=(s,), daemon=True,
                                          name=f"vlmedge-worker-{i}")
                         for i, s in enumerate(self.sessions)]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise OpenAIError(429, "the server is busy: its request queue is full, retry later",
                              code="queue_full", headers={"Retry-After": "1"}) from None

    def close(self) -> None:
        for _ in self._threads:
            self.jobs.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def _work(self, session) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.metrics.count_cancelled()
                continue
            self.busy += 1
            try:
                self._run(session, job)
            finally:
                self.busy -= 1

    def _run(self, session, job: Job) -> None:
        r = job.request
        image = job.image
        try:
            if time.monotonic() > job.deadline:
                raise OpenAIError(504, "the request waited in the queue past its timeout",
                                  code="timeout")
            if not r.stream:
                result = session.generate(image, r.prompt, cancel=job.cancelled, **r.options)
                if result.stop_reason == "cancelled":
                    self.metrics.count_cancelled()
                    return  # the client went away or the request timed out: nobody waits
                self.metrics.observe_generation(result.timings)
                job.resolve(result)
                return
            opts = dict(r.options)
            n_max = opts.pop("max_new_tokens")
            pieces = session.stream(image, r.prompt, max_new_tokens=n_max, cancel=job.cancelled,
                                    **opts)
            try:
                for piece in pieces:
                    if job.cancelled.is_set():
                        break
                    if time.monotonic() > job.deadline:
                        raise OpenAIError(504, "the request ran past its timeout", code="timeout")
                    job.emit("piece", piece)
            finally:
                pieces.close()  # a cancelled generation stops here, between tokens
            # Cancelled either here or inside the session (cancel=, between its
            # tokens): whichever saw it first, it is counted once.
            if job.cancelled.is_set():
                self.metrics.count_cancelled()
            else:
                timings = dict(session.last_timings)
                self.metrics.observe_generation(timings)
                job.emit("done", timings)
        except OpenAIError as e:
            self._failed(job, e)
        except VlmedgeError as e:
            self._failed(job, to_openai(e))
        except Exception as e:  # a bug: answered as 500, logged with its traceback
            log.exception("vlm-serve: request failed")
            self._failed(job, OpenAIError(500, f"internal error: {type(e).__name__}"))

    @staticmethod
    def _failed(job: Job, e: OpenAIError) -> None:
        if job.request.stream:
            job.emit("error", e)
        else:
            job.fail(e)

"""The watch loop: answer questions about the newest frame of a live source,
reusing image work on frames that did not change.

    for ev in watch(session, open_source("rtsp://cam/1"), ["is the door open?"],
                    choices=["yes", "no"], every=2.0):
        print(ev.to_json())

Drop-stale: a capture thread keeps only the newest frame; each round of
questions starts on the newest frame there is at that moment; frames that
arrive while the model is busy replace the one waiting and are counted as
dropped, never queued, so memory stays bounded whatever the input rate.
(A non-live source, such as a video file read with realtime=False, is read
frame by frame as the loop asks: nothing is dropped.)

Reuse: each frame's change score is the mean absolute difference, in 0..255
grey levels, between a 32 x 32 grey thumbnail of it and of the last frame
that was encoded. Below `change_threshold` the previous EncodedImage (image
features, and the KV cache of the prompt prefix through the image) is
reused; at or above it the frame is encoded anew.

Schedules: every frame (default), every N seconds (`every`), or only when a
frame changed (`on_change`). Each event says whether its answer differs
from the previous answer to the same question (`answer_changed`): the
trigger an app acts on ("is the door open?" yes -> no).

Faults: a live source that fails (SourceError) is reopened with exponential
backoff (0.5 s doubling to 8 s, `max_reconnects` times in a row); a source
that ends ends the loop; a frame that cannot be decoded is skipped and
counted. Closing the generator (or Ctrl-C in vlm-watch) stops the capture
thread and closes the source.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from vlmedge.errors import SourceError, UserInputError, VlmedgeError

from .sources import Frame, FrameSource

THUMB = 32
DEFAULT_CHANGE_THRESHOLD = 4.0  # grey levels; sensor noise on a still scene stays under ~2


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (THUMB, THUMB) grey, by block means over a
    strided sample (cheap: a few hundred microseconds on a 1080p frame)."""
    h, w = rgb.shape[:2]
    ys = np.linspace(0, h - 1, THUMB * 4).astype(np.intp)
    xs = np.linspace(0, w - 1, THUMB * 4).astype(np.intp)
    small = rgb[ys][:, xs].astype(np.float32)                        # (4T, 4T, 3)
    grey = small @ np.array([0.299, 0.587, 0.114], np.float32)       # (4T, 4T)
    return grey.reshape(THUMB, 4, THUMB, 4).mean(axis=(1, 3))


def change_score(a: np.ndarray | None, b: np.ndarray) -> float:
    """Mean absolute grey difference of two thumbnails (inf without a previous one)."""
    return float("inf") if a is None else float(np.abs(a - b).mean())


@dataclass
class WatchEvent:
    frame_id: int
    capture_ts: float          # time.monotonic() at capture
    question: str
    answer: str
    value: Any                 # the choice / parsed JSON with choices / json_schema
    ttft_ms: float
    frame_age_ms: float        # capture -> the start of this answer
    reused: bool               # the image work of an earlier frame was reused
    change: float              # change score against the last encoded frame
    answer_changed: bool       # differs from the previous answer to this question
    dropped_so_far: int
    error: str | None = None   # an answer that failed (e.g. cut by max_new_tokens)

    def to_json(self) -> str:
        d = asdict(self)
        d["change"] = None if d["change"] == float("inf") else round(d["change"], 3)
        return json.dumps(d)


@dataclass
class WatchStats:
    frames_in: int = 0
    dropped: int = 0
    corrupt: int = 0
    reconnects: int = 0
    rounds: int = 0
    encodes: int = 0
    reuses: int = 0
    answers: int = 0
    skipped_unchanged: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> dict:
        secs = max(time.monotonic() - self.started, 1e-9)
        d = {k: v for k, v in asdict(self).items() if k != "started"}
        d.update(seconds=round(secs, 2), input_fps=round(self.frames_in / secs, 2),
                 answers_per_s=round(self.answers / secs, 3),
                 reuse_rate=round(self.reuses / max(self.rounds, 1), 3))
        return d


class LatestFrame:
    """A capture thread over a live source that keeps only the newest frame."""

    def __init__(self, source: FrameSource, stats: WatchStats, max_reconnects: int):
        self.source, self.stats, self.max_reconnects = source, stats, max_reconnects
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._taken_id = -1
        self._done = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlmedge-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures, backoff = 0, 0.5
        try:
            while not self._stop.is_set():
                try:
                    for frame in self.source:
                        failures, backoff = 0, 0.5
                        with self._cond:
                            if self._frame is not None and self._frame.frame_id > self._taken_id:
                                self.stats.dropped += 1  # replaced before anyone took it
                            self._frame = frame
                            self.stats.frames_in += 1
                            self._cond.notify_all()
                        if self._stop.is_set():
                            return
                    return  # the source ended
                except SourceError:
                    failures += 1
                    if failures > self.max_reconnects:
                        raise
                    self.stats.reconnects += 1
                    if self._stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, 8.0)
                    try:
                        self.source.reopen()
                    except SourceError:
                        continue  # counted on the next pass
        except BaseException as e:  # handed to the consumer's thread
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def newest(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not yet taken (waits for one); None at the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._frame is None or self._frame.frame_id <= self._taken_id:
                if self._done:
                    if self._error is not None:
                        raise self._error
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left if left is not None else 0.5)
            self._taken_id = self._frame.frame_id
            return self._frame

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class _Pull:
    """A non-live source read one frame per request (nothing is dropped)."""

    def __init__(self, source: FrameSource, stats: WatchStats):
        self._it, self.stats = iter(source), stats

    def newest(self, timeout: float | None = None) -> Frame | None:
        frame = next(self._it, None)
        if frame is not None:
            self.stats.frames_in += 1
        return frame

    def stop(self) -> None:
        pass


def watch(session, source: FrameSource, questions: Sequence[str], *,
          every: float | None = None, on_change: bool = False,
          change_threshold: float = DEFAULT_CHANGE_THRESHOLD, reuse: bool = True,
          max_new_tokens: int = 24, choices: Sequence[str] | None = None,
          json_schema: dict | None = None, max_frames: int | None = None,
          max_reconnects: int = 5, stats: WatchStats | None = None) -> Iterator[WatchEvent]:
    """Yields a WatchEvent per question per answered frame (module docstring)."""
    questions = _check(questions, every, change_threshold, max_frames, max_reconnects)
    stats = stats if stats is not None else WatchStats()
    feed = LatestFrame(source, stats, max_reconnects) if source.live else _Pull(source, stats)
    last: dict[str, str] = {}
    encoded = thumb_encoded = None
    next_due = time.monotonic()
    try:
        while max_frames is None or stats.rounds < max_frames:
            if every is not None:
                wait = next_due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                next_due = max(next_due + every, time.monotonic())
            frame = feed.newest()
            if frame is None:
                return
            thumb = thumbnail(frame.rgb)
            score = change_score(thumb_encoded, thumb)
            unchanged = score < change_threshold
            if on_change and unchanged:
                stats.skipped_unchanged += 1
                continue
            stats.rounds += 1
            reused = reuse and unchanged and encoded is not None
            if reused:
                stats.reuses += 1
            else:
                try:
                    encoded = session.encode(frame.rgb)
                except UserInputError:
                    stats.corrupt += 1
                    continue
                thumb_encoded = thumb
                stats.encodes += 1
            for q in questions:
                yield _answer(session, encoded, frame, q, score, reused, last, stats,
                              max_new_tokens, choices, json_schema)
    finally:
        feed.stop()
        stats.corrupt += getattr(source, "corrupt", 0)
        source.close()


def _answer(session, encoded, frame, question, score, reused, last, stats, max_new_tokens,
            choices, json_schema) -> WatchEvent:
    start = time.monotonic()
    error = value = None
    try:
        r = session.generate(encoded, question, max_new_tokens=max_new_tokens, choices=choices,
                             json_schema=json_schema)
        text, value, ttft = r.text, r.value, r.timings.get("ttft_ms", 0.0)
    except VlmedgeError as e:  # e.g. IncompleteAnswerError: reported in the event
        text, ttft, error = "", (time.monotonic() - start) * 1000.0, str(e)
    changed = question in last and last[question] != text
    last[question] = text
    stats.answers += 1
    return WatchEvent(frame.frame_id, frame.ts, question, text, value, round(ttft, 2),
                      round((start - frame.ts) * 1000.0, 2), reused, score, changed,
                      stats.dropped, error)


def _check(questions, every, change_threshold, max_frames, max_reconnects) -> list[str]:
    if isinstance(questions, str):
        questions = [questions]
    if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise UserInputError("watch needs at least one question", got=repr(questions)[:60])
    if every is not None and not (isinstance(every, (int, float)) and every > 0):
        raise UserInputError("every must be a positive number of seconds", got=repr(every))
    if not isinstance(change_threshold, (int, float)) or not change_threshold >= 0:
        raise UserInputError("change_threshold must be >= 0 (grey levels)",
                             got=repr(change_threshold))
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise UserInputError("max_frames must be a positive integer", got=repr(max_frames))
    if not isinstance(max_reconnects, int) or max_reconnects < 0:
        raise UserInputError("max_reconnects must be >= 0", got=repr(max_reconnects))
    return list(questions)

"""Frame sources for camera apps: one small interface over video files,
cameras, network streams, GStreamer pipelines, image folders and frames an
app pushes itself.

    src = open_source("0" | "/dev/video0" | "clip.mp4" | "rtsp://cam/stream" |
                      "gst:nvarguscamerasrc ! ... ! appsink" | "frames/" | "frames/*.jpg")
    for frame in src:            # Frame(frame_id, ts, rgb): ts from time.monotonic(),
        ...                      # rgb uint8 (H, W, 3), RGB, C-contiguous
    src.close()

A source's iterator ends when the input ends (a file, a folder) and raises
SourceError when a live input fails (a camera unplugged, a stream that drops):
the watch loop reconnects those with backoff (`reopen()`). Capture libraries
are optional extras, imported lazily: PyAV for files (`pip install av`),
OpenCV for cameras, URLs and GStreamer (`pip install opencv-python-headless`).
"""
from __future__ import annotations

import glob
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from vlmedge.errors import SourceError, UserInputError
from vlmedge.lazy import require

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".ts")


@dataclass(frozen=True)
class Frame:
    frame_id: int      # 0, 1, 2, ... in capture order (across reconnects)
    ts: float          # time.monotonic() at capture
    rgb: np.ndarray    # uint8 (H, W, 3) RGB


class FrameSource:
    """Iterates Frames. `live`: frames arrive in real time (a camera, a stream,
    a paced file) and a reader that falls behind should drop, not queue."""

    name = "source"
    live = True

    def __init__(self):
        self._next_id = 0
        self.corrupt = 0  # frames that could not be decoded, skipped

    def _frame(self, rgb: np.ndarray) -> Frame:
        f = Frame(self._next_id, time.monotonic(), np.ascontiguousarray(rgb))
        self._next_id += 1
        return f

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def reopen(self) -> None:
        """Reconnect after a SourceError (live sources)."""

    def close(self) -> None:
        pass


class PushSource(FrameSource):
    """Frames an app pushes itself (it owns the camera): push(rgb) from any
    thread; the iterator yields them; end() finishes it. Holds at most
    `capacity` frames (the oldest are dropped and counted)."""

    name = "push"

    def __init__(self, capacity: int = 2, layout: str = "RGB"):
        super().__init__()
        self._q: queue.Queue = queue.Queue(maxsize=capacity)
        self._layout = layout
        self.dropped = 0
        self._ended = threading.Event()

    def push(self, frame: np.ndarray) -> None:
        from .image_io import load_image
        rgb = load_image(frame, layout=self._layout)
        item = self._frame(rgb)
        while True:
            try:
                self._q.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._q.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def end(self) -> None:
        self._ended.set()

    def __iter__(self) -> Iterator[Frame]:
        while True:
            try:
                yield self._q.get(timeout=0.05)
            except queue.Empty:
                if self._ended.is_set():
                    return


class FolderSource(FrameSource):
    """Images of a folder (sorted by name) or a glob, at `fps` frames per
    second (None: as fast as they are read). Undecodable files are skipped
    and counted."""

    name = "folder"

    def __init__(self, pattern: str, fps: float | None = None, loop: bool = False):
        super().__init__()
        p = Path(pattern)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files = sorted(Path(f) for f in glob.glob(pattern)
                           if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"no images in {pattern}",
                              expected=f"image files ({', '.join(IMAGE_SUFFIXES)})")
        self.files, self.fps, self.loop = files, fps, loop
        self.live = fps is not None

    def __iter__(self) -> Iterator[Frame]:
        from .image_io import load_image
        start = time.monotonic()
        n = 0
        while True:
            for f in self.files:
                if self.fps:
                    delay = start + n / self.fps - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                n += 1
                try:
                    rgb = load_image(f)
                except UserInputError:
                    self.corrupt += 1
                    continue
                yield self._frame(rgb)
            if not self.loop:
                return


class VideoFileSource(FrameSource):
    """A video file through PyAV. realtime=True paces frames at the file's own
    timestamps (as a camera would deliver them); False reads as fast as the
    consumer takes them (offline processing: nothing is dropped)."""

    name = "video"

    def __init__(self, path: str, realtime: bool = True):
        super().__init__()
        self.path, self.live = path, realtime
        self.av = require("av", "reading video files (vlm-watch --source FILE)")
        self._container = None
        self._open()

    def _open(self):
        try:
            self._container = self.av.open(self.path)
        except (OSError, ValueError, self.av.FFmpegError) as e:
            raise SourceError(f"cannot open video {self.path}: {str(e)[:120]}",
                              hint="check the path and that it is a video file") from None
        if not self._container.streams.video:
            raise SourceError(f"{self.path} has no video stream")

    def __iter__(self) -> Iterator[Frame]:
        stream = self._container.streams.video[0]
        start = None
        try:
            for packet in self._container.demux(stream):
                try:
                    frames = packet.decode()
                except (self.av.FFmpegError, ValueError):
                    self.corrupt += 1
                    continue
                for vf in frames:
                    if self.live and vf.time is not None:
                        now = time.monotonic()
                        start = start if start is not None else now - vf.time
                        delay = start + vf.time - now
                        if delay > 0:
                            time.sleep(delay)
                    yield self._frame(vf.to_ndarray(format="rgb24"))
        except self.av.FFmpegError as e:
            raise SourceError(f"reading {self.path} failed: {str(e)[:120]}") from None

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class CaptureSource(FrameSource):
    """OpenCV's VideoCapture: a camera index or /dev/videoN (V4L2), an
    RTSP/HTTP URL, or a GStreamer pipeline ending in appsink (the Jetson CSI
    path, nvarguscamerasrc; needs an OpenCV built with GStreamer)."""

    name = "capture"

    def __init__(self, target, gstreamer: bool = False):
        super().__init__()
        self.cv2 = require("cv2", "cameras, streams and GStreamer pipelines "
                           "(pip install opencv-python-headless)")
        self.target, self.gstreamer = target, gstreamer
        if gstreamer and "GStreamer:                   YES" not in \
                self.cv2.getBuildInformation().replace("\t", " "):
            raise SourceError("this OpenCV was built without GStreamer",
                              hint="use the distribution's OpenCV (e.g. JetPack's) for gst: "
                                   "sources")
        self._cap = None
        self.reopen()

    def reopen(self) -> None:
        self.close()
        api = self.cv2.CAP_GSTREAMER if self.gstreamer else self.cv2.CAP_ANY
        cap = self.cv2.VideoCapture(self.target, api)
        if not cap.isOpened():
            raise SourceError(f"cannot open {self.target!r}",
                              hint="check the camera index/device, URL or pipeline")
        self._cap = cap

    def __iter__(self) -> Iterator[Frame]:
        while True:
            ok, bgr = self._cap.read()
            if not ok:
                raise SourceError(f"{self.target!r} stopped delivering frames")
            yield self._frame(bgr[:, :, ::-1])

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def open_source(spec, *, fps: float | None = None, realtime: bool = True) -> FrameSource:
    """A source from its --source string (module docstring); one line on a bad one."""
    if isinstance(spec, FrameSource):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return CaptureSource(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError("bad frame source", expected="a camera index, /dev/videoN, a video "
                             "file, rtsp://..., gst:PIPELINE or an image folder/glob",
                             got=repr(spec)[:60])
    s = spec.strip()
    if s.isdigit():
        return CaptureSource(int(s))
    if s.startswith("gst:"):
        return CaptureSource(s[4:].strip(), gstreamer=True)
    if s.split("://", 1)[0].lower() in ("rtsp", "rtsps", "http", "https", "rtmp", "udp"):
        return CaptureSource(s)
    if s.startswith("/dev/video"):
        if not os.path.exists(s):
            raise SourceError(f"camera {s} does not exist", hint="ls /dev/video*")
        return CaptureSource(s)
    p = Path(s)
    if p.is_dir() or any(ch in s for ch in "*?["):
        return FolderSource(s, fps=fps)
    if p.is_file():
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return FolderSource(s, fps=fps)
        return VideoFileSource(s, realtime=realtime)
    raise UserInputError(f"frame source {s!r} does not exist",
                         expected="a camera index, /dev/videoN, a video file, rtsp://..., "
                                  "gst:PIPELINE or an image folder/glob")

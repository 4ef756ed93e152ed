"""Soak test of the watch loop: many frames from a synthetic source in one
process; reports RSS, thread and file-descriptor growth and errors.

    python -m vlmedge.benchmarks.watch_soak ARTIFACT --frames 100000 [--answer-every-frame]

Frames are scene-world images (128 px) held for `--hold` frames each, so most
frames are unchanged (reuse path) and one in `--hold` changes (encode path).
By default only changed frames are answered (--on-change), which is what a
months-long camera deployment mostly does; --answer-every-frame answers each.
Growth is measured from after a warm-up (the first --warmup frames), as
allocators and onnxruntime's arenas settle. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class SyntheticSource:
    """A non-live source of `n` scene frames, each scene held `hold` frames."""

    live = False
    name = "synthetic"
    corrupt = 0

    def __init__(self, n: int, hold: int, on_frame=None):
        from vlmedge.demo import scenes
        self.n, self.hold, self.on_frame = n, hold, on_frame
        self.images = [np.asarray(scenes.make_scene(scenes.EVAL_SEED_BASE + 700 + i).image
                                  .convert("RGB")) for i in range(8)]

    def __iter__(self):
        from vlmedge.runtime.sources import Frame
        for i in range(self.n):
            if self.on_frame is not None:
                self.on_frame(i)
            yield Frame(i, time.monotonic(), self.images[(i // self.hold) % len(self.images)])

    def reopen(self):
        pass

    def close(self):
        pass


def soak(artifact: str, frames: int, hold: int, warmup: int, every_frame: bool,
         threads: int) -> dict:
    from vlmedge.runtime import VLMSession
    from vlmedge.runtime.watch import WatchStats, watch

    session = VLMSession(artifact, provider="cpu", threads=threads)
    marks: dict = {}

    def on_frame(i):
        if i == warmup:
            marks.update(rss=rss_mb(), threads=threading.active_count(), fds=open_fds(),
                         t=time.monotonic())

    stats = WatchStats()
    errors = 0
    for ev in watch(session, SyntheticSource(frames, hold, on_frame), ["is there a red square?"],
                    choices=["yes", "no"], on_change=not every_frame, max_new_tokens=4,
                    stats=stats):
        errors += ev.error is not None
    end = dict(rss=rss_mb(), threads=threading.active_count(), fds=open_fds(),
               t=time.monotonic())
    return {"frames": frames, "hold": hold, "warmup": warmup, "answer_every_frame": every_frame,
            "seconds": round(end["t"] - marks["t"], 1),
            "rss_start_mb": round(marks["rss"], 1), "rss_end_mb": round(end["rss"], 1),
            "rss_growth_mb": round(end["rss"] - marks["rss"], 2),
            "thread_growth": end["threads"] - marks["threads"],
            "fd_growth": end["fds"] - marks["fds"], "answer_errors": errors,
            "watch": stats.summary()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--hold", type=int, default=50, help="frames each scene is held")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--answer-every-frame", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.frames <= a.warmup or a.hold < 1:
        p.error("--frames must exceed --warmup, and --hold be >= 1")
    print(json.dumps(soak(a.artifact, a.frames, a.hold, a.warmup, a.answer_every_frame,
                          a.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

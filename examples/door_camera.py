"""A door camera on the demo model: watch a source, ask a yes/no question
about the newest frame whenever the picture changes, and act when the
answer flips.

    vlm-export --model demo -o demo-onnx-fp32
    python examples/door_camera.py demo-onnx-fp32 --source 0          # a webcam
    python examples/door_camera.py demo-onnx-fp32 --source clip.mp4   # a video file

The demo model knows coloured shapes, not doors: "is there a red square?"
stands in for "is the door open?". Swap in your own artifact and question.
"""
from __future__ import annotations

import argparse
import sys

from vlmedge.errors import VlmedgeError
from vlmedge.runtime import VLMSession
from vlmedge.runtime.sources import open_source
from vlmedge.runtime.watch import WatchStats, watch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--source", required=True, help="0, /dev/video0, clip.mp4, rtsp://..., dir/")
    p.add_argument("--question", default="is there a red square?")
    a = p.parse_args()
    try:
        session = VLMSession(a.artifact, provider="auto", allow_fallback=True)
        source = open_source(a.source)
        stats = WatchStats()
        state = None
        for ev in watch(session, source, [a.question], choices=["yes", "no"], on_change=True,
                        stats=stats):
            if ev.error:
                print(f"frame {ev.frame_id}: no answer ({ev.error})", file=sys.stderr)
                continue
            if ev.value != state:  # the trigger: act only when the answer flips
                state = ev.value
                print(f"frame {ev.frame_id}: {a.question} -> {state} "
                      f"(frame age {ev.frame_age_ms:.0f} ms, {ev.ttft_ms:.0f} ms to answer)")
        s = stats.summary()
        print(f"done: {s['frames_in']} frames, {s['rounds']} answered, {s['dropped']} dropped",
              file=sys.stderr)
    except VlmedgeError as e:
        print(f"door_camera: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

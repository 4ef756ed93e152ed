"""The watch loop's latency at a given camera rate: answers/s, frame age and
time to first token (p50/p99), frames dropped, and the share of frames whose
vision encode was skipped, with image reuse on and off, side by side.

    python -m vlmedge.benchmarks.watch_bench ART [ART ...] --fps 15 --seconds 20 --json out.json

A synthetic live camera pushes camera-sized frames (640 x 480 by default: a
scene-world picture on a grey canvas, with a little sensor noise) at --fps;
the scene changes every --change-every seconds, so most frames are static.
The loop answers as fast as it can, always about the newest frame. Runs
alternate reuse on / off (--rounds times each) so machine drift hits both.
Prints a Markdown table; --json writes the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np


def camera_frames(size=(640, 480), n_scenes: int = 6) -> list[np.ndarray]:
    """Scene pictures centred on a grey canvas of `size` (W, H), as RGB arrays."""
    from PIL import Image

    from vlmedge.demo import scenes

    w, h = size
    side = min(w, h)
    out = []
    for i in range(n_scenes):
        scene = scenes.make_scene(scenes.EVAL_SEED_BASE + 800 + i).image.convert("RGB")
        canvas = Image.new("RGB", size, (128, 128, 128))
        canvas.paste(scene.resize((side, side), Image.BICUBIC), ((w - side) // 2, (h - side) // 2))
        out.append(np.asarray(canvas))
    return out


def run_once(session, frames, fps: float, seconds: float, change_every: float, reuse: bool,
             question: str, noise: int, seed: int) -> dict:
    from vlmedge.runtime.sources import PushSource
    from vlmedge.runtime.watch import WatchStats, watch

    src = PushSource()
    stats = WatchStats()
    rng = np.random.default_rng(seed)
    stop = threading.Event()

    def camera():
        start = time.monotonic()
        n = 0
        while not stop.is_set():
            t = time.monotonic() - start
            if t >= seconds:
                break
            base = frames[int(t // change_every) % len(frames)]
            if noise:  # sensor noise: the change score must see through it
                jitter = rng.integers(-noise, noise + 1, size=base.shape[:2] + (1,), dtype=np.int16)
                frame = np.clip(base.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
            else:
                frame = base
            src.push(frame)
            n += 1
            delay = start + n / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        src.end()

    cam = threading.Thread(target=camera, daemon=True)
    cam.start()
    events = list(watch(session, src, [question], reuse=reuse, max_new_tokens=8,
                        choices=["yes", "no"], stats=stats))
    stop.set()
    cam.join(10)
    s = stats.summary()
    age = np.array([e.frame_age_ms for e in events]) if events else np.array([np.nan])
    ttft = np.array([e.ttft_ms for e in events]) if events else np.array([np.nan])
    rounds = max(s["rounds"], 1)
    return {"reuse": reuse, "answers": s["answers"], "answers_per_s": s["answers_per_s"],
            "frames_in": s["frames_in"], "input_fps": s["input_fps"],
            "dropped": s["dropped"] + src.dropped,
            "frame_age_ms_p50": float(np.percentile(age, 50)),
            "frame_age_ms_p99": float(np.percentile(age, 99)),
            "ttft_ms_p50": float(np.percentile(ttft, 50)),
            "ttft_ms_p99": float(np.percentile(ttft, 99)),
            "encode_skipped_share": s["reuses"] / rounds, "encodes": s["encodes"]}


def bench(artifacts, fps, seconds, change_every, rounds, threads, question, noise, size):
    from vlmedge.runtime import VLMSession

    frames = camera_frames(size)
    results = []
    for art in artifacts:
        session = VLMSession(art, provider="cpu", threads=threads)
        session.generate(frames[0], question, max_new_tokens=2)  # warm-up
        runs = {True: [], False: []}
        for r in range(rounds):
            for reuse in (True, False):
                runs[reuse].append(run_once(session, frames, fps, seconds, change_every, reuse,
                                            question, noise, seed=r))
        for reuse, rs in runs.items():
            mean = {k: float(np.mean([x[k] for x in rs])) for k in rs[0] if k != "reuse"}
            results.append({"artifact": str(art), "reuse": reuse, **mean})
    return {"fps": fps, "seconds": seconds, "change_every": change_every, "rounds": rounds,
            "threads": threads, "frame_size": list(size), "noise": noise, "results": results}


def table(out: dict) -> str:
    rows = ["| artifact | reuse | answers/s | frame age p50 / p99 ms | TTFT p50 / p99 ms | "
            "dropped | encode skipped |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in out["results"]:
        rows.append(f"| {r['artifact']} | {'on' if r['reuse'] else 'off'} | "
                    f"{r['answers_per_s']:.2f} | {r['frame_age_ms_p50']:.0f} / "
                    f"{r['frame_age_ms_p99']:.0f} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | "
                    f"{r['dropped']:.0f} of {r['frames_in']:.0f} | "
                    f"{100 * r['encode_skipped_share']:.0f}% |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--seconds", type=float, default=10.0, help="per run")
    p.add_argument("--change-every", type=float, default=5.0, help="seconds between scenes")
    p.add_argument("--rounds", type=int, default=2, help="runs per setting, alternated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--noise", type=int, default=2, help="sensor noise, +- grey levels")
    p.add_argument("--size", default="640x480", help="frame size WxH")
    p.add_argument("--question", default="is there a red square?")
    p.add_argument("--json", dest="json_file")
    a = p.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    out = bench(a.artifacts, a.fps, a.seconds, a.change_every, a.rounds, a.threads, a.question,
                a.noise, (w, h))
    print(table(out))
    if a.json_file:
        with open(a.json_file, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

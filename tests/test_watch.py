"""Camera apps (runtime/sources.py, runtime/watch.py, vlm-watch): a synthetic
video of the scene world written as a real MP4, the watch loop's answers
against the scene at the frame they were asked on, image reuse, drop-stale,
schedules, reconnects, leaks, and the CLI."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vlmedge.demo import scenes
from vlmedge.errors import SourceError, UserInputError

av = pytest.importorskip("av")

FRAMES_PER_SCENE = 6
SEEDS = [scenes.EVAL_SEED_BASE + s for s in (301, 302, 303, 304, 305)]


def _bin(name):
    return str(Path(sys.executable).parent / name)


def write_video(path: Path, seeds, frames_per_scene: int, fps: int = 10) -> Path:
    """Scenes one after another, each held for frames_per_scene frames (objects
    appear, move and vanish between scenes), as an MPEG-4 file."""
    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=fps)
    stream.width = stream.height = 128
    stream.pix_fmt = "yuv420p"
    stream.codec_context.qmin, stream.codec_context.qmax = 1, 2  # near-lossless
    for seed in seeds:
        img = np.asarray(scenes.make_scene(seed).image.convert("RGB"))
        for _ in range(frames_per_scene):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "scenes.mp4", SEEDS, FRAMES_PER_SCENE)


@pytest.fixture(scope="module")
def session(demo_artifact):
    from vlmedge.runtime import VLMSession
    return VLMSession(demo_artifact, provider="cpu", threads=1)


def _truth(frame_id: int, kind: str) -> str:
    scene = scenes.make_scene(SEEDS[frame_id // FRAMES_PER_SCENE])
    return next(q.answer for q in scenes.questions(scene) if q.kind == kind)


def test_answers_match_the_scene_at_their_frame_and_reuse_only_unchanged(session, video):
    from vlmedge.runtime.sources import open_source
    from vlmedge.runtime.watch import WatchStats, watch

    stats = WatchStats()
    events = list(watch(session, open_source(str(video), realtime=False),
                        ["describe the image.", "how many shapes are there?"], stats=stats))
    assert len(events) == 2 * len(SEEDS) * FRAMES_PER_SCENE  # offline: every frame, no drops
    captions = [scenes.caption(scenes.make_scene(seed)) for seed in SEEDS]
    right = asked = 0
    for ev in events:
        if ev.question == "describe the image.":
            # Never another scene's caption (an answer about the wrong frame); its
            # own scene's on most frames (the demo reads captions 98% right, and
            # here through yuv420p video: one blue triangle reads as a diamond).
            own = ev.frame_id // FRAMES_PER_SCENE
            assert ev.answer not in captions[:own] + captions[own + 1:], ev
            right += ev.answer == captions[own]
            asked += 1
        first_of_scene = ev.frame_id % FRAMES_PER_SCENE == 0
        assert ev.reused is (not first_of_scene), ev  # reused on unchanged frames only
    assert right >= 0.75 * asked, (right, asked)
    counts = {ev.frame_id: ev.answer for ev in events if ev.question.startswith("how many")}
    for fid, answer in counts.items():
        n = len(scenes.make_scene(SEEDS[fid // FRAMES_PER_SCENE]).objects)
        assert answer == ["zero", "one", "two", "three"][n]
    assert stats.encodes == len(SEEDS) and stats.reuses == len(SEEDS) * (FRAMES_PER_SCENE - 1)
    assert stats.dropped == 0 and stats.frames_in == len(SEEDS) * FRAMES_PER_SCENE


def test_answer_changed_marks_the_trigger(session, video):
    from vlmedge.runtime.sources import open_source
    from vlmedge.runtime.watch import watch

    events = list(watch(session, open_source(str(video), realtime=False),
                        ["describe the image."]))
    prev = None
    for ev in events:
        assert ev.answer_changed == (prev is not None and ev.answer != prev)
        prev = ev.answer
    assert sum(ev.answer_changed for ev in events) == len(SEEDS) - 1


def test_on_change_answers_once_per_scene(session, video):
    from vlmedge.runtime.sources import open_source
    from vlmedge.runtime.watch import WatchStats, watch

    stats = WatchStats()
    events = list(watch(session, open_source(str(video), realtime=False), ["describe the image."],
                        on_change=True, stats=stats))
    assert [ev.frame_id for ev in events] == [i * FRAMES_PER_SCENE for i in range(len(SEEDS))]
    assert stats.skipped_unchanged == len(SEEDS) * (FRAMES_PER_SCENE - 1)


def test_structured_answers_in_the_loop(session, video):
    from vlmedge.runtime.sources import open_source
    from vlmedge.runtime.watch import watch

    events = list(watch(session, open_source(str(video), realtime=False),
                        ["is there a red square?"], choices=["yes", "no"], on_change=True))
    assert events and all(ev.value in ("yes", "no") for ev in events)


class _SlowSession:
    """The real session, made slow (a model that cannot keep up with the camera)."""

    def __init__(self, session, delay):
        self.session, self.delay = session, delay

    def encode(self, image):
        return self.session.encode(image)

    def generate(self, *a, **k):
        time.sleep(self.delay)
        return self.session.generate(*a, **k)


def test_drop_stale_answers_the_newest_frame(session):
    """Frames pushed at ~100 fps to a model that takes ~0.15 s an answer: the
    frames in between are dropped and counted, never queued, and no answer
    starts on a frame older than one that had arrived well before it."""
    from vlmedge.runtime.sources import PushSource
    from vlmedge.runtime.watch import WatchStats, watch

    src = PushSource()
    stats = WatchStats()
    frames = [np.asarray(scenes.make_scene(SEEDS[i % len(SEEDS)]).image.convert("RGB"))
              for i in range(len(SEEDS))]
    pushed: list[tuple[int, float]] = []
    events = []

    def consume():
        events.extend(watch(_SlowSession(session, 0.15), src, ["describe the image."],
                            reuse=False, stats=stats))

    t = threading.Thread(target=consume)
    t.start()
    for i in range(120):
        src.push(frames[(i // 10) % len(frames)])
        pushed.append((i, time.monotonic()))
        time.sleep(0.01)
    src.end()
    t.join(60)
    assert not t.is_alive()
    assert 3 <= len(events) < 60 and stats.dropped + src.dropped > 50
    ids = [ev.frame_id for ev in events]
    assert ids == sorted(set(ids))  # in order, each frame at most once
    for ev in events:
        start = ev.capture_ts + ev.frame_age_ms / 1000.0  # the answer's start
        # slack for the capture thread and the encode on a loaded machine; a
        # queue would fall further behind with every answer (0.14 s each)
        newer = [i for i, ts in pushed if ts < start - 0.4 and i > ev.frame_id]
        assert not newer, (ev.frame_id, newer[:3])  # a queue would answer stale frames
    assert max(ev.frame_age_ms for ev in events) < 1000


class _FlakySource:
    """A live source that fails after `fail_at` frames on each of its first
    `fail_times` connections (fail_at=0: a camera that is gone)."""

    live = True
    name = "flaky"
    corrupt = 0

    def __init__(self, fail_times=1, fail_at=3):
        self.opens, self.fail_times, self.fail_at, self.next_id = 0, fail_times, fail_at, 0
        self.img = np.asarray(scenes.make_scene(SEEDS[0]).image.convert("RGB"))

    def __iter__(self):
        from vlmedge.runtime.sources import Frame
        for k in range(6):
            if k == self.fail_at and self.opens < self.fail_times:
                raise SourceError("camera unplugged")
            f = Frame(self.next_id, time.monotonic(), self.img)
            self.next_id += 1
            yield f
            time.sleep(0.02)

    def reopen(self):
        self.opens += 1

    def close(self):
        pass


def test_a_source_that_fails_reconnects(session):
    from vlmedge.runtime.watch import WatchStats, watch

    stats = WatchStats()
    src = _FlakySource()
    events = list(watch(session, src, ["describe the image."], stats=stats))
    assert stats.reconnects == 1 and src.opens == 1
    assert events and max(ev.frame_id for ev in events) >= 6  # frames after the reconnect


def test_a_source_that_keeps_failing_ends_in_one_error(session):
    from vlmedge.runtime.watch import watch

    with pytest.raises(SourceError, match="unplugged"):
        list(watch(session, _FlakySource(fail_times=99, fail_at=0), ["describe the image."],
                   max_reconnects=2))


def test_corrupt_images_are_skipped_and_counted(session, tmp_path):
    from vlmedge.runtime.sources import open_source
    from vlmedge.runtime.watch import WatchStats, watch

    for i, seed in enumerate(SEEDS[:3]):
        scenes.make_scene(seed).image.save(tmp_path / f"{i}.png")
    (tmp_path / "1b.png").write_bytes(b"\x89PNG not really")
    stats = WatchStats()
    events = list(watch(session, open_source(str(tmp_path)), ["describe the image."],
                        stats=stats))
    assert len(events) == 3 and stats.corrupt == 1


def test_no_thread_or_descriptor_leaks(session, video):
    """Capture threads and the video file are released when a loop ends or is
    closed early. Counted by name and by target (not the process totals, which
    other libraries' background threads move)."""
    from vlmedge.runtime.sources import open_source
    from vlmedge.runtime.watch import watch

    def capture_threads():
        return [t for t in threading.enumerate() if t.name == "vlmedge-capture"]

    def video_fds():
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == str(video):
                    out.append(fd)
            except OSError:
                pass
        return out

    list(watch(session, open_source(str(video)), ["describe the image."], max_frames=2))
    for _ in range(5):
        gen = watch(session, open_source(str(video)), ["describe the image."])
        next(gen)
        assert len(capture_threads()) == 1 and video_fds()  # running: one thread, file open
        gen.close()  # stopped early: capture thread and file closed
    assert capture_threads() == [] and video_fds() == []


@pytest.mark.parametrize("spec", ["nope.mp4", "", "/dev/video99", "gst:"])
def test_bad_source_is_one_line(demo_artifact, spec, tmp_path):
    r = subprocess.run([_bin("vlm-watch"), str(demo_artifact), "--source", spec, "-q", "x"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("vlm-watch: error:")


def test_vlm_watch_writes_json_lines(demo_artifact, video, tmp_path):
    out = tmp_path / "events.jsonl"
    r = subprocess.run([_bin("vlm-watch"), str(demo_artifact), "--source", str(video),
                        "--offline", "-q", "is there a red square?", "--choices", "yes,no",
                        "--on-change", "--jsonl", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(SEEDS) and all(x["answer"] in ("yes", "no") for x in lines)
    for key in ("frame_id", "capture_ts", "question", "answer", "ttft_ms", "frame_age_ms",
                "reused", "dropped_so_far"):
        assert key in lines[0]
    assert "vlm-watch: done:" in r.stderr and f"{len(SEEDS) * FRAMES_PER_SCENE} frames in" \
        in r.stderr


def test_watch_checks_its_arguments(session, video):
    from vlmedge.runtime.sources import open_source
    from vlmedge.runtime.watch import watch

    for kw in (dict(every=0), dict(change_threshold=-1), dict(max_frames=0)):
        with pytest.raises(UserInputError):
            next(watch(session, open_source(str(video), realtime=False), ["q"], **kw))
    with pytest.raises(UserInputError):
        next(watch(session, open_source(str(video), realtime=False), []))


def test_vlm_run_encodes_the_image_once_for_several_prompts(demo_artifact):
    r = subprocess.run([_bin("vlm-run"), str(demo_artifact), "--prompt", "describe the image.",
                        "--prompt", "what color is the circle?", "--no-stream"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    timing = [x for x in r.stderr.splitlines() if x.startswith("[")]
    assert len(timing) == 2 and "vision" in timing[0] and "image reused" in timing[1]


def test_soak_short(demo_artifact):
    """CI's short soak (benchmarks/watch_soak.py; the 100,000-frame run's
    figures are in the issue's closing note): every frame answered."""
    r = subprocess.run([sys.executable, "-m", "vlmedge.benchmarks.watch_soak", str(demo_artifact),
                        "--frames", "3000", "--warmup", "500", "--hold", "50",
                        "--answer-every-frame"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["answer_errors"] == 0 and out["watch"]["answers"] == 3000
    assert out["thread_growth"] == 0 and out["fd_growth"] == 0
    assert out["rss_growth_mb"] < 5, out


def test_opencv_capture_path_reads_a_stream(video, session):
    """The OpenCV path (cameras, RTSP, GStreamer) on what it can open here: the
    MP4 through VideoCapture; its end is a SourceError, as an unplugged camera."""
    pytest.importorskip("cv2")
    from vlmedge.runtime.sources import CaptureSource

    src = CaptureSource(str(video))
    frames = []
    with pytest.raises(SourceError, match="stopped delivering frames"):
        for f in src:
            frames.append(f)
    src.close()
    assert len(frames) == len(SEEDS) * FRAMES_PER_SCENE
    assert frames[0].rgb.shape == (128, 128, 3) and frames[0].rgb.dtype == np.uint8
    first = session.generate(frames[0].rgb, "describe the image.").text
    assert first == _truth(0, "caption")  # RGB order, not OpenCV's BGR


def test_ctrl_c_stops_cleanly_with_a_summary(demo_artifact, tmp_path):
    import signal

    long_video = write_video(tmp_path / "long.mp4", SEEDS * 4, 10)  # 20 s at 10 fps
    # The child gets Ctrl-C's default disposition whatever ours is: a suite
    # started in the background by a non-interactive shell runs with SIGINT
    # ignored, which children inherit (Python then installs no handler).
    p = subprocess.Popen([_bin("vlm-watch"), str(demo_artifact), "--source", str(long_video),
                          "-q", "describe the image."], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = p.stdout.readline()  # the loop is running
        assert json.loads(first)["frame_id"] >= 0
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "vlm-watch: stopped:" in err and "frames in" in err

"""vlm-watch: answer questions about a live camera, stream, video or folder,
always about the newest frame, reusing the image work of unchanged frames."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from vlmedge.errors import UserInputError, cli_errors
from vlmedge.runtime.cli_common import make_app

app = make_app(
    "Answer questions about the newest frame of a camera, stream, video file or image folder "
    "with an artifact from vlm-export. Prints one JSON line per answer (frame_id, capture "
    "ts, question, answer, ttft_ms, frame_age_ms, reused, dropped_so_far, ...) and a live "
    "status line on stderr.\n\n"
    "Sources: 0 (camera index), /dev/video0, clip.mp4, rtsp://host/stream, "
    "'gst:nvarguscamerasrc ! ... ! appsink' (Jetson CSI), frames/ or 'frames/*.jpg'.\n\n"
    "Examples:\n\n"
    "  vlm-watch ART --source 0 --question 'is the door open?' --choices yes,no --on-change\n\n"
    "  vlm-watch ART --source clip.mp4 --question 'how many people?' --every 2s --jsonl out.jsonl")


def parse_seconds(text: str | None) -> float | None:
    """'2', '2s', '500ms', '1.5m' -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m)?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UserInputError("--every takes a duration", expected="e.g. 2s, 500ms, 1m",
                             got=repr(text))
    return float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]


@app.command()
def main(
    artifact_dir: Path = typer.Argument(..., help="Artifact directory written by vlm-export."),
    source: str = typer.Option(..., "--source", "-s", help="Frame source (see above)."),
    question: List[str] = typer.Option(..., "--question", "-q",
                                       help="Question; repeat for several (one encode a frame)."),
    every: Optional[str] = typer.Option(
        None, "--every", help="Answer at most once per period (2s, 500ms); default: every "
        "frame the model can keep up with."),
    on_change: bool = typer.Option(False, "--on-change",
                                   help="Answer only when the frame changed."),
    change_threshold: float = typer.Option(
        4.0, "--change-threshold", help="Change score (mean grey-level difference of 32x32 "
        "thumbnails) at or above which a frame counts as changed."),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse",
                               help="Reuse image features and prompt KV on unchanged frames."),
    choices: Optional[str] = typer.Option(None, "--choices", help="Comma-separated answers."),
    json_schema: Optional[str] = typer.Option(None, "--json-schema",
                                              help="JSON schema file or text for the answer."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n"),
    fps: Optional[float] = typer.Option(None, "--fps", help="Image folders: frames per second."),
    realtime: bool = typer.Option(
        True, "--realtime/--offline", help="Video files: deliver frames at the file's pace "
        "(stale ones dropped, as a camera) or read every frame (offline)."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames",
                                             help="Stop after answering this many frames."),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="Write the JSON lines here "
                                         "instead of stdout."),
    provider: str = typer.Option("auto", "--provider", help="auto | cpu | cuda | trt"),
    threads: int = typer.Option(0, "--threads", help="CPU threads per graph (0: default)."),
    max_image_tokens: Optional[int] = typer.Option(
        None, "--max-image-tokens", help="Image-token budget: SmolVLM tiles / Qwen2-VL pixels "
        "scaled so the image takes at most this many tokens (less vision and prefill time)."),
    quiet: bool = typer.Option(False, "--quiet", help="No live status line."),
) -> None:
    with cli_errors("vlm-watch"):
        from vlmedge.runtime import VLMSession
        from vlmedge.runtime.cli import structured_options
        from vlmedge.runtime.sources import open_source
        from vlmedge.runtime.watch import WatchStats, watch

        if threads < 0:
            raise UserInputError("--threads must be >= 0", got=str(threads))
        if every is not None and on_change:
            raise UserInputError("--every and --on-change are exclusive", hint="pick one")
        if fps is not None and fps <= 0:
            raise UserInputError("--fps must be > 0", got=str(fps))
        period = parse_seconds(every)
        structured = structured_options(choices, json_schema)
        src = open_source(source, fps=fps, realtime=realtime)
        session = VLMSession(artifact_dir, provider=provider, threads=threads or None,
                             allow_fallback=provider == "auto",
                             max_image_tokens=max_image_tokens)
        out = open(jsonl, "w", buffering=1) if jsonl else sys.stdout
        stats = WatchStats()
        status = _Status(stats, quiet)
        try:
            for ev in watch(session, src, question, every=period, on_change=on_change,
                            change_threshold=change_threshold, reuse=reuse,
                            max_new_tokens=max_new_tokens, max_frames=max_frames, stats=stats,
                            **structured):
                print(ev.to_json(), file=out, flush=True)
                status.update(ev)
        except KeyboardInterrupt:
            status.close()
            print(f"vlm-watch: stopped: {_summary(stats)}", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            if jsonl:
                out.close()
        status.close()
        print(f"vlm-watch: done: {_summary(stats)}", file=sys.stderr)


def _summary(stats) -> str:
    s = stats.summary()
    return (f"{s['frames_in']} frames in ({s['input_fps']} fps), {s['rounds']} answered, "
            f"{s['dropped']} dropped, {s['reuses']} reused, {s['corrupt']} corrupt, "
            f"{s['reconnects']} reconnects, {s['answers']} answers in {s['seconds']} s")


class _Status:
    """The live status line on stderr (rich), refreshed per answer."""

    def __init__(self, stats, quiet: bool):
        self.stats, self.live = stats, None
        if quiet or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.live import Live
        self.live = Live("", console=Console(stderr=True), refresh_per_second=4, transient=True)
        self.live.__enter__()

    def update(self, ev) -> None:
        if self.live is None:
            return
        s = self.stats.summary()
        self.live.update(
            f"in {s['input_fps']:.1f} fps | {s['answers_per_s']:.2f} answers/s | dropped "
            f"{s['dropped']} | reuse {100 * s['reuse_rate']:.0f}% | frame age "
            f"{ev.frame_age_ms:.0f} ms | last: {ev.question} -> {ev.answer[:40]}")

    def close(self) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None


if __name__ == "__main__":
    app()

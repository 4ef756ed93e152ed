"""vlm-bench: per-stage latency of artifacts side by side with PyTorch eager.

Not built yet (issue: vlm-bench). The command and its options are fixed here
so scripts can be written against them; running it says so in one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vlmedge.errors import VlmedgeError, cli_errors
from vlmedge.runtime.cli_common import make_app

app = make_app(
    "Measure latency per stage (preprocess, vision, prefill, TTFT, decode p50/p90/p99, "
    "tokens/s, peak RSS) for one or more artifact directories, interleaved with a "
    "PyTorch eager baseline so machine drift cancels, and report ratios and roofline "
    "shares. (Planned: this version only prints this help.)")


@app.command()
def main(
    artifact_dirs: List[Path] = typer.Argument(..., help="Artifact directories to compare."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="'torch' for PyTorch eager."),
    new_tokens: int = typer.Option(16, "--new-tokens", help="Tokens generated per run."),
    runs: int = typer.Option(5, "--runs"),
    warmup: int = typer.Option(1, "--warmup"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write results as JSON."),
) -> None:
    with cli_errors("vlm-bench"):
        raise VlmedgeError("vlm-bench is not implemented in vlmedge 0.1.0",
                           hint="use vlm-run --json for per-stage timings of one artifact")

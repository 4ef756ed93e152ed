"""vlm-bench: per-stage latency of artifacts side by side with PyTorch eager,
the machine's roofline measured in the same run, ratios, and a report.

    vlm-bench demo-onnx-fp32 demo-onnx-int8 --baseline torch --json bench/demo.json \
        --report bench/report
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from vlmedge.errors import UserInputError, cli_errors
from vlmedge.runtime.cli_common import Progress, make_app, positive

app = make_app(
    "Measure latency per stage (preprocess, vision, prefill, TTFT, decode p50/p90/p99, "
    "tokens/s, end to end, peak RSS) for one or more artifact directories, interleaved "
    "run by run with a PyTorch eager baseline (--baseline torch) so machine drift cancels; "
    "report ratios against the baseline and each stage's share of the machine's roofline "
    "(memory bandwidth and GEMM rate, measured in the same run).\n\n"
    "Every system runs in its own process (its peak RSS is its own) and generates exactly "
    "--new-tokens tokens. Progress goes to stderr, the summary table to stdout.\n\n"
    "Examples:\n\n"
    "  vlm-bench demo-onnx-fp32 --baseline torch\n\n"
    "  vlm-bench demo-onnx-fp32 demo-onnx-int8 --baseline torch --json bench/demo.json "
    "--report bench/report\n\n"
    "  vlm-bench smolvlm-256m-onnx-fp32 --threads 4 --sweep image-size")


def _threads(n: int) -> int:
    if n < 0:
        raise UserInputError("--threads must be >= 0", got=str(n), hint="0 means every core")
    return n or os.cpu_count() or 1


def check(artifact_dirs, baseline, image, new_tokens, runs, warmup, sweeps, provider,
          max_image_tokens=None, peer=None) -> None:
    """Argument checks before anything loads: one clear line each."""
    from vlmedge.benchmarks.bench.run import SWEEPS

    if not artifact_dirs:
        raise UserInputError("no artifact directory given", expected="one or more ARTIFACT_DIRs",
                             hint="export one with: vlm-export --model demo")
    if baseline not in (None, "torch"):
        raise UserInputError(f"unknown --baseline {baseline!r}", expected="torch")
    positive("--runs", runs)
    if new_tokens is None or new_tokens < 2:
        raise UserInputError("--new-tokens must be >= 2 (one token has no decode step)",
                             got=str(new_tokens))
    if warmup < 0:
        raise UserInputError("--warmup must be >= 0", got=str(warmup))
    for s in sweeps:
        if s not in SWEEPS:
            raise UserInputError(f"unknown --sweep {s!r}", expected=" | ".join(SWEEPS))
    if image is not None and not image.is_file():
        raise UserInputError(f"--image {image} is not a file", expected="an image file")
    if provider not in ("cpu", "cuda", "auto"):
        raise UserInputError(f"unknown --provider {provider!r}", expected="cpu | cuda | auto")
    from vlmedge.benchmarks.bench.peer import PEERS

    for p in peer or []:
        if p not in PEERS:
            raise UserInputError(f"unknown --peer {p!r}", expected=" | ".join(PEERS))
    if peer and provider != "cpu":
        # peers are built for the CPU (onnxruntime-genai's CPU package; a CUDA build
        # differs: fp16 weights, onnxruntime-genai-cuda; llama-cpp-python's CPU build)
        raise UserInputError("--peer runs on the CPU provider only",
                             got=f"--provider {provider}", hint="use --provider cpu")
    if max_image_tokens is not None and max_image_tokens < 1:
        raise UserInputError("--max-image-tokens must be >= 1", got=str(max_image_tokens))


@app.command()
def main(
    artifact_dirs: Optional[List[Path]] = typer.Argument(
        None, help="Artifact directories from vlm-export (fp32, int8, ...)."),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="'torch': PyTorch eager (transformers generate, KV cache) on "
                                 "the same model."),
    model: Optional[str] = typer.Option(
        None, "--model", help="The baseline's model directory, or 'demo' (default: the first "
                              "artifact's source)."),
    image: Optional[Path] = typer.Option(
        None, "--image", help="Image file (default: a 640x480 frame of a demo scene)."),
    prompt: str = typer.Option("describe the image.", "--prompt"),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Tokens generated per run (forced)."),
    runs: int = typer.Option(5, "--runs", help="Timed runs per system."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs per system first."),
    threads: int = typer.Option(0, "--threads", help="CPU threads per system (0: every core)."),
    sweep: Optional[List[str]] = typer.Option(
        None, "--sweep", help="prompt-len | new-tokens | image-size (repeatable)."),
    provider: str = typer.Option("cpu", "--provider",
                                 help="onnxruntime provider for the artifacts: cpu | cuda | auto."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    report: Optional[Path] = typer.Option(
        None, "--report", help="Write report.md and PNG plots to this directory."),
    max_image_tokens: Optional[int] = typer.Option(
        None, "--max-image-tokens", help="Image-token budget for every system (the baseline's "
        "processor gets the same tiling), e.g. 64: one SmolVLM tile."),
    peer: Optional[List[str]] = typer.Option(
        None, "--peer", help="onnxruntime-genai | llama.cpp (repeatable): that runtime on its "
        "own model of each ort-flavour artifact's language model (same weights, same bit "
        "width), side by side: decode and prefill compared. Built once into --peer-cache "
        "(needs the artifact's source model and torch; onnxruntime-genai, or llama-cpp-python "
        "and gguf)."),
    peer_cache: Optional[Path] = typer.Option(
        None, "--peer-cache", help="Where peer models are built and kept "
        "(default: ~/.cache/vlmedge/peers)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Check every artifact file's sha256 against its "
        "manifest before benchmarking (on by default; --no-verify warns)."),
) -> None:
    with cli_errors("vlm-bench"):
        sweeps = list(sweep or [])
        check(artifact_dirs, baseline, image, new_tokens, runs, warmup, sweeps, provider,
              max_image_tokens, peer)
        from vlmedge.benchmarks.bench import report as report_mod
        from vlmedge.benchmarks.bench.run import Options, run_bench

        opts = Options(artifacts=list(artifact_dirs), baseline=baseline, model=model,
                       image=image, prompt=prompt, new_tokens=new_tokens, runs=runs,
                       warmup=warmup, threads=_threads(threads), provider=provider,
                       sweeps=sweeps, verify=verify, max_image_tokens=max_image_tokens,
                       peers=list(dict.fromkeys(peer or [])), peer_cache=peer_cache)
        if not verify:
            print("vlm-bench: warning: --no-verify: the artifacts' sha256 are not checked; a "
                  "tampered or corrupt artifact is benchmarked as it is", file=sys.stderr)

        def log(line: str) -> None:
            if not quiet:
                print(f"[vlm-bench] {line}", file=sys.stderr, flush=True)

        with Progress("vlm-bench runs", 1, quiet=quiet) as bar:
            results = run_bench(opts, bar.update, log)
        if json_file is not None:
            json_file.parent.mkdir(parents=True, exist_ok=True)
            json_file.write_text(json.dumps(results, indent=2) + "\n")
            log(f"wrote {json_file}")
        if report is not None:
            files = report_mod.write_report(results, report)
            log(f"wrote {', '.join(str(f) for f in files)}")
        print(report_mod.summary(results))


if __name__ == "__main__":
    app()

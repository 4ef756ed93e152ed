"""The TensorRT subcommands of vlm-export: check-trt and build-engines.

Both import their heavy modules (onnx, tensorrt) inside the command, so
`--help` works on a machine without either.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from vlmedge.errors import cli_errors

from .trtexec import DEFAULT_WORKSPACE_MB


def check_trt(
    artifact: Path = typer.Argument(..., help="Artifact directory (or a directory of .onnx "
                                              "files, or one .onnx file) to check."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """vlm-export check-trt (help: CHECK_HELP)."""
    with cli_errors("vlm-export check-trt"):
        from .compat import check_path, format_report

        report = check_path(artifact)
        if as_json:
            print(json.dumps(report.summary()))
        else:
            print("\n".join(format_report(report)))
    if not report.passed:
        raise typer.Exit(1)


def build_engines(
    artifact: Path = typer.Argument(..., help="Artifact directory exported with --target trt."),
    workspace: Optional[int] = typer.Option(
        DEFAULT_WORKSPACE_MB, "--workspace", help="Builder workspace limit in MB (device memory "
                                                  "TensorRT may use for tactics)."),
    timing_cache: Optional[Path] = typer.Option(
        None, "--timing-cache", help="Timing cache file to load and update (default: "
                                     "ARTIFACT/timing.cache); share it between builds on one "
                                     "device to build faster."),
    adopt: bool = typer.Option(
        False, "--adopt", help="Record engines build_engines.sh (trtexec) already wrote, "
                               "instead of building."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """vlm-export build-engines (help: BUILD_HELP)."""
    with cli_errors("vlm-export build-engines"):
        from .build import build_engines as build

        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        s = build(artifact, workspace_mb=workspace, timing_cache=timing_cache, adopt=adopt, log=log)
        if as_json:
            print(json.dumps(s))
            return
        print(f"engines for {artifact}: TensorRT {s['tensorrt_version']}, compute capability "
              f"{s['compute_capability']} ({s['gpu_name']}); peak host memory "
              f"{s['peak_host_mb']:.0f} MB")
        for comp, e in s["engines"].items():
            print(f"  {e['file']:20s} {e['bytes'] / 1e6:10.2f} MB  profiles: "
                  f"{', '.join(e['profiles'])}")


CHECK_HELP = ("Check every node of an artifact's ONNX graphs against TensorRT's supported ONNX "
              "operators (types, attributes, constant inputs, Q/DQ zero points) and flag sizes "
              "that depend on data. Needs no TensorRT. Exit status 1 when there are problems.")
BUILD_HELP = ("Build one TensorRT engine per component on this device with the artifact's "
              "optimization profiles and precision, and record the engines, TensorRT version "
              "and GPU compute capability in its manifest. Needs TensorRT and cuda-python.")


def register(app: typer.Typer) -> None:
    app.command("check-trt", help=CHECK_HELP)(check_trt)
    app.command("build-engines", help=BUILD_HELP)(build_engines)

"""vlm-export: Hugging Face VLM directory -> artifact directory."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from vlmedge.errors import cli_errors
from vlmedge.models import DEMO, resolve_model_dir
from vlmedge.runtime.cli_common import make_app

app = make_app(
    "Export a Hugging Face vision-language model (vision encoder + projector, token "
    "embedding, KV-cached decoder) to an artifact directory the vlmedge runtime loads, "
    "and prove it matches PyTorch.\n\n"
    "Examples:\n\n"
    "  vlm-export                                  # the bundled demo model -> ./demo-onnx-fp32\n\n"
    "  vlm-export --model ./SmolVLM-256M --precision fp16\n\n"
    "  vlm-export --model benchmarks/presets/smolvlm-256m --random-weights  # latency planning")


def _default_output(model: str, target: str, precision: str) -> Path:
    name = DEMO if model == DEMO else Path(model).expanduser().resolve().name
    return Path(f"{name}-{target}-{precision}")


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    model: str = typer.Option(DEMO, "--model", "-m",
                              help="Hugging Face model directory, or 'demo' (the bundled model)."),
    target: str = typer.Option("onnx", "--target", "-t", help="onnx | trt"),
    precision: str = typer.Option("fp32", "--precision", "-p",
                                  help="fp32 | fp16 (GPU graphs) | int8 | int8-dynamic"),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Artifact directory (default: <model>-<target>-<precision>)."),
    validate: bool = typer.Option(True, "--validate/--no-validate",
                                  help="Compare with PyTorch in onnxruntime (on by default)."),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Build the model from config.json alone (latency planning)."),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", help="Context length to serve (default: the model's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    keep_failed: bool = typer.Option(
        False, "--keep-failed", help="On failed validation keep the artifact as <output>.failed."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow code from the model directory to run."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Allow pickle (.bin) checkpoints; they can run code."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    with cli_errors("vlm-export"):
        from .exporter import ExportOptions, check_options, run_export

        opts = ExportOptions(
            model_dir=Path(), output=output or _default_output(model, target, precision),
            target=target, precision=precision, validate=validate,
            random_weights=random_weights, max_context=max_context, force=force,
            keep_failed=keep_failed, trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle)
        check_options(opts)  # cheap argument checks before touching the model
        opts.model_dir = resolve_model_dir(model)

        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        summary = run_export(opts, log)
        if as_json:
            print(json.dumps(summary))
            return
        _print_summary(summary)


def _print_summary(s: dict) -> None:
    print(f"wrote {s['output']} ({s['family']}, {s['target']}, {s['precision']}"
          f"{', random weights' if s['random_weights'] else ''}):")
    for name, size in s["files"].items():
        print(f"  {name:24s} {size / 1e6:10.2f} MB")
    print(f"  {'total':24s} {s['total_bytes'] / 1e6:10.2f} MB")
    v = s.get("validation")
    if not v:
        print("validation: not run (--no-validate)")
    elif v.get("skipped"):
        print(f"validation: skipped: {v['reason']}")
    else:
        print(f"validation: {'passed' if v['passed'] else 'FAILED'}: tokens_match={v['tokens_match']}"
              f", max|d logits|={v['max_abs_diff_logits']:.2e}, max|d image_features|="
              f"{v['max_abs_diff_image_features']:.2e}, cached vs recompute="
              f"{v['cached_vs_recompute_max_abs_diff']:.2e}")

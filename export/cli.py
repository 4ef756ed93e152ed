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
    "  vlm-export --model ./SmolVLM-256M --precision int4 --calib ./frames  # ort flavour, 4-bit\n\n"
    "  vlm-export --model ./SmolVLM-256M --target trt --precision int4-fp16 --calib ./frames\n\n"
    "  vlm-export --model benchmarks/presets/smolvlm-256m --random-weights  # latency planning")


def _default_output(model: str, opts) -> Path:
    """<model>-<target>-<precision> (demo-onnx-fp32), or with the decoder
    flavour in place of the target where it is not the portable one
    (demo-ort-int4, demo-both-int4), so the README's exports one after another
    each get their own directory."""
    from .exporter import flavours

    name = DEMO if model == DEMO else Path(model).expanduser().resolve().name
    kind = {("portable",): opts.target, ("ort",): "ort"}.get(flavours(opts), "both")
    return Path(f"{name}-{kind}-{opts.precision}")


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    model: str = typer.Option(DEMO, "--model", "-m",
                              help="Hugging Face model directory, or 'demo' (the bundled model)."),
    target: str = typer.Option("onnx", "--target", "-t", help="onnx | trt"),
    precision: str = typer.Option("fp32", "--precision", "-p",
                                  help="fp32 | fp16 (GPU graphs) | int8 | int8-dynamic | int4 "
                                  "(weight-only: MatMulNBits in the ort flavour, int4 "
                                  "DequantizeLinear blocks in the portable one) | int4-fp16 "
                                  "(those blocks with fp16 scales and activations, W4A16: "
                                  "TensorRT's weight-only INT4)"),
    decoder_flavour: Optional[str] = typer.Option(
        None, "--decoder-flavour", help="portable (standard ONNX ops: TensorRT, every EP) | ort "
        "(onnxruntime's fused GroupQueryAttention + shared KV buffer, MatMulNBits weights with "
        "int8/int4; CPU and CUDA EPs) | both (fp32 or int4: the two decoder graphs in one "
        "artifact, each validated and gated, the ort one beside a fused vision graph that "
        "reads the standard one's weights; the runtime runs ort on onnxruntime's CPU "
        "provider, portable elsewhere). Default: ort for int4, else portable; "
        "--decoder-flavour portable --precision int4 keeps standard ONNX ops."),
    vision_precision: str = typer.Option(
        "fp32", "--vision-precision", help="weight-only exports (int4; the ort flavour's int8): "
        "the vision graph fp32 | int8 (static QDQ, calibrated on --calib, gated)."),
    weight_method: str = typer.Option(
        "rtn", "--weight-method", help="ort flavour's int8/int4 weights: rtn (round to nearest) "
        "| gptq (calibrated on --calib: error-compensated rounding, onnxruntime's GPTQ)."),
    weight_block_size: Optional[int] = typer.Option(
        None, "--weight-block-size", help="int4 / ort int8 weights: how many share one scale "
        "(16 | 32 | 64 | 128 | 256). Default 32 (llama.cpp q4_0's), the most accurate; 128 "
        "reads fewer scales and decodes faster (the accuracy gate decides). int4-fp16: 64 | "
        "128 (TensorRT's), default 128."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Artifact directory (default: "
        "<model>-<target>-<precision>, the decoder flavour in place of the target for ort or both: demo-ort-int4)."),
    validate: bool = typer.Option(True, "--validate/--no-validate",
                                  help="Compare with PyTorch in onnxruntime (on by default)."),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Build the model from config.json alone (latency planning)."),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", help="Context length to serve (default: the model's); with "
                                    "--target trt, the KV cache and profile maximum."),
    max_batch: int = typer.Option(
        1, "--max-batch", help="--target trt: most sequences per decoder call (profile maximum)."),
    max_images: int = typer.Option(
        1, "--max-images", help="--target trt: most images per prompt (vision profile maximum)."),
    max_image_tokens: Optional[int] = typer.Option(
        None, "--max-image-tokens", help="The artifact's default image-token budget (SmolVLM "
        "tiles / Qwen2-VL pixels scaled to fit; a call can set its own)."),
    pan_and_scan: bool = typer.Option(
        False, "--pan-and-scan", help="Gemma 3: an elongated image is also seen as 2-4 crops "
        "along its long side (the processor's do_pan_and_scan; 256 more image tokens a crop). "
        "--max-image-tokens / a call's budget lowers the crop count."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    keep_failed: bool = typer.Option(
        False, "--keep-failed", help="On failed validation keep the artifact as <output>.failed."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow code from the model directory to run."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Allow pickle (.bin) checkpoints; they can run code."),
    calib: Optional[str] = typer.Option(
        None, "--calib", help="int8 / int8-dynamic: calibration data, a folder of images (jpg, png, "
        "webp; recursive) with an optional prompts.jsonl of {\"image\": ..., \"prompt\": ...} "
        "lines, or 'synthetic' (the demo scene world; the default for the demo model)."),
    calib_size: Optional[int] = typer.Option(
        None, "--calib-size", help="Images to calibrate on (default 64, fewer if the folder is "
        "smaller); up to 32 more are held out for the accuracy gate."),
    calib_method: str = typer.Option(
        "minmax", "--calib-method", help="int8: how activation ranges are set from the "
        "calibration data: minmax | entropy | percentile (99.999th)."),
    accuracy_target: float = typer.Option(
        0.97, "--accuracy-target", help="Minimum teacher-forced top-1 agreement with fp32 on the "
        "held-out split; below it the most harmful nodes are kept in fp32 until it is met, or "
        "the export fails."),
    min_cosine: float = typer.Option(
        0.99, "--min-cosine", help="Minimum mean cosine of INT8 vs fp32 image features (gate)."),
    max_accuracy_drop: float = typer.Option(
        1.0, "--max-accuracy-drop", help="Demo model: most scene-question accuracy points INT8 "
        "may lose against fp32 on the held-out scenes (gate)."),
    calib_cache: Optional[str] = typer.Option(
        None, "--calib-cache", help="Folder caching collected activation ranges (default "
        "~/.cache/vlmedge/calibration, or $VLMEDGE_CACHE_DIR); 'off' disables it."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    with cli_errors("vlm-export"):
        from .exporter import ExportOptions, check_options, run_export

        opts = ExportOptions(
            model_dir=Path(), output=output or Path(),
            target=target, precision=precision, decoder_flavour=decoder_flavour,
            vision_precision=vision_precision, weight_method=weight_method,
            weight_block_size=weight_block_size, validate=validate,
            random_weights=random_weights, max_context=max_context, max_batch=max_batch,
            max_images=max_images, max_image_tokens=max_image_tokens,
            pan_and_scan=pan_and_scan, force=force,
            keep_failed=keep_failed, trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle, calib=calib, calib_size=calib_size,
            calib_method=calib_method, accuracy_target=accuracy_target, min_cosine=min_cosine,
            max_accuracy_drop=max_accuracy_drop, calib_cache=calib_cache, progress=True)
        check_options(opts)  # cheap argument checks before touching the model
        if output is None:
            opts.output = _default_output(model, opts)
        opts.model_dir = resolve_model_dir(model)

        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        summary = run_export(opts, log)
        if as_json:
            print(json.dumps(summary))
            return
        _print_summary(summary)


def _print_summary(s: dict) -> None:
    print(f"wrote {s['output']} ({s['family']}, {s['target']}, {s['precision']}, "
          f"{' + '.join(s['decoder_flavours'])} decoder"
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
    q = s.get("quantization")
    if q and q["method"] == "weight-only":
        scene = "" if q["scene_accuracy"] is None else (
            f", scene accuracy {100 * q['scene_accuracy']:.1f}% (fp32 "
            f"{100 * q['scene_accuracy_fp32']:.1f}%)")
        gate = ("accuracy gate skipped (random weights)" if q["agreement"] is None else
                f"top-1 agreement {100 * q['agreement']:.2f}%{scene}")
        print(f"quantization: weight-only decoder, {q['size_ratio']:.3f}x its fp32 size, {gate}")
    elif q:
        ex = sum(len(v) for v in q["excluded_nodes"].values())
        scene = "" if q["scene_accuracy"] is None else (
            f", scene accuracy {100 * q['scene_accuracy']:.1f}% (fp32 "
            f"{100 * q['scene_accuracy_fp32']:.1f}%)")
        print(f"quantization: {q['method']}{' (CPU only)' if q['cpu_only'] else ''}, "
              f"{q['size_ratio']:.3f}x fp32 size, cosine {q['cosine_mean']:.4f}, top-1 agreement "
              f"{100 * q['agreement']:.2f}%{scene}, {ex} node(s) kept fp32; see "
              f"calibration_report.md")
    t = s.get("trt")
    if t:
        print(f"TensorRT check: {'passed' if t['check_passed'] else 'PROBLEMS (vlm-export check-trt)'}"
              f"; build script: build_engines.sh")
        if t["engines_built"]:
            print(f"engines: built with TensorRT {t['tensorrt_version']} for compute capability "
                  f"{t['compute_capability']}")
        else:
            print(f"engines: not built (TensorRT is not importable here); to finish on the device "
                  f"run: {t['next_step']}")


from .trt import commands as _trt_commands  # noqa: E402  (check-trt, build-engines)

_trt_commands.register(app)

"""trtexec command lines for an artifact's components, and build_engines.sh.

For users who build with trtexec on a Jetson rather than through Python.
One command per component:

    trtexec --onnx=decoder.onnx --saveEngine=decoder.engine --stronglyTyped
            --timingCacheFile=timing.cache --memPoolSize=workspace:2048M --skipInference
            --profile=0 --minShapes=... --optShapes=... --maxShapes=...
            --profile=1 --minShapes=... ...

Precision: always --stronglyTyped, never --fp16/--int8. The precision is in
the graphs (fp16 weights and activations from the fp16 converter; explicit
Q/DQ nodes for int8; int4 weight blocks behind DequantizeLinear with fp16
activations for int4-fp16), and a strongly typed network follows those types
exactly. TensorRT 10.12 deprecated the weak-typing flags (--fp16, --int8,
--best) and TensorRT 11 removed them; --stronglyTyped exists from 10.0 and
is an accepted no-op in 11. Multiple profiles (--profile=N before each
shape set) also exist from trtexec 10.0, so the commands need TensorRT >= 10.0.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

DEFAULT_WORKSPACE_MB = 2048
TIMING_CACHE = "timing.cache"
BUILD_SCRIPT = "build_engines.sh"


def shape_spec(shapes: dict[str, dict[str, list[int]]], which: str) -> str:
    """"name:1x3x224x224,..." for trtexec's --minShapes/--optShapes/--maxShapes.
    A name holding ':' or ',' is wrapped in single quotes, which trtexec strips."""
    def name(n: str) -> str:
        if "'" in n:
            raise ValueError(f"trtexec cannot take the tensor name {n!r}")  # not our naming
        return f"'{n}'" if (":" in n or "," in n) else n
    return ",".join(f"{name(n)}:{'x'.join(str(d) for d in s[which])}" for n, s in shapes.items())


def engine_file(component: str) -> str:
    return f"{component}.engine"


def trtexec_command(component: str, plan_component: dict[str, Any], *,
                    onnx_file: str | None = None, engine: str | None = None,
                    workspace_mb: int | None = DEFAULT_WORKSPACE_MB,
                    timing_cache: str | None = TIMING_CACHE, trtexec: str = "trtexec") -> list[str]:
    """argv of the trtexec build of one component (paths relative to the artifact)."""
    cmd = [trtexec, f"--onnx={onnx_file or component + '.onnx'}",
           f"--saveEngine={engine or engine_file(component)}", "--stronglyTyped", "--skipInference"]
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if workspace_mb:
        cmd.append(f"--memPoolSize=workspace:{int(workspace_mb)}M")
    profiles = plan_component["profiles"]
    for i, prof in enumerate(profiles):
        if len(profiles) > 1:
            cmd.append(f"--profile={i}")
        for which in ("min", "opt", "max"):
            cmd.append(f"--{which}Shapes={shape_spec(prof['shapes'], which)}")
    return cmd


def build_script(plan: dict[str, Any], components: dict[str, dict], *, family: str,
                 precision: str, version: str,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB) -> str:
    """The text of build_engines.sh: the exact trtexec command per component."""
    lines = [
        "#!/usr/bin/env bash",
        f"# Builds the TensorRT engines of this artifact ({family}, {precision}) with trtexec.",
        f"# Written by vlm-export {version}. Needs TensorRT >= 10.0 (--profile, --stronglyTyped).",
        "# Run it on the device that will run the engines: an engine is tied to the TensorRT",
        "# version and the GPU it was built with. Set TRTEXEC to the binary if it is not on PATH",
        "# (JetPack: /usr/src/tensorrt/bin/trtexec).",
        "# The Python route builds the same engines and records them in manifest.json:",
        "#     vlm-export build-engines <this directory>",
        f"# Serving limits: max_context {plan['max_context']}, max_batch {plan['max_batch']}, "
        f"max_images {plan['max_images']}.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        "",
    ]
    for comp, spec in components.items():
        pc = plan["components"][comp]
        for prof in pc["profiles"]:
            dims = ", ".join(f"{k} {v[0]}..{v[2]} (opt {v[1]})" for k, v in prof["dims"].items())
            lines.append(f"# {comp}, profile {prof['name']}: {dims}")
        cmd = trtexec_command(comp, pc, onnx_file=spec["file"], workspace_mb=workspace_mb,
                              trtexec="TRTEXEC_PLACEHOLDER")
        text = " \\\n    ".join(shlex.quote(a) for a in cmd)
        lines += [text.replace("TRTEXEC_PLACEHOLDER", '"$TRTEXEC"'), ""]
    lines += [
        'echo "engines built; record them (sha256, TensorRT version, GPU) in manifest.json with:"',
        'echo "    vlm-export build-engines \\"$(pwd)\\" --adopt"',
    ]
    return "\n".join(lines) + "\n"


def write_build_script(directory: Path, text: str) -> Path:
    path = directory / BUILD_SCRIPT
    path.write_text(text)
    path.chmod(0o755)
    return path

"""`vlm-export --target trt`: the host-side preparation of an artifact.

After the ONNX graphs are written (fp16, Q/DQ int8, or int4-fp16's int4
weight blocks: whatever the export produced), this adds the optimization-profile plan, runs the static
compatibility check and writes build_engines.sh, and returns the manifest's
`trt` section. Engines come later, on the device (`finish`): built right away
where TensorRT imports, otherwise the user is told the one command to run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vlmedge import manifest
from vlmedge.errors import MissingDependencyError, TensorRTError
from vlmedge.lazy import require

from . import compat, profiles, trtexec


def prepare(directory: Path, m: dict[str, Any], limits: profiles.Limits, version: str,
            log: Callable[[str], None], output: Path | None = None) -> dict[str, Any]:
    """Plan + compatibility check + build_engines.sh for the artifact being
    written in `directory` (staged; `output` is where it will land); adds the
    script to m["files"]. Returns the manifest's trt section."""
    plan = profiles.make_plan(m, limits)
    report = compat.check_files([(c, directory / s["file"]) for c, s in m["components"].items()])
    for f in report.components:
        for finding in f.findings:
            log(f"[trt] {finding.severity}: {f.file}: {finding.node} ({finding.op}): "
                f"{finding.message}")
    if not report.passed:
        log(f"[trt] warning: the static TensorRT check found problems; the engine build will "
            f"likely fail (vlm-export check-trt {output or directory} lists them)")
    script = trtexec.build_script(plan, m["components"], family=m["family"],
                                  precision=m["precision"], version=version)
    path = trtexec.write_build_script(directory, script)
    m["files"][path.name] = manifest.file_entry(path)
    return {
        "plan": plan,
        "compat": report.summary(),
        "build_script": path.name,
        # Strongly typed networks: precision comes from the graphs' types (trtexec.py).
        "builder": {"strongly_typed": True},
        "engines": None,
        "tensorrt_version": None,
        "compute_capability": None,
    }


def tensorrt_importable() -> bool:
    """Whether `import tensorrt` works here (the PyPI stub installs, then fails to import)."""
    try:
        require("tensorrt", "building TensorRT engines")
        return True
    except MissingDependencyError:
        return False


def finish(directory: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Builds the engines where TensorRT imports; otherwise says how to."""
    next_step = f"vlm-export build-engines {directory}"
    if not tensorrt_importable():
        return {"engines_built": False, "next_step": next_step}
    from .build import build_engines
    try:
        result = build_engines(directory, log=log)
    except TensorRTError as e:
        raise TensorRTError(f"the artifact {directory} is written, but building its engines "
                            f"failed: {e.what}", expected=e.expected, got=e.got,
                            hint=f"fix the cause, then: {next_step}") from None
    return {"engines_built": True, **result}

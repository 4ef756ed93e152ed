"""The exporter's INT8 stage: --precision int8 | int8-dynamic.

    check(o)                         cheap option checks (before the model loads)
    calibration_data(o, log)         the calibration set, chosen and checked before
                                     the (slow) export, so bad data fails fast
    quantize(o, loaded, tmp, m, ...) fp32 parity with PyTorch first, then
                                     vlmedge.calibration.int8 on the staged artifact

Exported graphs are fp32 until this stage; parity with PyTorch is proved on
them (the quantized graphs are held to the accuracy gate against fp32
instead, since they are not meant to match to 1e-4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vlmedge.errors import UserInputError, ValidationError
from vlmedge.models import demo_model_dir

from vlmedge import precision as precision_mod

INT8_PRECISIONS = ("int8", "int8-dynamic")
CACHE_OFF = "off"


def is_demo(model_dir: Path) -> bool:
    try:
        return Path(model_dir).resolve() == demo_model_dir().resolve()
    except OSError:
        return False


def check(o) -> None:
    """Option checks that need no model: calib options only with INT8, and in range."""
    from vlmedge.calibration import dataset, gate, int8

    int8_opts = (o.calib, o.calib_size, o.calib_cache)
    if not precision_mod.get(o.precision).calibrated:
        if any(v is not None for v in int8_opts):
            raise UserInputError("--calib, --calib-size and --calib-cache apply to --precision "
                                 "int8 | int8-dynamic | int4 | int4-fp16",
                                 got=f"--precision {o.precision}")
        return
    if o.precision not in INT8_PRECISIONS:  # int4: the gate's data only
        dataset.check_calib_size(o.calib_size)
        gate.Targets(o.accuracy_target, o.min_cosine, o.max_accuracy_drop)
        return
    dataset.check_calib_size(o.calib_size)
    int8.check_options(o.precision, o.calib_method,
                       gate.Targets(o.accuracy_target, o.min_cosine, o.max_accuracy_drop))


def calibration_data(o, log: Callable[[str], None]):
    """--calib (default: synthetic for the demo model) -> CalibrationSet."""
    from vlmedge.calibration import dataset

    spec = o.calib
    if spec is None:
        if not is_demo(o.model_dir):
            raise UserInputError(
                f"--precision {o.precision} needs calibration data for this model",
                expected="--calib DIR (images, optionally with prompts.jsonl)",
                hint="--calib synthetic uses the demo scene world, which suits only the demo model")
        spec = dataset.SYNTHETIC
    return dataset.load(spec, o.calib_size, seed=0, log=log)


def _cache_dir(o) -> Path | None:
    from vlmedge.calibration import ranges

    if o.calib_cache is None:
        return ranges.default_cache_dir()
    return None if o.calib_cache == CACHE_OFF else Path(o.calib_cache).expanduser()


def fp32_parity(o, loaded, tmp: Path, m: dict, validate: Callable, stage, staged=None) -> None:
    """The first step of every quantization stage (unless --no-validate): the
    fp32 graphs' parity with PyTorch, recorded in m["validation"]; graphs that
    miss it are not quantized."""
    if not o.validate:
        return
    with stage("validate"):
        m["validation"] = validate(loaded, tmp, "fp32", m)
    if staged is not None:
        staged.manifest = m  # kept with --keep-failed
    v = m["validation"]
    if not v.get("passed", True):
        raise ValidationError(
            "exported fp32 graphs do not match PyTorch, so they are not quantized: "
            f"tokens_match={v.get('tokens_match')}, max_abs_diff_logits="
            f"{v.get('max_abs_diff_logits'):.3g}",
            hint="--keep-failed keeps the artifact for inspection")


def quantize(o, loaded, tmp: Path, m: dict, data, validate: Callable, stage,
             log: Callable[[str], None], staged=None) -> dict[str, Any]:
    """fp32 parity (unless --no-validate), then INT8 in place; returns the new manifest.
    `validate(loaded, tmp, "fp32", m)` is the exporter's parity check; the
    manifest stays in memory (`staged.manifest`, written by the exporter last)."""
    from vlmedge.calibration import gate, int8

    fp32_parity(o, loaded, tmp, m, validate, stage, staged)
    opts = int8.Int8Options(
        precision=o.precision, data=data, method=o.calib_method,
        targets=gate.Targets(o.accuracy_target, o.min_cosine, o.max_accuracy_drop),
        scene=is_demo(o.model_dir), cache_dir=_cache_dir(o), threads=int8.default_threads(),
        progress=o.progress)
    with stage(o.precision):
        return int8.quantize_artifact(tmp, opts, log, manifest=m)


def summary(m: dict) -> dict[str, Any] | None:
    """The --json summary's quantization entry."""
    q = m.get("quantization")
    if not q:
        return None
    final = q["accuracy"]["final"]
    size = q["size"] or {}
    return {"method": q["method"], "cpu_only": q["cpu_only"],
            "calibration": {k: q["calibration"].get(k) for k in
                            ("source", "hash", "samples", "holdout_samples", "method", "cache")},
            "excluded_nodes": {g: [n["node"] for n in nodes]
                               for g, nodes in q.get("excluded_nodes", {}).items()},
            "cosine_mean": final["cosine_mean"], "agreement": final["agreement"],
            "scene_accuracy": final.get("scene_accuracy"),
            "scene_accuracy_fp32": final.get("scene_accuracy_fp32"),
            "size_ratio": size.get("ratio"), "passed": q["accuracy"]["passed"]}
